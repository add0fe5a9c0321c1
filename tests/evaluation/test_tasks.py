"""Task files: every public layout read from a line written here, the prompts they make, few-shot draws,
and the errors a malformed file gives (naming the file and the line)."""

from __future__ import annotations

import json

import pytest

from evaluation.config import EvalConfig, TaskConfig
from evaluation.layouts import read_examples
from evaluation.tasks import (
    Document, Generation, MultipleChoice, Normalization, TaskFileError, TaskFormat, with_fewshot,
)  # fmt: skip

# One line per layout, made up here in each benchmark's public field names.
ROWS = {
    TaskFormat.hellaswag: {"activity_label": "Baking", "ctx_a": "She mixes the flour.", "ctx_b": "then she",
                           "endings": ["bakes it [title] well.", "sings."], "label": "0"},
    TaskFormat.piqa: {"goal": "Open a jar", "sol1": "Twist the lid.", "sol2": "Freeze it.", "label": 0},
    TaskFormat.arc: {"question": {"stem": "What melts ice?", "choices": [{"text": "heat", "label": "A"},
                                                                       {"text": "cold", "label": "B"}]},
                     "answerKey": "A"},
    TaskFormat.openbookqa: {"question_stem": "The sun is a", "choices": {"text": ["star", "moon"], "label": ["A", "B"]},
                            "answerKey": "A"},
    TaskFormat.boolq: {"question": "is the sky blue", "passage": "The sky is blue.", "answer": True},
    TaskFormat.winogrande: {"sentence": "Tom gave Ann the book because _ had read it.", "option1": "Tom",
                            "option2": "Ann", "answer": "1"},
    TaskFormat.triviaqa: {"question": "Capital of France", "answer": {"value": "Paris", "aliases": ["Paris", "Paree"]}},
    TaskFormat.multiple_choice: {"context": "1 + 1 =", "choices": [" 2", " 3"], "answer": 0},
    TaskFormat.generation: {"prompt": "2 + 2 =", "answers": ["4"]},
    TaskFormat.text: {"text": "Some text."},
}  # fmt: skip


def write(path, rows) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def read_one(tmp_path, layout):
    return read_examples(write(tmp_path / f"{layout.value}.jsonl", [ROWS[layout]]), layout=layout)[0]


def test_every_layout_makes_the_prompts_lm_eval_makes(tmp_path):
    hs = read_one(tmp_path, TaskFormat.hellaswag)
    assert hs.candidates == (("Baking: She mixes the flour. Then she", " bakes it. well."), ("Baking: She mixes the flour. Then she", " sings."))
    assert read_one(tmp_path, TaskFormat.piqa).candidates[1] == ("Question: Open a jar\nAnswer:", " Freeze it.")
    arc = read_one(tmp_path, TaskFormat.arc)
    assert arc.candidates[0] == ("Question: What melts ice?\nAnswer:", " heat") and arc.answer == 0
    obqa = read_one(tmp_path, TaskFormat.openbookqa)
    assert obqa.candidates == (("The sun is a", " star"), ("The sun is a", " moon"))
    boolq = read_one(tmp_path, TaskFormat.boolq)
    assert boolq.candidates[1] == ("The sky is blue.\nQuestion: is the sky blue?\nAnswer:", " yes") and boolq.answer == 1
    wg = read_one(tmp_path, TaskFormat.winogrande)  # the blank filled in the context; the same continuation
    assert wg.candidates == (("Tom gave Ann the book because Tom", " had read it."),
                             ("Tom gave Ann the book because Ann", " had read it.")) and wg.answer == 0
    tqa = read_one(tmp_path, TaskFormat.triviaqa)
    assert isinstance(tqa, Generation) and tqa.answers == ("Paris", "Paree") and tqa.prompt.endswith("?\nAnswer:")
    assert isinstance(read_one(tmp_path, TaskFormat.multiple_choice), MultipleChoice)
    assert read_one(tmp_path, TaskFormat.generation).stop == ("\n",)
    assert read_one(tmp_path, TaskFormat.text) == Document(text="Some text.")


def test_paper_normalisations_are_the_defaults():
    assert TaskConfig(path="x", format="boolq").acc_normalization == Normalization.unconditional
    assert TaskConfig(path="x", format="openbookqa").acc_normalization == Normalization.unconditional
    assert TaskConfig(path="x", format="hellaswag").acc_normalization == Normalization.char
    assert TaskConfig(path="x", format="hellaswag", normalization="token").acc_normalization == Normalization.token


@pytest.mark.parametrize("line, message", [
    ('{"context": "a", "choices": [" b"], "answer": 0', "not valid JSON"),
    ('{"context": "a", "answer": 0}', "missing field 'choices'"),
    ('{"context": "a", "choices": [" b"], "answer": 3}', "outside the 1 choices"),
    ('[1, 2]', "expected a JSON object"),
])  # fmt: skip
def test_a_malformed_line_is_named_by_file_and_line(tmp_path, line, message):
    path = write(tmp_path / "task.jsonl", [ROWS[TaskFormat.multiple_choice], "", line])
    with pytest.raises(TaskFileError, match=rf"task\.jsonl:3: .*{message}"):
        read_examples(path, layout=TaskFormat.multiple_choice)


def test_empty_missing_and_unknown_tasks_are_clear_errors(tmp_path):
    with pytest.raises(TaskFileError, match="has no examples"):
        read_examples(write(tmp_path / "empty.jsonl", [""]), layout=TaskFormat.text)
    with pytest.raises(TaskFileError, match="cannot read task file .*nope.jsonl"):
        read_examples(tmp_path / "nope.jsonl", layout=TaskFormat.text)
    cfg = EvalConfig(tasks=["hellaswag", "nosuch"], catalog={"hellaswag": TaskConfig(format="hellaswag")})
    with pytest.raises(ValueError, match=r"unknown task\(s\) \['nosuch'\]"):
        cfg.selected()
    cfg.tasks = ["hellaswag"]
    with pytest.raises(ValueError, match="eval.catalog.hellaswag.path is not set"):
        cfg.selected()


def test_fewshot_draws_are_fixed_and_never_the_example_itself(tmp_path):
    rows = [{"context": f"q{i} =", "choices": [f" a{i}", " x"], "answer": 0} for i in range(6)]
    examples = read_examples(write(tmp_path / "t.jsonl", rows), layout=TaskFormat.multiple_choice)
    shot = with_fewshot(examples, shots=examples, k=2, seed=7, same_pool=True)
    again = with_fewshot(examples, shots=examples, k=2, seed=7, same_pool=True)
    assert shot == again
    for i, ex in enumerate(shot):
        context = ex.candidates[0][0]
        assert context.endswith(f"\n\nq{i} =") and context.count("\n\n") == 2
        assert f"q{i} = a{i}" not in context  # its own solved form is never a shot
        assert all(c == context for c, _ in ex.candidates)  # every candidate sees the same shots
    with pytest.raises(ValueError, match="needs at least 6 other examples"):
        with_fewshot(examples, shots=examples, k=6, seed=0, same_pool=True)
