"""Typed configs for the data pipeline (OmegaConf structured configs), validated as they are built.

Like every other config, a bad value fails in ``__post_init__``, when the composed config becomes
dataclasses at start-up (before any process group exists), naming the key and the fix. The checks that
need the whole config (at least one source) are ``DataConfig.check``, which start-up and ``prepare_data``
both call: a schema default must be constructible without sources.

OmegaConf 2.3 cannot type a field as ``typing.Literal``, so modes are ``str`` enums whose
names equal their values; YAML then reads ``format: jsonl`` naturally.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Optional

from data.instructions import InstructionsConfig
from data.sources import BadRecordPolicy, SourceFormat
from structured import structured_entry


@dataclass
class TokenizerConfig:
    """Which tokenizer to use, or how to train one (LLaMA's sentencepiece BPE settings)."""

    path: Optional[str] = None
    """An existing sentencepiece ``tokenizer.model``; None trains one from the train split into cache_dir."""
    vocab_size: int = 8192
    """Vocabulary size of a trained tokenizer (ignored when ``path`` is given)."""
    character_coverage: float = 0.99995
    """Fraction of characters covered by pieces; the rest go through byte fallback."""
    max_sentences: int = 200_000
    """Cap on training lines fed to sentencepiece, split across sources by weight; keeps training fast."""
    max_sentence_length: int = 4192
    """Lines longer than this many bytes are skipped during tokenizer training."""
    num_threads: int = 2
    """Threads sentencepiece uses while training."""

    def __post_init__(self) -> None:
        if self.path is None and self.vocab_size < 260:
            # 256 byte-fallback pieces + unk/bos/eos must fit before any merge is learned.
            raise _fail("data.tokenizer.vocab_size", f"got {self.vocab_size}", "use at least 260")


@dataclass
class SourceConfig:
    """One corpus in the mixture."""

    paths: list[str] = field(default_factory=list)
    """Files, directories (recursive) or globs; the entry ``stdlib`` means the interpreter's stdlib *.py files."""
    format: SourceFormat = SourceFormat.auto
    """auto picks by extension: .jsonl/.ndjson -> jsonl, .parquet -> parquet, anything else -> text."""
    text_field: str = "text"
    """JSONL key / Parquet column that holds a document's text."""
    weight: float = 1.0
    """Sampling weight in the mixture; weights are normalised, so they need not sum to 1."""
    max_files: Optional[int] = None
    """Keep only the first N files in sorted order (a deterministic cap for quick runs)."""

    def __post_init__(self) -> None:
        self.format = SourceFormat(self.format)

    def check(self, *, name: str) -> None:
        """The checks a source must pass to be used (its name in the messages: ``data.sources.<name>``)."""
        weight = float(self.weight)
        if not math.isfinite(weight) or weight <= 0:
            raise _fail(f"data.sources.{name}.weight", f"got {self.weight}", "use a weight > 0 or remove the source")
        if not self.paths:
            raise _fail(f"data.sources.{name}.paths", "is empty", "list files, directories, globs or 'stdlib'")
        if self.max_files is not None and self.max_files < 1:
            raise _fail(f"data.sources.{name}.max_files", f"got {self.max_files}", "use null or a count >= 1")


@dataclass
class DataConfig:
    """The data pipeline: sources, tokenizer, cache and packing."""

    sources: dict[str, Any] = field(default_factory=dict)
    """Named corpora and their mixture weights, each a ``SourceConfig`` (after ``__post_init__``). Typed
    ``Any`` so that Hydra can add one from the command line, ``+data.sources.web={paths: [...], weight: 2}``
    or ``+data.sources.web.paths=[...]`` (``structured.py`` says why); its fields are still type-checked."""
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    """Tokenizer to load or train."""
    cache_dir: str = "cache"
    """Where the trained tokenizer and token shards go (relative to the working directory)."""
    seq_len: int = 256
    """Tokens per training sequence; a sample is a window of seq_len + 1 tokens."""
    val_fraction: float = 0.02
    """Probability that a document (decided by a stable hash of its id) goes to the val split."""
    num_proc: int = 2
    """Worker processes for tokenization."""
    shard_bytes: int = 64 * 2**20
    """Input bytes per shard: consecutive files are grouped until this size (one file is never split)."""
    progress: bool = True
    """Show a tqdm progress bar on stderr while tokenizing."""
    bad_records: BadRecordPolicy = BadRecordPolicy.error
    """A malformed record (a JSONL line that is not a JSON object with a string ``text_field``, an unreadable
    Parquet row group): ``error`` stops with the file and line (or row group); ``skip`` skips it and counts it
    in the log and in the shard sidecars (``bad_records_skipped``)."""
    prepare_timeout_minutes: float = 720.0
    """How long the other ranks wait for rank 0 to train the tokenizer and write the shards (a large corpus
    takes hours on one node); the process group's own timeout (``parallel.pg_timeout_s``, 2 h) may be too short."""
    instructions: InstructionsConfig = field(default_factory=InstructionsConfig)
    """Finetuning data (data/instructions.py): with ``instructions.train`` set the run trains on instruction
    records, packed and document-masked, with the loss on the responses only; ``sources`` are not read."""
    document_mask: bool = False
    """Attention within documents only: each document packed into a training sequence attends to itself alone,
    its positions restarting at 0 (Llama 3's choice; LLaMA's, the default, lets attention cross the EOS/BOS
    boundaries of the concatenated stream)."""
    skip_samples: list[list[int]] = field(default_factory=list)
    """Global training samples never to train on, as ``[first, stop)`` ranges of whole global batches
    (``data.skip_samples=[[2048,4096]]``), e.g. the batches of a loss spike when restarting by hand
    (``spike.action=rollback`` does it by itself). Resumed runs keep skipping what their checkpoint skipped."""

    def __post_init__(self) -> None:
        self.sources = {
            str(name): structured_entry(SourceConfig, entry, key=f"data.sources.{name}")
            for name, entry in self.sources.items()
        }
        for name, src in self.sources.items():
            src.check(name=name)
        self.bad_records = BadRecordPolicy(self.bad_records)
        if not 0.0 <= self.val_fraction < 1.0:
            raise _fail("data.val_fraction", f"got {self.val_fraction}", "use a value in [0, 1)")
        if self.seq_len < 1:
            raise _fail("data.seq_len", f"got {self.seq_len}", "use a positive sequence length")
        if self.num_proc < 1:
            raise _fail("data.num_proc", f"got {self.num_proc}", "use 1 or more worker processes")
        if self.prepare_timeout_minutes <= 0:
            raise _fail("data.prepare_timeout_minutes", f"got {self.prepare_timeout_minutes}", "use a positive number")
        if self.shard_bytes < 1:
            raise _fail("data.shard_bytes", f"got {self.shard_bytes}", "use a positive byte count")
        for entry in self.skip_samples:
            if len(entry) != 2 or not 0 <= entry[0] < entry[1]:
                raise _fail("data.skip_samples", f"got {entry!r}", "give [first, stop) pairs with 0 <= first < stop")

    def check(self) -> None:
        """Everything ``__post_init__`` checks, again (a config may have been changed since), and what needs
        the whole config: at least one source."""
        if not self.sources:
            raise _fail("data.sources", "no sources configured", "add at least one source, e.g. data=stdlib")
        self.__post_init__()
        self.tokenizer.__post_init__()


def _fail(key: str, problem: str, fix: str) -> ValueError:
    return ValueError(f"{key}: {problem}; {fix}")


def normalized_weights(cfg: DataConfig) -> dict[str, float]:
    """Mixture weights scaled to sum to 1, in config order."""
    total = sum(float(src.weight) for src in cfg.sources.values())
    return {name: float(src.weight) / total for name, src in cfg.sources.items()}
