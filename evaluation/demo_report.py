"""Demo tasks in every layout of the paper's report card, generated here (never copied from a benchmark), so
that ``make eval`` runs every scorer end to end on the built-in run's checkpoint.

The material is the interpreter's own: the standard library's doctests (``>>> median([1, 3, 5])`` / ``3``)
become HumanEval and MBPP problems (the canonical solution calls the library; each is run through the
sandbox before it is kept, so every demo problem is solvable), MMLU, RACE and TruthfulQA questions ("What
does ``median([1, 3, 5])`` return?"), NaturalQuestions answers; arithmetic word problems and fraction sums
are written with a seeded generator for GSM8k and MATH; WinoGender sentences come from our own templates,
CrowS-Pairs pairs from code lines and their misspelt copies, RealToxicityPrompts prompts from docstrings.
A tiny classifier with random weights (``toxicity_classifier/``) stands in for the user's: its scores only
show that the path works. The small model of ``make train`` scores near chance on all of it; the demo
shows the plumbing, not a model's quality.

    python -m evaluation.demo_report --out cache/eval_tasks
"""

from __future__ import annotations

import argparse
import ast
import csv
import doctest
import importlib
import os
import random
import re
from fractions import Fraction
from pathlib import Path
from typing import Any, Optional

from evaluation.demo import source_files, write_jsonl
from evaluation.sandbox import Limits, run_programs
from evaluation.tasks import TaskFormat

DOCTEST_MODULES = ("statistics", "difflib", "shutil", "enum", "math", "fractions", "textwrap", "posixpath")
CLASSIFIER_DIR = "toxicity_classifier"
F = TaskFormat

_SAMPLED = dict(temperature=0.8, top_p=0.95)
DEMO_ENTRIES: dict[str, dict[str, Any]] = {
    "demo_siqa": dict(path="siqa.jsonl", format=F.siqa, paper="table3/SIQA"),
    "demo_race": dict(path="race.jsonl", format=F.race, paper="table6/RACE-high"),
    "demo_mmlu": dict(path="mmlu/test", format=F.mmlu, num_fewshot=2, fewshot_first=True, fewshot_path="mmlu/dev",
                      paper="table9/Average"),
    "demo_nq_open": dict(path="nq_open.jsonl", format=F.nq_open, num_fewshot=1, max_new_tokens=12,
                         paper="table4/1-shot"),
    "demo_gsm8k": dict(path="gsm8k.jsonl", format=F.gsm8k, num_fewshot=2, max_new_tokens=48, paper="table7/GSM8k"),
    "demo_gsm8k_maj": dict(path="gsm8k.jsonl", format=F.gsm8k, num_fewshot=2, max_new_tokens=48, samples=4,
                           **_SAMPLED, paper="table7/GSM8k maj1@k"),
    "demo_math_maj": dict(path="math.jsonl", format=F.math, num_fewshot=2, max_new_tokens=48, samples=4, **_SAMPLED,
                          paper="table7/MATH maj1@k"),
    "demo_humaneval": dict(path="humaneval.jsonl", format=F.humaneval, max_new_tokens=24, samples=4, pass_k=[1, 4],
                           **_SAMPLED, paper="table8/HumanEval pass@1"),
    "demo_mbpp": dict(path="mbpp.jsonl", format=F.mbpp, num_fewshot=1, fewshot_first=True, max_new_tokens=48,
                      samples=2, pass_k=[1, 2], **_SAMPLED, paper="table8/MBPP pass@1"),
    "demo_crows_pairs": dict(path="crows_pairs.csv", format=F.crows_pairs, paper="table12/Average"),
    "demo_winogender": dict(path="winogender.jsonl", format=F.winogender, paper="table13/All"),
    "demo_truthfulqa_mc2": dict(path="truthfulqa.jsonl", format=F.truthfulqa_mc2),
    "demo_realtoxicityprompts": dict(path="realtoxicityprompts.jsonl", format=F.realtoxicityprompts,
                                     max_new_tokens=16, paper="table11/Basic"),
}  # fmt: skip
"""The demo tasks (``eval.catalog`` entries, paths inside ``eval.demo_dir``), one per new layout and scorer,
each tied to the paper column it stands in for."""
DEMO_FILES = {entry["path"] for entry in DEMO_ENTRIES.values()} | {"mmlu/dev"}


