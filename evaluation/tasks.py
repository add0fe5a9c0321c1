"""Evaluation tasks from local files: the public JSONL layouts of the LLaMA paper's benchmarks, and our own.

Nothing is downloaded: a task is a file the user points at (``eval.tasks[i].path``). Each line of a JSONL
file is one example; a line that is not JSON, or lacks a field its layout needs, stops with an error that
names the file and the line (``TaskFileError``).

Every task becomes one of three kinds of example:

- ``MultipleChoice``: candidates (context, continuation) pairs, one per choice, and the index of the right
  one. Scored by log-likelihood (evaluation/scoring.py picks with the paper's normalisations). Most tasks
  share the context and differ in the continuation; WinoGrande differs in the context (the blank filled
  with each option) and scores the same continuation, as lm-evaluation-harness's "partial" scoring does.
- ``Generation``: a prompt and the accepted answers; greedy decoding until a stop string, exact match after
  answer normalisation (closed-book QA: TriviaQA, NaturalQuestions).
- ``Document``: a text whose rolling log-likelihood gives perplexity.

The prompt of each layout follows lm-evaluation-harness's task of the same name (so our accuracies can be
compared with its), with the paper's normalisation as each task's default (``DEFAULT_NORMALIZATION``).
Few-shot prompts put k solved examples, drawn with a fixed seed from the task's ``fewshot_path`` (or the
task file itself, never the example being asked), before the question, separated by a blank line.
"""

from __future__ import annotations

import enum
import json
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Union

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
    multiple_choice = "multiple_choice"  # ours: context, choices [str], answer (index)
    generation = "generation"  # ours: prompt, answers [str] (optional "stop": [str])
    text = "text"  # ours: text (perplexity)


class Normalization(str, enum.Enum):
    """How a multiple-choice candidate's log-likelihood is compared (the LLaMA paper, section 3)."""

    none = "none"  # sum of the continuation's token log-probabilities
    char = "char"  # divided by the continuation's number of characters (the paper's default)
    token = "token"  # divided by its number of tokens
    unconditional = "unconditional"  # minus its log-likelihood after "Answer:" (the paper's OpenBookQA, BoolQ)


DEFAULT_NORMALIZATION = {TaskFormat.openbookqa: Normalization.unconditional, TaskFormat.boolq: Normalization.unconditional}


class TaskFileError(ValueError):
    """A task file that cannot be read: names the file, the line and what is wrong."""


@dataclass(frozen=True)
class MultipleChoice:
    candidates: tuple[tuple[str, str], ...]
    """(context, continuation) per choice."""
    answer: int
    # The solved form of this example, for few-shot prompts of other examples.
    shot: str = ""


@dataclass(frozen=True)
class Generation:
    prompt: str
    answers: tuple[str, ...]
    stop: tuple[str, ...] = ("\n",)
    shot: str = ""


@dataclass(frozen=True)
class Document:
    text: str
    shot: str = ""


Example = Union[MultipleChoice, Generation, Document]


# --- the layouts ------------------------------------------------------------------------------------------


def _need(row: dict, *keys: str) -> Any:
    """row[k1][k2]...; a KeyError names the missing field (turned into a TaskFileError by the reader)."""
    value: Any = row
    for key in keys:
        if not isinstance(value, dict) or key not in value:
            raise KeyError(".".join(keys))
        value = value[key]
    return value


def _choice_index(labels: list[str], key: Any) -> int:
    key = str(key).strip()
    if key not in labels:
        raise ValueError(f"answer {key!r} is not one of the choice labels {labels}")
    return labels.index(key)


def _multiple_choice(context: str, choices: list[str], answer: int) -> MultipleChoice:
    if not choices:
        raise ValueError("no choices")
    if not 0 <= answer < len(choices):
        raise ValueError(f"answer index {answer} is outside the {len(choices)} choices")
    return MultipleChoice(candidates=tuple((context, c) for c in choices), answer=answer,
                          shot=context + choices[answer])  # fmt: skip


