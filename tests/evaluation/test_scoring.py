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