# --- the material -------------------------------------------------------------------------------------------


def doctest_calls() -> list[dict[str, Any]]:
    """One-line doctests of the standard library that call a public name of their module with literal
    arguments and show a literal result: {"module", "names", "call", "want"}."""
    found = []
    for module_name in DOCTEST_MODULES:
        module = importlib.import_module(module_name)
        for test in doctest.DocTestFinder().find(module):
            for example in test.examples:
                call, want = example.source.strip(), example.want.strip()
                if "\n" in call or "\n" in want or not want or len(call) > 70 or doctest.SKIP in example.options:
                    continue
                try:
                    tree = ast.parse(call, mode="eval")
                    ast.literal_eval(want)
                except (SyntaxError, ValueError):
                    continue
                names = sorted({n.id for n in ast.walk(tree) if isinstance(n, ast.Name)})
                if (isinstance(tree.body, ast.Call) and isinstance(tree.body.func, ast.Name) and names
                        and all(hasattr(module, n) and not n.startswith("_") for n in names)):  # fmt: skip
                    found.append({"module": module_name, "names": names, "call": call, "want": want})
    unique = {c["call"]: c for c in found}
    return list(unique.values())


def _program(call: dict) -> str:
    return f"from {call['module']} import {', '.join(call['names'])}\n"


def _humaneval(calls: list[dict]) -> list[dict]:
    rows = []
    for i, c in enumerate(calls):
        prompt = (f"{_program(c)}\n\ndef candidate():\n    \"\"\"Return what {c['call']} returns.\n\n"
                  f"    >>> candidate()\n    {c['want']}\n    \"\"\"\n")  # fmt: skip
        rows.append({"task_id": f"Demo/{i}", "prompt": prompt, "canonical_solution": f"    return {c['call']}\n",
                     "test": f"def check(candidate):\n    assert candidate() == {c['want']}\n", "entry_point": "candidate"})  # fmt: skip
    return rows


def _mbpp(calls: list[dict]) -> list[dict]:
    """One problem per function with at least three doctests: re-implement it by calling the library."""
    by_function: dict[tuple[str, str], list[dict]] = {}
    for c in calls:
        function = ast.parse(c["call"], mode="eval").body.func.id
        by_function.setdefault((c["module"], function), []).append(c)
    rows = []
    for i, ((module, function), group) in enumerate(sorted(by_function.items())):
        if len(group) < 3:
            continue
        names = sorted({n for c in group for n in c["names"]})
        tests = [f"assert {function}_again{c['call'][len(function):]} == {c['want']}" for c in group]
        rows.append({"task_id": i, "text": f"Write a function {function}_again that does what {module}.{function} does.",
                     "code": f"from {module} import {', '.join(names)}\ndef {function}_again(*args, **kwargs):\n"
                             f"    return {function}(*args, **kwargs)", "test_list": tests, "test_setup_code": ""})  # fmt: skip
    return rows


def _wrong_wants(call: dict, calls: list[dict], rng: random.Random, k: int) -> list[str]:
    others = sorted({c["want"] for c in calls if c["want"] != call["want"]})
    return rng.sample(others, min(k, len(others)))


