"""The built-in demo tasks: generated here from the interpreter's own files, never copied from a dataset.

The default run (``make train``) trains on the standard library's modules with the test suites left out
(data/sources.py); the demo tasks are cut from those test suites (``<stdlib>/test/test_*.py``), text the
model has not seen, in our own layouts (evaluation/tasks.py):

- ``stdlib_next_line`` (multiple_choice): four lines of code, then which of four lines comes next (the
  true one, three of similar length from other files);
- ``stdlib_import`` (generation): the lines before an ``import X`` statement and ``import ``; greedy
  decoding must produce X;
- ``stdlib_text`` (text): whole test files, for perplexity.

Where an interpreter ships without its test suite (some distributions package it apart), the library's
modules are used instead, and the file says so in its ``source`` field: then the model has seen them.

    python -m evaluation.demo --out cache/eval_tasks
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import sysconfig
from pathlib import Path
from typing import Optional

from data.sources import stdlib_files

DEMO_TASKS = ("stdlib_next_line", "stdlib_import", "stdlib_text")
CONTEXT_LINES = 4
_IMPORT = re.compile(r"^import (\w+)$")


def source_files() -> tuple[list[Path], str]:
    """The files the demo tasks are cut from, and what they are."""
    test_dir = Path(sysconfig.get_paths()["stdlib"]) / "test"
    tests = sorted(test_dir.glob("test_*.py"))
    if tests:
        return tests, "stdlib test suite (not in the default training corpus)"
    return [f for f, _ in stdlib_files()], "stdlib modules (the test suite is not installed; seen in training)"


def _lines(path: Path) -> list[str]:
    try:
        return path.read_text(encoding="utf-8").splitlines()
    except (UnicodeDecodeError, OSError):
        return []


def write_jsonl(path: Path, rows: list[dict]) -> None:
    tmp = path.with_suffix(f".{os.getpid()}.tmp")  # several ranks may write the same file at once
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tmp.replace(path)  # whole or not at all


def write_demo_tasks(out_dir: str | Path, *, seed: int = 0, n: int = 200) -> dict[str, Path]:
    """Write the three demo task files (``n`` examples each, ``seed`` fixed: the same files every time)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    files, source = source_files()
    rng = random.Random(seed)
    files = rng.sample(files, min(len(files), 60))
    texts = {f: _lines(f) for f in files}
    candidates = [(f, i) for f, lines in texts.items() for i in range(CONTEXT_LINES, len(lines))
                  if 20 <= len(lines[i].strip()) <= 80 and all(l.strip() for l in lines[i - CONTEXT_LINES:i])]  # fmt: skip
    next_line = []
    for f, i in rng.sample(candidates, min(n, len(candidates))):
        lines = texts[f]
        true = lines[i]
        others = [texts[g][j] for g, j in rng.sample(candidates, 12) if g != f and abs(len(texts[g][j]) - len(true)) < 20]
        if len(others) < 3:
            continue
        choices = [true, *others[:3]]
        rng.shuffle(choices)
        next_line.append({"context": "\n".join(lines[i - CONTEXT_LINES:i]) + "\n", "choices": choices,
                          "answer": choices.index(true), "source": source})  # fmt: skip
    imports = []
    for f, lines in texts.items():
        for i, line in enumerate(lines):
            match = _IMPORT.match(line)
            if match and i >= 3:
                imports.append({"prompt": "\n".join(lines[i - 3:i]) + "\nimport ", "answers": [match.group(1)],
                                "stop": ["\n", " ", ","], "source": source})  # fmt: skip
    imports = rng.sample(imports, min(n, len(imports)))
    documents = [{"text": "\n".join(texts[f])[:4000], "source": source} for f in files[:16] if texts[f]]
    paths = {name: out_dir / f"{name}.jsonl" for name in DEMO_TASKS}
    for name, rows in zip(DEMO_TASKS, (next_line, imports, documents)):
        if not rows:
            raise RuntimeError(f"no {name} examples could be cut from {source}")
        write_jsonl(paths[name], rows)
    return paths


def ensure_demo_tasks(out_dir: str | Path) -> None:
    """Write the demo files unless all three are there."""
    if not all((Path(out_dir) / f"{name}.jsonl").is_file() for name in DEMO_TASKS):
        write_demo_tasks(out_dir)


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="cache/eval_tasks")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("-n", type=int, default=200, help="examples per task")
    opts = parser.parse_args(argv)
    for name, path in write_demo_tasks(opts.out, seed=opts.seed, n=opts.n).items():
        print(f"{name}: {path}")


if __name__ == "__main__":
    main()
