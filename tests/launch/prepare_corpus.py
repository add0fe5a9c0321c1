"""A small two-source corpus and the overrides that point the training config at it (data preparation tests)."""

from __future__ import annotations

import json
from pathlib import Path

from tests.data.conftest import code_document, write_text_files


def write_corpus(root: Path) -> Path:
    """``root/web``: 6 JSONL files of 12 documents; ``root/code``: 5 text files. About 40 KB in all."""
    (root / "web").mkdir(parents=True)
    for part in range(6):
        docs = [json.dumps({"text": code_document(seed=100 * part + i, lines=6)}) for i in range(12)]
        (root / "web" / f"part-{part}.jsonl").write_text("\n".join(docs) + "\n")
    write_text_files(root / "code", count=5, first_seed=1000)
    return root


def corpus_overrides(root: Path, *, cache: Path) -> list[str]:
    """The training config with the built-in corpus replaced by ``root``'s two sources (added with '+', as a
    user would) and ~1 KB shard groups, so there are more groups than tasks."""
    return [
        "~data.sources.python_stdlib",
        f"+data.sources.web={{paths: [{root / 'web'}], format: jsonl, weight: 2.0}}",
        f"+data.sources.code={{paths: [{root / 'code'}]}}",
        f"data.cache_dir={cache}", "data.tokenizer.vocab_size=500", "data.shard_bytes=1000", "data.num_proc=1",
        "data.progress=false", "data.val_fraction=0.1",
    ]  # fmt: skip


def shard_tree(cache: Path) -> dict[str, bytes]:
    """Every file under the cache's shards directory (bins, sidecars, index), by relative path."""
    root = cache / "shards"
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}