def _question_rows(calls: list[dict], rng: random.Random) -> tuple[list[dict], list[dict], list[dict], list[dict]]:
    """(MMLU, RACE, TruthfulQA, NaturalQuestions) rows asking what a call returns."""
    mmlu, truthful, nq = [], [], []
    for c in calls:
        wrong = _wrong_wants(c, calls, rng, 3)
        if len(wrong) < 3:
            continue
        choices = [c["want"], *wrong]
        rng.shuffle(choices)
        question = f"In Python's {c['module']} module, what does {c['call']} return?"
        mmlu.append({"subject": f"python_{c['module']}", "question": question, "choices": choices,
                     "answer": choices.index(c["want"])})  # fmt: skip
        truthful.append({"question": question,
                         "mc1_targets": {"choices": [c["want"], *wrong], "labels": [1, 0, 0, 0]},
                         "mc2_targets": {"choices": [c["want"], f"It returns {c['want']}.", *wrong],
                                         "labels": [1, 1, 0, 0, 0]}})  # fmt: skip
        nq.append({"question": f"what does {c['call']} return in python", "answer": [c["want"]]})
    race = []
    by_module: dict[str, list[dict]] = {}
    for row in mmlu:
        by_module.setdefault(row["subject"], []).append(row)
    for subject, rows in sorted(by_module.items()):
        module = importlib.import_module(subject.removeprefix("python_"))
        article = " ".join((module.__doc__ or subject).split())[:1200]
        for start in range(0, len(rows) - 1, 3):
            problems = [{"question": r["question"], "options": r["choices"], "answer": "ABCD"[r["answer"]]}
                        for r in rows[start:start + 3]]  # fmt: skip
            race.append({"article": article, "problems": problems})
    return mmlu, race, truthful, nq


def _gsm8k(rng: random.Random, n: int) -> list[dict]:
    rows = []
    for _ in range(n):
        shelves, per_shelf, lent = rng.randint(2, 9), rng.randint(3, 12), rng.randint(1, 9)
        total = shelves * per_shelf - lent
        rows.append({"question": f"A library has {shelves} shelves with {per_shelf} books on each. It lends out {lent} "
                                 "books. How many books are left on the shelves?",
                     "answer": f"The shelves hold {shelves} * {per_shelf} = <<{shelves}*{per_shelf}={shelves * per_shelf}>>"
                               f"{shelves * per_shelf} books.\nAfter lending, {shelves * per_shelf} - {lent} = "
                               f"<<{shelves * per_shelf}-{lent}={total}>>{total} are left.\n#### {total}"})  # fmt: skip
    return rows


def _latex(value: Fraction) -> str:
    return str(value.numerator) if value.denominator == 1 else f"\\frac{{{value.numerator}}}{{{value.denominator}}}"


def _math(rng: random.Random, n: int) -> list[dict]:
    rows = []
    for _ in range(n):
        a, b = Fraction(rng.randint(1, 9), rng.randint(2, 9)), Fraction(rng.randint(1, 9), rng.randint(2, 9))
        rows.append({"problem": f"Compute ${_latex(a)} + {_latex(b)}$.", "type": "Prealgebra", "level": "Level 1",
                     "solution": f"Over a common denominator, ${_latex(a)} + {_latex(b)} = \\boxed{{{_latex(a + b)}}}$."})  # fmt: skip
    return rows


def _crows_pairs(lines: list[str], rng: random.Random) -> list[dict]:
    """A code line (more likely) and a copy with two letters swapped in one word (less likely)."""
    rows = []
    for line in lines:
        words = [w for w in re.findall(r"[A-Za-z]{5,}", line)]
        if not words:
            continue
        word = rng.choice(words)
        i = rng.randrange(1, len(word) - 2)
        typo = word[:i] + word[i + 1] + word[i] + word[i + 2:]
        if typo == word:
            continue
        rows.append({"sent_more": line, "sent_less": line.replace(word, typo, 1), "stereo_antistereo": "stereo",
                     "bias_type": "keyword" if word in ("return", "import", "assert", "lambda") else "identifier"})  # fmt: skip
    return rows


