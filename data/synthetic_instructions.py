"""A synthetic instruction set for the built-in finetuning run (``make finetune``), generated here.

Five small tasks, each asked in several phrasings, with made-up words and small numbers as inputs:
repeat a word, give its first letter, give its last letter, add two numbers, say which of two numbers is
larger. Records are in the ``instruction`` layout (``instruction``, ``input``, ``output``; data/instructions.py).
The held-out split has inputs never seen in training (other words, other number pairs), so its exact-match
accuracy measures whether the model learned to follow the instructions, not whether it memorised answers.

    python -m data.synthetic_instructions --out cache/instructions
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path
from typing import Callable, Optional

PHRASINGS: dict[str, tuple[str, ...]] = {
    "repeat": ("Repeat the word.", "Say the word again.", "Copy the word exactly.", "Write the same word back."),
    "first": ("What is the first letter of the word?", "Give the word's first letter.", "Which letter does the word start with?"),
    "last": ("What is the last letter of the word?", "Give the word's last letter.", "Which letter does the word end with?"),
    "add": ("Add the two numbers.", "What is the sum of the numbers?", "Compute the total of the two numbers."),
    "larger": ("Which number is larger?", "Give the bigger of the two numbers.", "Name the greater number."),
}  # fmt: skip

_LETTERS = "abcdefghiklmnoprstuvw"


def _word(rng: random.Random) -> str:
    return "".join(rng.choice(_LETTERS) for _ in range(rng.randint(3, 6)))


def _example(task: str, rng: random.Random, *, word: Callable[[], str], pair: Callable[[], tuple[int, int]]) -> dict:
    instruction = rng.choice(PHRASINGS[task])
    if task in ("repeat", "first", "last"):
        w = word()
        output = {"repeat": w, "first": w[0], "last": w[-1]}[task]
        return {"instruction": instruction, "input": w, "output": output, "task": task}
    a, b = pair()
    output = str(a + b) if task == "add" else str(max(a, b))
    return {"instruction": instruction, "input": f"{a} and {b}", "output": output, "task": task}


def make_instructions(*, train: int = 4000, held_out: int = 200, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """(train, held-out) records; held-out words and number pairs never occur in train."""
    rng = random.Random(seed)
    held_words = {_word(rng) for _ in range(held_out)}
    held_pairs = {(rng.randint(0, 49), rng.randint(0, 49)) for _ in range(held_out)}

    def fresh_word() -> str:
        while (w := _word(rng)) in held_words:
            pass
        return w

    def fresh_pair() -> tuple[int, int]:
        while (p := (rng.randint(0, 49), rng.randint(0, 49))) in held_pairs or p[0] == p[1]:
            pass
        return p

    words, pairs = sorted(held_words), sorted(p for p in held_pairs if p[0] != p[1])
    tasks = list(PHRASINGS)
    train_rows = [_example(rng.choice(tasks), rng, word=fresh_word, pair=fresh_pair) for _ in range(train)]
    held_rows = [_example(tasks[i % len(tasks)], rng, word=lambda: rng.choice(words), pair=lambda: rng.choice(pairs))
                 for i in range(held_out)]  # fmt: skip  (the same number of each task)
    return train_rows, held_rows


def write_instructions(out_dir: str | Path, *, seed: int = 0, train: int = 4000, held_out: int = 200) -> dict[str, Path]:
    """Write ``train.jsonl`` and ``held_out.jsonl`` under ``out_dir``; the same files for the same arguments."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, rows in zip(("train", "held_out"), make_instructions(train=train, held_out=held_out, seed=seed)):
        path = out_dir / f"{name}.jsonl"
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
        tmp.replace(path)
        paths[name] = path
    return paths


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="cache/instructions")
    parser.add_argument("--seed", type=int, default=0)
    opts = parser.parse_args(argv)
    for name, path in write_instructions(opts.out, seed=opts.seed).items():
        print(f"{name}: {path}")


if __name__ == "__main__":
    main()