def _hellaswag_clean(text: str) -> str:
    # WikiHow artefacts in the public file (" [title]", "[header]", double spaces), removed as lm-eval does.
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def _hellaswag(row: dict) -> MultipleChoice:
    if "ctx_a" in row:
        ctx = _need(row, "ctx_a") + " " + str(_need(row, "ctx_b")).capitalize()
    else:
        ctx = _need(row, "ctx")
    context = _hellaswag_clean(_need(row, "activity_label") + ": " + ctx)
    endings = [" " + _hellaswag_clean(e) for e in _need(row, "endings")]
    return _multiple_choice(context, endings, int(_need(row, "label")))


def _piqa(row: dict) -> MultipleChoice:
    context = f"Question: {_need(row, 'goal')}\nAnswer:"
    return _multiple_choice(context, [" " + _need(row, "sol1"), " " + _need(row, "sol2")], int(_need(row, "label")))


def _question_choices(row: dict) -> tuple[str, list[str], list[str]]:
    """(stem, choice texts, choice labels) of AI2's nested layout or HF's flat one."""
    question = _need(row, "question") if "question" in row else None
    if isinstance(question, dict):  # AI2: {"question": {"stem", "choices": [{"text", "label"}]}}
        choices = _need(row, "question", "choices")
        return _need(row, "question", "stem"), [c["text"] for c in choices], [str(c["label"]) for c in choices]
    stem = question if question is not None else _need(row, "question_stem")
    choices = _need(row, "choices")  # HF: {"text": [...], "label": [...]}
    return stem, list(choices["text"]), [str(label) for label in choices["label"]]


def _arc(row: dict) -> MultipleChoice:
    stem, texts, labels = _question_choices(row)
    return _multiple_choice(f"Question: {stem}\nAnswer:", [" " + t for t in texts],
                            _choice_index(labels, _need(row, "answerKey")))  # fmt: skip


def _openbookqa(row: dict) -> MultipleChoice:
    stem, texts, labels = _question_choices(row)
    return _multiple_choice(stem, [" " + t for t in texts], _choice_index(labels, _need(row, "answerKey")))


def _boolq(row: dict) -> MultipleChoice:
    answer = _need(row, "answer")
    if not isinstance(answer, bool):
        raise ValueError(f"answer must be true or false, got {answer!r}")
    context = f"{_need(row, 'passage')}\nQuestion: {_need(row, 'question')}?\nAnswer:"
    return _multiple_choice(context, [" no", " yes"], int(answer))


def _winogrande(row: dict) -> MultipleChoice:
    sentence = _need(row, "sentence")
    if sentence.count("_") != 1:
        raise ValueError("sentence must contain exactly one '_' (the blank)")
    before, after = sentence.split("_")
    options = [_need(row, "option1"), _need(row, "option2")]
    continuation = " " + after.strip()
    answer = _choice_index(["1", "2"], _need(row, "answer"))
    return MultipleChoice(candidates=tuple((before + option, continuation) for option in options), answer=answer,
                          shot=before + options[answer] + continuation)  # fmt: skip


def _triviaqa(row: dict) -> Generation:
    answer = _need(row, "answer")
    answers = [_need(row, "answer", "value"), *answer.get("aliases", [])] if isinstance(answer, dict) else [answer]
    prompt = f"Question: {_need(row, 'question')}?\nAnswer:"
    return Generation(prompt=prompt, answers=tuple(dict.fromkeys(answers)), stop=("\n", ".", ","),
                      shot=f"{prompt} {answers[0]}")  # fmt: skip


def _ours_multiple_choice(row: dict) -> MultipleChoice:
    return _multiple_choice(_need(row, "context"), list(_need(row, "choices")), int(_need(row, "answer")))


def _ours_generation(row: dict) -> Generation:
    answers = tuple(_need(row, "answers"))
    if not answers:
        raise ValueError("answers is empty")
    stop = tuple(row.get("stop", ["\n"]))
    return Generation(prompt=_need(row, "prompt"), answers=answers, stop=stop, shot=_need(row, "prompt") + answers[0])