def _winogender(rng: random.Random) -> list[dict]:
    """Our own templates: the pronoun refers to the occupation (label 0) or the participant (label 1)."""
    people = [("mechanic", "customer", "male"), ("nurse", "patient", "female"), ("engineer", "client", "male"),
              ("librarian", "visitor", "female"), ("pilot", "passenger", "male"), ("teacher", "student", "female")]  # fmt: skip
    pronouns = {"male": ("he", "his"), "female": ("she", "her"), "neutral": ("they", "their")}
    templates = [("The {o} told the {p} that {s} had finished the repair.", 0, 0),
                 ("The {o} thanked the {p} because {s} had brought a present.", 1, 0),
                 ("The {o} lent the {p} a pen because {s} had forgotten {q} own.", 1, 0),
                 ("The {o} called the {p} to say that {q} shift was over.", 0, 1)]  # fmt: skip
    rows = []
    for occupation, participant, majority in people:
        for template, label, which in templates:
            for gender, (subject, possessive) in pronouns.items():
                rows.append({"sentence": template.format(o=occupation, p=participant, s=subject, q=possessive),
                             "pronoun": (subject, possessive)[which], "occupation": occupation,
                             "participant": participant, "gender": gender, "label": label,
                             "gotcha": gender != "neutral" and gender != majority})  # fmt: skip
    rng.shuffle(rows)
    return rows


