"""The paper's normalisations and the answer normalisation, on examples computed by hand."""

from __future__ import annotations

import math

import pytest

from evaluation.scoring import (
    CandidateScore, Perplexity, choose, cut_at_stop, exact_match, multiple_choice_metrics, normalize_answer,
)  # fmt: skip
from evaluation.tasks import Normalization

# Three candidates where every normalisation picks a different one:
#   ll:        -4.0  -6.0  -9.0          none          -> 0
#   chars:        2    10    30          ll/chars:      -2.0  -0.6  -0.3     -> 2
#   tokens:       1     6     3          ll/tokens:     -4.0  -1.0  -3.0     -> 1
#   uncond:    -1.0  -5.5  -5.0          ll - uncond:   -3.0  -0.5  -4.0     -> 1
SCORES = [CandidateScore(loglikelihood=-4.0, n_chars=2, n_tokens=1, unconditional=-1.0),
          CandidateScore(loglikelihood=-6.0, n_chars=10, n_tokens=6, unconditional=-5.5),
          CandidateScore(loglikelihood=-9.0, n_chars=30, n_tokens=3, unconditional=-5.0)]  # fmt: skip


@pytest.mark.parametrize("normalization, expected", [(Normalization.none, 0), (Normalization.char, 2),
                                                     (Normalization.token, 1), (Normalization.unconditional, 1)])  # fmt: skip
def test_each_normalisation_picks_its_candidate(normalization, expected):
    assert choose(SCORES, normalization) == expected


def test_metrics_per_example_and_ties_go_to_the_first():
    assert multiple_choice_metrics(SCORES, answer=1, unconditional=True) == {
        "acc_none": 0.0, "acc_char": 0.0, "acc_token": 1.0, "acc_unconditional": 1.0}
    assert "acc_unconditional" not in multiple_choice_metrics(SCORES, answer=1, unconditional=False)
    tied = [CandidateScore(loglikelihood=-1.0, n_chars=1, n_tokens=1)] * 3
    assert choose(tied, Normalization.none) == 0
    with pytest.raises(ValueError, match="Answer:"):
        choose(SCORES[:1] + [CandidateScore(loglikelihood=-1.0, n_chars=1, n_tokens=1)], Normalization.unconditional)


def test_answer_normalisation_and_exact_match():
    assert normalize_answer("  The Eiffel-Tower!  ") == "eiffeltower"
    assert normalize_answer("An apple, a day") == "apple day"
    assert exact_match("the Beatles.", ["Beatles", "The Fab Four"]) == 1.0
    assert exact_match("Beatles band", ["Beatles"]) == 0.0
    assert cut_at_stop("Paris, France\nQuestion", ["\n", ","]) == "Paris"
    assert cut_at_stop("no stop here", ["\n"]) == "no stop here"


def test_perplexity_figures():
    p = Perplexity(loglikelihood=-20.0, tokens=10, words=4, bytes=25)
    assert p.token_perplexity == pytest.approx(math.exp(2.0))
    assert p.word_perplexity == pytest.approx(math.exp(5.0))
    assert p.bits_per_byte == pytest.approx(20.0 / 25 / math.log(2))


def test_pass_at_k_equals_the_closed_form_on_small_cases():
    from math import comb

    from evaluation.scoring import pass_at_k

    for n in range(1, 9):
        for c in range(n + 1):
            for k in range(1, n + 1):
                closed = 1.0 - comb(n - c, k) / comb(n, k)
                assert pass_at_k(n=n, c=c, k=k) == pytest.approx(closed, abs=1e-12), (n, c, k)
    assert pass_at_k(n=200, c=0, k=100) == 0.0 and pass_at_k(n=200, c=150, k=100) == 1.0
    assert pass_at_k(n=10, c=3, k=1) == pytest.approx(0.3)  # pass@1 is the share that passed
    # n = 200, the HumanEval protocol: the binomials overflow floats, the product does not
    assert 0.0 < pass_at_k(n=200, c=7, k=100) < 1.0
    with pytest.raises(ValueError, match="1 <= k <= n"):
        pass_at_k(n=5, c=1, k=6)


def test_majority_vote_counts_answers_and_breaks_ties_by_first_appearance():
    from evaluation.scoring import majority_vote

    assert majority_vote(["4", "5", "4", None, "5", "4"]) == ("4", 3)
    assert majority_vote(["7", "3", "3", "7"]) == ("7", 2)  # a tie: the answer seen first
    assert majority_vote(["3", "7", "3", "7"]) == ("3", 2)
    assert majority_vote([None, None]) == (None, 0) and majority_vote([]) == (None, 0)