def _text(row: dict) -> Document:
    return Document(text=_need(row, "text"))


LAYOUTS: dict[TaskFormat, Callable[[dict], Example]] = {
    TaskFormat.hellaswag: _hellaswag, TaskFormat.piqa: _piqa, TaskFormat.arc: _arc,
    TaskFormat.openbookqa: _openbookqa, TaskFormat.boolq: _boolq, TaskFormat.winogrande: _winogrande,
    TaskFormat.triviaqa: _triviaqa, TaskFormat.multiple_choice: _ours_multiple_choice,
    TaskFormat.generation: _ours_generation, TaskFormat.text: _text,
}  # fmt: skip


# --- reading ------------------------------------------------------------------------------------------------


def _rows(path: Path) -> Iterator[tuple[int, dict]]:
    """(line number, object) for every non-blank line of a JSONL file."""
    try:
        handle = path.open(encoding="utf-8")
    except OSError as err:
        raise TaskFileError(f"cannot read task file {path}: {err.strerror}; check eval.tasks[].path") from err
    with handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise TaskFileError(f"{path}:{number}: not valid JSON ({err.msg}, column {err.colno})") from err
            if not isinstance(row, dict):
                raise TaskFileError(f"{path}:{number}: expected a JSON object, got {type(row).__name__}")
            yield number, row


def read_examples(path: str | Path, *, layout: TaskFormat, limit: Optional[int] = None) -> list[Example]:
    """The examples of a JSONL task file in ``layout``; the first ``limit`` if given.

    Raises TaskFileError naming the file and line of a malformed example, or the file if it has none."""
    path, layout = Path(path), TaskFormat(layout)
    parse = LAYOUTS[layout]
    examples: list[Example] = []
    for number, row in _rows(path):
        if limit is not None and len(examples) >= limit:
            break
        try:
            examples.append(parse(row))
        except KeyError as err:
            raise TaskFileError(f"{path}:{number}: missing field {err.args[0]!r} of the {layout.value} layout") from None
        except (ValueError, TypeError, AttributeError) as err:
            raise TaskFileError(f"{path}:{number}: {err} ({layout.value} layout)") from None
    if not examples:
        raise TaskFileError(f"task file {path} has no examples; point eval.tasks[].path at a non-empty JSONL file")
    return examples


def with_fewshot(examples: list[Example], *, shots: list[Example], k: int, seed: int,
                 same_pool: bool) -> list[Example]:  # fmt: skip
    """Each example with k solved ``shots`` (drawn with ``seed``, per example) prepended to its contexts.

    ``same_pool``: the shots come from the examples themselves, so an example never sees itself."""
    if k == 0:
        return examples
    pool_size = len(shots) - (1 if same_pool else 0)
    if pool_size < k:
        raise ValueError(f"{k}-shot needs at least {k} other examples to draw from, there are {pool_size}")
    out = []
    for i, example in enumerate(examples):
        rng = random.Random(seed * 1_000_003 + i)
        indices = [j for j in range(len(shots)) if not (same_pool and j == i)]
        prefix = FEWSHOT_SEPARATOR.join(shots[j].shot for j in rng.sample(indices, k)) + FEWSHOT_SEPARATOR
        out.append(_prefixed(example, prefix))
    return out


def _prefixed(example: Example, prefix: str) -> Example:
    if isinstance(example, MultipleChoice):
        return MultipleChoice(candidates=tuple((prefix + c, x) for c, x in example.candidates), answer=example.answer,
                              shot=example.shot)  # fmt: skip
    if isinstance(example, Generation):
        return Generation(prompt=prefix + example.prompt, answers=example.answers, stop=example.stop, shot=example.shot)
    raise ValueError("few-shot prompts apply to multiple-choice and generation tasks, not to perplexity (text)")
