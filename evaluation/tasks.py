"""Evaluation tasks: the formats a task file can have, the kinds of example they become, few-shot prompts.

Nothing is downloaded: a task is a file (or, for MMLU, a directory) the user points at
(``eval.catalog.<name>.path``); evaluation/layouts.py reads each format's public layout.

Every task becomes one of three kinds of example:

- ``MultipleChoice``: candidates (context, continuation) pairs, one per choice, and the index of the right
  one. Scored by log-likelihood (evaluation/scoring.py picks with the paper's normalisations). Most tasks
  share the context and differ in the continuation; WinoGrande differs in the context (the blank filled
  with each option) and scores the same continuation, as lm-evaluation-harness's "partial" scoring does.
  CrowS-Pairs scores two whole sentences; TruthfulQA MC2 has several true candidates.
- ``Generation``: a prompt, decoded greedily or sampled until a stop string, then scored by the task's
  ``Scorer``: exact match after answer normalisation (closed-book QA), the final number or expression of a
  math solution (GSM8k, MATH; maj1@k over samples), a program run against its tests (HumanEval, MBPP; pass@k),
  or a toxicity classifier (RealToxicityPrompts).
- ``Document``: a text whose rolling log-likelihood gives perplexity.

The prompt of each layout follows lm-evaluation-harness's task of the same name (so our accuracies can be
compared with its), with the paper's normalisation as each task's default (``DEFAULT_NORMALIZATION``).
Few-shot prompts put k solved examples before the question, separated by a blank line, drawn with a fixed
seed (or the first k, ``first=True``, as MMLU takes its dev examples) from the task's ``fewshot_path`` or
the task file itself, never the example being asked; an example with a ``pool`` (MMLU's subject) draws only
from shots of the same pool. A ``preamble`` (MMLU's subject line, NaturalQuestions' instruction, the
"respectful" RealToxicityPrompts instruction) goes before the shots.
"""

from __future__ import annotations

import dataclasses
import enum
import random
from dataclasses import dataclass
from typing import Union

UNCONDITIONAL_CONTEXT = "Answer:"
"""The context of the paper's unconditional normalisation: P(completion | context) / P(completion | "Answer:")."""

FEWSHOT_SEPARATOR = "\n\n"


class TaskFormat(str, enum.Enum):
    """The layouts a task file can have (``eval.tasks[i].format``)."""

    hellaswag = "hellaswag"  # ctx_a, ctx_b (or ctx), activity_label, endings, label
    piqa = "piqa"  # goal, sol1, sol2, label (the labels merged into the lines, as in the HF rows)
    arc = "arc"  # question {stem, choices [{text, label}]}, answerKey (AI2's layout; HF's flat one too)
    openbookqa = "openbookqa"  # ARC's layout (AI2), or HF's question_stem + choices {text, label} + answerKey
    boolq = "boolq"  # question, passage, answer (true/false)
    winogrande = "winogrande"  # sentence with one "_", option1, option2, answer ("1" or "2")
    triviaqa = "triviaqa"  # question, answer {value, aliases}
    siqa = "siqa"  # context, question, answerA, answerB, answerC, label ("1".."3")
    race = "race"  # article, problems [{question, options, answer}] (EleutherAI's); or article, question, options, answer
    mmlu = "mmlu"  # a directory of <subject>_test.csv (question, A, B, C, D, answer; no header), or one CSV/JSONL
    nq_open = "nq_open"  # question, answer [str]
    gsm8k = "gsm8k"  # question, answer (a solution ending "#### <number>")
    math = "math"  # problem, solution (with \\boxed{answer}), type, level
    humaneval = "humaneval"  # task_id, prompt, canonical_solution, test, entry_point
    mbpp = "mbpp"  # task_id, text, code, test_list, test_setup_code
    crows_pairs = "crows_pairs"  # sent_more, sent_less, stereo_antistereo, bias_type (CSV with a header, or JSONL)
    winogender = "winogender"  # sentence, pronoun, occupation, participant, gender, label (0/1), gotcha (optional)
    truthfulqa_mc1 = "truthfulqa_mc1"  # question, mc1_targets {choices, labels}
    truthfulqa_mc2 = "truthfulqa_mc2"  # question, mc2_targets {choices, labels}
    realtoxicityprompts = "realtoxicityprompts"  # prompt {text}
    instructions = "instructions"  # instruction, input, output (finetuning's layout, data/instructions.py)
    multiple_choice = "multiple_choice"  # ours: context, choices [str], answer (index)
    generation = "generation"  # ours: prompt, answers [str] (optional "stop": [str])
    text = "text"  # ours: text (perplexity)


class Normalization(str, enum.Enum):
    """How a multiple-choice candidate's log-likelihood is compared (the LLaMA paper, section 3)."""

    none = "none"  # sum of the continuation's token log-probabilities
    char = "char"  # divided by the continuation's number of characters (the paper's default)
    token = "token"  # divided by its number of tokens
    unconditional = "unconditional"  # minus its log-likelihood after "Answer:" (the paper's OpenBookQA, BoolQ)


