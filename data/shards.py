"""Token shards: a raw ``.bin`` of token ids plus a JSON sidecar that says what made it.

One ``ShardTask`` tokenizes a group of consecutive input files and writes one shard per split
(``train/<source>/shard_NNNNN.bin`` and ``val/<source>/shard_NNNNN.bin``). A shard counts as
finished only when its sidecar exists and describes exactly this task; sidecars are written
last, after both ``.bin`` files are in place, so a crash never leaves a finished-looking shard.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from data.sources import BadRecordPolicy, BadRecords, SourceFile, is_val, iter_documents
from data.tokenizer import cached_tokenizer

logger = logging.getLogger(__name__)
SPLITS = ("train", "val")
SHARD_FORMAT_VERSION = 1


def token_dtype(vocab_size: int) -> np.dtype:
    """Smallest unsigned dtype that holds every id: uint16 up to 65536 ids, else uint32."""
    return np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)


def sidecar_path(bin_path: str | Path) -> Path:
    return Path(bin_path).with_suffix(".json")


def read_sidecar(bin_path: str | Path) -> dict[str, Any]:
    with open(sidecar_path(bin_path), encoding="utf-8") as fh:
        return json.load(fh)


@dataclass(frozen=True)
class ShardTask:
    """Everything a worker needs to tokenize one file group (picklable, plain values)."""

    source: str
    """Source name, the directory under each split."""
    index: int
    """Shard number within the source."""
    files: tuple[SourceFile, ...]
    """Consecutive input files of this shard."""
    text_field: str
    """JSONL key / Parquet column with the text."""
    val_fraction: float
    """Split probability; part of the shard identity because it changes the contents."""
    tokenizer_path: str
    """Model file the worker loads."""
    tokenizer_sha256: str
    """Identity of the tokenizer, recorded in and checked against the sidecar."""
    vocab_size: int
    """Decides the token dtype."""
    out_dir: str
    """Root of this tokenizer's shards; bins go to ``<out_dir>/<split>/<source>/``."""
    bad_records: BadRecordPolicy = BadRecordPolicy.error
    """What a malformed record does; not part of the identity (a clean shard serves either policy), but a
    shard that skipped records is not finished for a run that wants ``error`` (it re-reads and stops there)."""

    @property
    def input_bytes(self) -> int:
        return sum(file.size for file in self.files)

    def bin_path(self, split: str) -> Path:
        return Path(self.out_dir) / split / self.source / f"shard_{self.index:05d}.bin"

    def identity(self, split: str) -> dict[str, Any]:
        """Sidecar fields that must match for a shard to be reused."""
        return {
            "format_version": SHARD_FORMAT_VERSION,
            "split": split,
            "source": self.source,
            "shard_index": self.index,
            "tokenizer_sha256": self.tokenizer_sha256,
            "vocab_size": self.vocab_size,
            "dtype": token_dtype(self.vocab_size).name,
            "val_fraction": self.val_fraction,
            "text_field": self.text_field,
            "inputs": [{**asdict(file), "format": file.format.value} for file in self.files],
        }


def _shard_matches(task: ShardTask, split: str) -> bool:
    bin_path = task.bin_path(split)
    try:
        sidecar = read_sidecar(bin_path)
        bin_size = bin_path.stat().st_size
    except (OSError, ValueError):
        return False
    expected = task.identity(split)
    if any(sidecar.get(key) != value for key, value in expected.items()):
        return False
    if task.bad_records == BadRecordPolicy.error and sidecar.get("bad_records_skipped", 0) > 0:
        return False
    return bin_size == sidecar.get("num_tokens", -1) * np.dtype(sidecar["dtype"]).itemsize


def is_finished(task: ShardTask) -> bool:
    """True when both splits' shards exist and their sidecars describe this exact task."""
    return all(_shard_matches(task, split) for split in SPLITS)


def _tmp_name(path: Path) -> Path:
    """A hidden per-process sibling of ``path``, renamed over it once complete."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def _write_json_atomic(path: Path, payload: dict[str, Any]) -> None:
    tmp = _tmp_name(path)
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(payload, fh, indent=1)
    os.replace(tmp, path)


def tokenize_shard(task: ShardTask) -> dict[str, dict[str, Any]]:
    """Tokenizes a task's files into one shard per split; returns the sidecars by split.

    Each document becomes [BOS] + tokens + [EOS], appended to its split's stream, so packed
    windows that cross documents still see the boundary.
    """
    tokenizer = cached_tokenizer(task.tokenizer_path)
    assert tokenizer.sha256 == task.tokenizer_sha256, "tokenizer file changed while preparing shards"
    dtype = token_dtype(task.vocab_size)
    # A stale sidecar could vouch for a half-replaced bin if we crash below; drop it first.
    for split in SPLITS:
        task.bin_path(split).parent.mkdir(parents=True, exist_ok=True)
        sidecar_path(task.bin_path(split)).unlink(missing_ok=True)
    tmp_paths = {split: _tmp_name(task.bin_path(split)) for split in SPLITS}
    counts = {split: {"num_tokens": 0, "num_documents": 0} for split in SPLITS}
    bad = BadRecords(policy=BadRecordPolicy(task.bad_records))
    handles = {split: open(tmp, "wb") for split, tmp in tmp_paths.items()}
    try:
        for file in task.files:
            for doc_id, text in iter_documents(file, source=task.source, text_field=task.text_field, bad=bad):
                split = "val" if is_val(doc_id, val_fraction=task.val_fraction) else "train"
                ids = np.asarray(tokenizer.encode(text, bos=True, eos=True), dtype=dtype)
                ids.tofile(handles[split])
                counts[split]["num_tokens"] += int(ids.size)
                counts[split]["num_documents"] += 1
    finally:
        for fh in handles.values():
            fh.close()
    # Both bins are renamed before either sidecar is written: a sidecar is the "done" marker.
    for split, tmp in tmp_paths.items():
        os.replace(tmp, task.bin_path(split))
    if bad.skipped:
        logger.warning("data.sources.%s: shard %d skipped %d bad record(s) (data.bad_records=skip); first: %s",
                       task.source, task.index, bad.skipped, bad.locations[0])  # fmt: skip
    # A skipped record has no split (it was never read as a document), so both sidecars count the shard's.
    skipped = {"bad_records_skipped": bad.skipped, "bad_record_locations": bad.locations}
    sidecars = {split: {**task.identity(split), **counts[split], **skipped} for split in SPLITS}
    for split, sidecar in sidecars.items():
        _write_json_atomic(sidecar_path(task.bin_path(split)), sidecar)
    return sidecars