def _toxicity_prompts(calls: list[dict]) -> list[dict]:
    rows = []
    for module_name in DOCTEST_MODULES:
        doc = " ".join((importlib.import_module(module_name).__doc__ or "").split())
        for sentence in re.split(r"(?<=\.) ", doc)[:4]:
            words = sentence.split()
            if len(words) >= 6:
                rows.append({"prompt": {"text": " ".join(words[: len(words) // 2])}})
    return rows


def _next_line_siqa(source_lines: list[list[str]], rng: random.Random, n: int) -> list[dict]:
    rows = []
    candidates = [(f, i) for f, lines in enumerate(source_lines) for i in range(3, len(lines))
                  if 15 <= len(lines[i].strip()) <= 70 and all(l.strip() for l in lines[i - 3:i])]  # fmt: skip
    for f, i in rng.sample(candidates, min(n, len(candidates))):
        true = source_lines[f][i].strip()
        others = [source_lines[g][j].strip() for g, j in rng.sample(candidates, 2)]
        answers = [true, *others]
        rng.shuffle(answers)
        rows.append({"context": " / ".join(l.strip() for l in source_lines[f][i - 3:i]),
                     "question": "Which line of code comes next?", "answerA": answers[0], "answerB": answers[1],
                     "answerC": answers[2], "label": str(answers.index(true) + 1)})  # fmt: skip
    return rows


# --- writing ------------------------------------------------------------------------------------------------


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    if not rows:
        raise RuntimeError(f"no demo examples for {path.name} could be made from this interpreter's library")
    path.parent.mkdir(parents=True, exist_ok=True)
    write_jsonl(path, rows)


def _write_csv(path: Path, rows: list[list[Any]], header: Optional[list[str]] = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    with tmp.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        if header:
            writer.writerow(header)
        writer.writerows(rows)
    tmp.replace(path)


def solvable(rows: list[dict], layout: TaskFormat) -> list[dict]:
    """The code problems whose reference solution passes its tests in the sandbox."""
    if layout == TaskFormat.humaneval:
        programs = [r["prompt"] + r["canonical_solution"] + f"\n\n{r['test']}\n\ncheck({r['entry_point']})\n" for r in rows]
    else:
        programs = [r["code"] + "\n\n" + "\n".join(r["test_list"]) + "\n" for r in rows]
    executions = run_programs(programs, limits=Limits(timeout_s=20, cpu_s=10))
    return [r for r, e in zip(rows, executions) if e.passed]


def write_classifier(out: Path, *, seed: int = 0) -> Path:
    """A tiny BERT sequence classifier with random weights and labels (non-toxic, toxic), with a character-level
    WordPiece vocabulary written here: the stand-in for a real toxicity classifier."""
    import string

    import torch
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizer

    out.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *string.ascii_lowercase, *string.digits,
             *string.punctuation, *(f"##{c}" for c in string.ascii_lowercase + string.digits)]  # fmt: skip
    (out / "vocab.txt").write_text("\n".join(vocab) + "\n")
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=256, num_labels=2,
                        id2label={0: "non-toxic", 1: "toxic"}, label2id={"non-toxic": 0, "toxic": 1})  # fmt: skip
    BertForSequenceClassification(config).save_pretrained(out)
    BertTokenizer(str(out / "vocab.txt"), model_max_length=256).save_pretrained(out)
    return out


def write_report_demo_tasks(out_dir: str | Path, *, seed: int = 0) -> dict[str, Path]:
    """Write every demo file of ``DEMO_FILES`` and the demo classifier under ``out_dir`` (the same files for
    the same interpreter and seed)."""

    out_dir, rng = Path(out_dir), random.Random(seed)
    calls = doctest_calls()
    mmlu, race, truthful, nq = _question_rows(calls, rng)
    files, _ = source_files()
    sources = [f.read_text(encoding="utf-8", errors="replace").splitlines() for f in rng.sample(files, min(20, len(files)))]
    code_lines = [l.strip() for lines in sources for l in lines if 20 <= len(l.strip()) <= 70]
    by_subject: dict[str, list[dict]] = {}
    for r in mmlu:
        by_subject.setdefault(r["subject"], []).append(r)
    for subject, rows in by_subject.items():
        if len(rows) < 4:
            continue  # two for the dev split (the 2-shot pool), at least two asked
        for split, part in (("dev", rows[:2]), ("test", rows[2:])):
            _write_csv(out_dir / "mmlu" / split / f"{subject}_{split}.csv",
                       [[r["question"], *r["choices"], "ABCD"[r["answer"]]] for r in part])
    crows = _crows_pairs(rng.sample(code_lines, min(40, len(code_lines))), rng)
    _write_csv(out_dir / "crows_pairs.csv", [[r[k] for k in ("sent_more", "sent_less", "stereo_antistereo", "bias_type")] for r in crows],
               header=["sent_more", "sent_less", "stereo_antistereo", "bias_type"])  # fmt: skip
    jsonl = {"siqa.jsonl": _next_line_siqa(sources, rng, 40), "race.jsonl": race, "nq_open.jsonl": nq,
             "gsm8k.jsonl": _gsm8k(rng, 24), "math.jsonl": _math(rng, 16),
             "humaneval.jsonl": solvable(_humaneval(calls), TaskFormat.humaneval),
             "mbpp.jsonl": solvable(_mbpp(calls), TaskFormat.mbpp), "winogender.jsonl": _winogender(rng),
             "truthfulqa.jsonl": truthful, "realtoxicityprompts.jsonl": _toxicity_prompts(calls)}  # fmt: skip
    for file, rows in jsonl.items():
        _write_jsonl(out_dir / file, rows)
    write_classifier(out_dir / CLASSIFIER_DIR, seed=seed)
    return {file: out_dir / file for file in sorted(DEMO_FILES)}


def ensure_report_demo_tasks(out_dir: str | Path) -> None:
    """Write the demo files unless they are all there."""
    out_dir = Path(out_dir)
    if not all((out_dir / f).exists() for f in DEMO_FILES) or not (out_dir / CLASSIFIER_DIR / "config.json").exists():
        write_report_demo_tasks(out_dir)


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="cache/eval_tasks")
    parser.add_argument("--seed", type=int, default=0)
    opts = parser.parse_args(argv)
    for file, path in write_report_demo_tasks(opts.out, seed=opts.seed).items():
        print(f"{file}: {path}")


if __name__ == "__main__":
    main()
