"""Small synthetic corpora and one tiny tokenizer shared by the data tests."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from data.config import DataConfig, SourceConfig, TokenizerConfig
from data.tokenizer import Tokenizer, train_tokenizer

_WORDS = "def return class self import value index count data token model batch yield with for in if else".split()


def code_document(*, seed: int, lines: int = 12) -> str:
    """A deterministic Python-looking document with indentation, numbers and a unique marker."""
    rng = random.Random(seed)
    out = [f"# document {seed}"]
    for _ in range(lines):
        indent = "    " * rng.randint(0, 3)
        words = " ".join(rng.choice(_WORDS) for _ in range(rng.randint(2, 6)))
        out.append(f"{indent}{words} = {rng.randint(0, 99999)}")
    return "\n".join(out) + "\n"


def write_text_files(directory: Path, *, count: int, first_seed: int = 0) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for index in range(count):
        path = directory / f"file_{index:03d}.py"
        path.write_text(code_document(seed=first_seed + index))
        paths.append(path)
    return paths


@pytest.fixture(scope="session")
def tiny_tokenizer_path(tmp_path_factory) -> str:
    """A 400-piece BPE model trained once per test session on ~30 KB of synthetic code."""
    root = tmp_path_factory.mktemp("tiny_tokenizer")
    lines = [line for seed in range(200) for line in code_document(seed=seed).splitlines()]
    path = root / "tokenizer.model"
    train_tokenizer(lines=lines, out_path=path, tok_cfg=TokenizerConfig(vocab_size=400))
    return str(path)


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_tokenizer_path) -> Tokenizer:
    return Tokenizer(tiny_tokenizer_path)


def make_config(
    tmp_path: Path, *, sources: dict[str, SourceConfig], tokenizer_path: str | None, **overrides
) -> DataConfig:
    """A DataConfig writing under tmp_path, single-process and quiet unless overridden."""
    settings = dict(cache_dir=str(tmp_path / "cache"), num_proc=1, progress=False, val_fraction=0.2, seq_len=16)
    settings.update(overrides)
    return DataConfig(sources=sources, tokenizer=TokenizerConfig(path=tokenizer_path, vocab_size=400), **settings)