DEFAULT_NORMALIZATION = {
    TaskFormat.openbookqa: Normalization.unconditional, TaskFormat.boolq: Normalization.unconditional,
    # MC1/MC2 are defined on the raw log-likelihoods (Lin et al. 2021), CrowS-Pairs compares two sentences'
    # whole log-likelihoods, MMLU's continuations are single letters.
    TaskFormat.truthfulqa_mc1: Normalization.none, TaskFormat.truthfulqa_mc2: Normalization.none,
    TaskFormat.crows_pairs: Normalization.none, TaskFormat.mmlu: Normalization.none,
}  # fmt: skip


class Scorer(str, enum.Enum):
    """How a generation task's outputs become its metrics (evaluation/evaluate.py)."""

    exact_match = "exact_match"
    gsm8k = "gsm8k"  # the final number; maj1@k over samples
    math = "math"  # the final boxed expression, equal by math-verify; maj1@k over samples
    code = "code"  # the program run against its tests in the sandbox; pass@k over samples
    toxicity = "toxicity"  # the classifier's toxicity of the continuation


SCORERS = {TaskFormat.gsm8k: Scorer.gsm8k, TaskFormat.math: Scorer.math, TaskFormat.humaneval: Scorer.code,
           TaskFormat.mbpp: Scorer.code, TaskFormat.realtoxicityprompts: Scorer.toxicity}  # fmt: skip
"""The scorer of each generation format; the others score by exact match."""


class TaskFileError(ValueError):
    """A task file that cannot be read: names the file, the line and what is wrong."""


@dataclass(frozen=True)
class MultipleChoice:
    candidates: tuple[tuple[str, str], ...]
    """(context, continuation) per choice."""
    answer: int
    # The solved form of this example, for few-shot prompts of other examples.
    shot: str = ""
    groups: tuple[str, ...] = ()
    """The groups whose accuracy this example counts in (MMLU's category, CrowS-Pairs' bias type, ...)."""
    true_set: tuple[int, ...] = ()
    """TruthfulQA MC2: every true candidate (the metric is their share of the probability)."""
    pool: str = ""
    """Few-shot shots come from examples of the same pool (MMLU: the subject)."""
    preamble: str = ""


@dataclass(frozen=True)
class Generation:
    prompt: str
    answers: tuple[str, ...]
    """Exact match: the accepted answers; math: the reference final answer; code: the reference solution."""
    stop: tuple[str, ...] = ("\n",)
    shot: str = ""
    groups: tuple[str, ...] = ()
    program: tuple[str, str] = ("", "")
    """Code: the program run is program[0] + completion + program[1] (the tests)."""
    pool: str = ""
    preamble: str = ""


@dataclass(frozen=True)
class Document:
    text: str
    shot: str = ""
    pool: str = ""
    preamble: str = ""


Example = Union[MultipleChoice, Generation, Document]


def with_fewshot(examples: list[Example], *, shots: list[Example], k: int, seed: int, same_pool: bool,
                 first: bool = False) -> list[Example]:  # fmt: skip
    """Each example with k solved ``shots`` prepended to its contexts: drawn with ``seed`` (per example), or
    the first k (``first``); from the shots of the example's own ``pool`` where it has one.

    ``same_pool``: the shots are the examples themselves, so an example never sees itself."""
    if k == 0:
        return examples
    out = []
    for i, example in enumerate(examples):
        indices = [j for j in range(len(shots)) if not (same_pool and j == i) and shots[j].pool == example.pool]
        if len(indices) < k:
            where = f" of pool {example.pool!r}" if example.pool else ""
            raise ValueError(f"{k}-shot needs at least {k} other examples{where} to draw from, there are {len(indices)}")
        chosen = indices[:k] if first else random.Random(seed * 1_000_003 + i).sample(indices, k)
        out.append(_prefixed(example, FEWSHOT_SEPARATOR.join(shots[j].shot for j in chosen) + FEWSHOT_SEPARATOR))
    return out


def with_preamble(examples: list[Example], *, prefix: str = "") -> list[Example]:
    """Each example with ``prefix`` and its own ``preamble`` before everything else (the shots included)."""
    return [dataclasses.replace(_prefixed(ex, prefix + ex.preamble), preamble="") if prefix + ex.preamble else ex
            for ex in examples]  # fmt: skip


def _prefixed(example: Example, prefix: str) -> Example:
    if isinstance(example, MultipleChoice):
        return dataclasses.replace(example, candidates=tuple((prefix + c, x) for c, x in example.candidates))
    if isinstance(example, Generation):
        return dataclasses.replace(example, prompt=prefix + example.prompt)
    raise ValueError("few-shot prompts and preambles apply to multiple-choice and generation tasks, not to perplexity (text)")
