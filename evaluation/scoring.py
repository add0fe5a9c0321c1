"""Turning log-likelihoods and generations into the LLaMA paper's metrics (section 3).

Multiple choice: every candidate continuation is scored by its log-likelihood given the context,

    ll_i      = sum_t log p(y_t | context_i, y_<t)            (the ``none`` normalisation)
    char:     ll_i / len(continuation_i)                      (characters; the paper's default)
    token:    ll_i / (number of tokens of continuation_i)
    unconditional: ll_i - log p(continuation_i | "Answer:")   (= log of the paper's likelihood ratio;
                                                               its OpenBookQA and BoolQ)

and the prediction is the argmax (ties go to the first). Every example reports all four; the task's
``normalization`` chooses which one is its ``acc``.

Free-form answers are compared after the usual normalisation of closed-book QA (the SQuAD / TriviaQA
evaluation scripts): lower case, punctuation and the articles a/an/the removed, whitespace collapsed; a
prediction is right if it equals any accepted answer.
"""

from __future__ import annotations

import math
import re
import string
from dataclasses import dataclass
from typing import Optional, Sequence

from evaluation.tasks import Normalization


@dataclass(frozen=True)
class CandidateScore:
    """What the model said about one candidate continuation."""

    loglikelihood: float
    n_chars: int
    n_tokens: int
    is_greedy: bool = False
    """Every continuation token was the argmax (lm-eval's second output)."""
    unconditional: Optional[float] = None
    """log p(continuation | "Answer:"), where the task normalises by it."""


def normalized_score(score: CandidateScore, normalization: Normalization) -> float:
    normalization = Normalization(normalization)
    if normalization == Normalization.none:
        return score.loglikelihood
    if normalization == Normalization.char:
        return score.loglikelihood / max(score.n_chars, 1)
    if normalization == Normalization.token:
        return score.loglikelihood / max(score.n_tokens, 1)
    if score.unconditional is None:
        raise ValueError("the unconditional normalisation needs each candidate's log-likelihood after 'Answer:'")
    return score.loglikelihood - score.unconditional


def choose(scores: Sequence[CandidateScore], normalization: Normalization) -> int:
    """The index of the best candidate under ``normalization`` (the first of equals)."""
    values = [normalized_score(s, normalization) for s in scores]
    return max(range(len(values)), key=lambda i: (values[i], -i))


def multiple_choice_metrics(scores: Sequence[CandidateScore], *, answer: int, unconditional: bool) -> dict[str, float]:
    """acc_<normalisation> (1.0 or 0.0) for every normalisation available for this example."""
    names = [Normalization.none, Normalization.char, Normalization.token]
    if unconditional:
        names.append(Normalization.unconditional)
    return {f"acc_{n.value}": float(choose(scores, n) == answer) for n in names}


_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = set(string.punctuation)


def normalize_answer(text: str) -> str:
    """Lower case, no punctuation, no articles, single spaces (the SQuAD/TriviaQA answer normalisation)."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def exact_match(prediction: str, answers: Sequence[str]) -> float:
    """1.0 if the normalised prediction equals a normalised accepted answer, else 0.0."""
    got = normalize_answer(prediction)
    return float(any(got == normalize_answer(a) for a in answers))


def cut_at_stop(text: str, stops: Sequence[str]) -> str:
    """``text`` up to (not including) the first occurrence of any stop string."""
    end = len(text)
    for stop in stops:
        at = text.find(stop)
        if at != -1:
            end = min(end, at)
    return text[:end]


@dataclass(frozen=True)
class Perplexity:
    """Rolling log-likelihood of a set of documents, per token, per word and per byte (lm-eval's three)."""

    loglikelihood: float
    tokens: int
    words: int
    bytes: int

    @property
    def token_perplexity(self) -> float:
        return math.exp(-self.loglikelihood / self.tokens)

    @property
    def word_perplexity(self) -> float:
        return math.exp(-self.loglikelihood / self.words)

    @property
    def bits_per_byte(self) -> float:
        return -self.loglikelihood / self.bytes / math.log(2)


def pass_at_k(*, n: int, c: int, k: int) -> float:
    """The unbiased estimator of pass@k from n samples of which c passed (Chen et al. 2021, "Evaluating
    Large Language Models Trained on Code", eq. 1): 1 - C(n - c, k) / C(n, k), the chance that k samples
    drawn without replacement from the n include a passing one. Computed as a product, which stays exact
    where the binomials overflow a float: 1 - prod_{i = n - c + 1}^{n} (1 - k / i)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n; got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def majority_vote(answers: Sequence[Optional[str]]) -> tuple[Optional[str], int]:
    """maj1@k: the most frequent answer among k samples' (already normalised) final answers, and its count.
    Samples without an answer (None) do not vote; a tie goes to the answer that appeared first, so the vote
    is a function of the samples in their (seeded) order."""
    counts: dict[str, int] = {}
    for answer in answers:
        if answer is not None:
            counts[answer] = counts.get(answer, 0) + 1
    if not counts:
        return None, 0
    best = max(counts.values())
    winner = next(a for a in answers if a is not None and counts[a] == best)
    return winner, best
