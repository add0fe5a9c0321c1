"""``meta.json``: everything of a checkpoint directory that is not a tensor, as one type.

The one owner of the checkpoint format's non-tensor half: the trainer's ``Checkpointer`` writes and reads
it, and so does ``trainer.checkpoint.hf_interop`` (export reads it, import writes it). Plain JSON, never a pickle.
Fields a checkpoint written by an earlier version lacks take their defaults.

A checkpoint directory holds, besides the DCP files: ``meta.json`` and, when the run had one, its
tokenizer (``tokenizer.model``), so that a checkpoint is self-contained: evaluating or exporting it needs
no data cache.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from model.config import ModelArgs

FORMAT = "llama-pretrain-checkpoint"
VERSION = 1
META = "meta.json"
TOKENIZER = "tokenizer.model"
# What decides parameter shapes: a checkpoint whose values differ cannot be loaded into this model. The
# SwiGLU width is compared as the resulting size: several (multiple_of, ffn_dim_multiplier) give the same.
SHAPE_FIELDS = ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "ffn_hidden_dim")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: missing, damaged, or made for another model."""


@dataclass
class CheckpointMeta:
    step: int
    """The optimizer steps done (0: weights only, e.g. imported from Hugging Face)."""
    tokens: int = 0
    """Training tokens consumed, all ranks together."""
    config: dict[str, Any] = field(default_factory=dict)
    """The run's resolved config (``config.model`` at least: the model's fields)."""
    scheduler: Optional[dict[str, Any]] = None
    """The LR scheduler's state_dict; None for weights-only checkpoints."""
    loader: Optional[dict[str, Any]] = None
    """The data loader's state (global counters, the same on every rank)."""
    rng: list[str] = field(default_factory=list)
    """Each rank's torch RNG state, base64; restored only at the same world size."""
    world_size: int = 1
    time: float = 0.0
    wandb_id: Optional[str] = None
    """The wandb run to continue on resume."""
    tokenizer: Optional[str] = None
    """The tokenizer's file name inside the checkpoint directory (``tokenizer.model``), if there is one."""
    files: dict[str, int] = field(default_factory=dict)
    """The size of every file of the directory, so a truncated or missing one is named before loading."""
    format: str = FORMAT
    version: int = VERSION

    # --- reading and writing ---------------------------------------------------------------------------------

    @classmethod
    def read(cls, path: Path) -> CheckpointMeta:
        """The meta of checkpoint ``path``, after checking every recorded file is there with its recorded size.

        Raises CheckpointError naming the checkpoint and what is wrong.
        """
        path = Path(path)
        if not path.is_dir():
            raise CheckpointError(f"checkpoint {path} does not exist (or is not a directory)")
        meta_path = path / META
        if not meta_path.is_file():
            raise CheckpointError(f"checkpoint {path} is incomplete or damaged: {META} is missing")
        try:
            raw = json.loads(meta_path.read_text())
        except json.JSONDecodeError as err:
            raise CheckpointError(f"checkpoint {path} is damaged: {META} is not valid JSON ({err})") from err
        if not isinstance(raw, dict) or raw.get("format") != FORMAT or raw.get("version") != VERSION:
            got = raw if not isinstance(raw, dict) else (raw.get("format"), raw.get("version"))
            raise CheckpointError(f"checkpoint {path} has format/version {got!r}; this trainer reads {FORMAT!r} "
                                  f"version {VERSION}")  # fmt: skip
        if raw.get("tokenizer") is None and raw.get("tokenizer_path"):  # written before the tokenizer was copied in
            raw["tokenizer"] = raw["tokenizer_path"]
        known = {f.name for f in dataclasses.fields(cls)}
        try:
            meta = cls(**{k: v for k, v in raw.items() if k in known})
        except TypeError as err:
            raise CheckpointError(f"checkpoint {path}: {META} lacks a field ({err})") from err
        meta._check_files(path)
        return meta

    def _check_files(self, path: Path) -> None:
        for name, size in self.files.items():
            file = path / name
            if not file.is_file():
                raise CheckpointError(f"checkpoint {path} is damaged: file {name} is missing")
            if file.stat().st_size != size:
                raise CheckpointError(
                    f"checkpoint {path} is damaged: file {name} has {file.stat().st_size} bytes, {size} were written "
                    "(truncated copy?)"
                )

    def write(self, path: Path) -> None:
        """Record the sizes of ``path``'s files, then write ``meta.json`` last and atomically."""
        path = Path(path)
        self.files = {p.name: p.stat().st_size for p in sorted(path.iterdir()) if p.is_file() and p.name != META}
        partial = path / (META + ".partial")
        partial.write_text(json.dumps(dataclasses.asdict(self), indent=1))
        os.replace(partial, path / META)

    # --- what it says ----------------------------------------------------------------------------------------

    def model_args(self, *, path: Path) -> ModelArgs:
        """The checkpoint's model; CheckpointError if ``config.model`` is missing or invalid."""
        fields = self.config.get("model") if isinstance(self.config, dict) else None
        if not isinstance(fields, dict):
            raise CheckpointError(f"checkpoint {path}: {META} has no config.model (the model's fields)")
        try:
            return ModelArgs(**fields)
        except (TypeError, ValueError) as err:
            raise CheckpointError(f"checkpoint {path}: {META} config.model is invalid: {err}") from err

    def check_model_matches(self, args: ModelArgs, *, path: Path) -> None:
        """CheckpointError listing every shape-deciding field in which the checkpoint differs from ``args``."""
        saved, wanted = _shapes(self.model_args(path=path)), _shapes(args)
        diff = {f: (saved[f], v) for f, v in wanted.items() if saved[f] != v}
        if diff:
            listing = ", ".join(f"model.{f}: checkpoint {a} vs config {b}" for f, (a, b) in diff.items())
            raise CheckpointError(f"checkpoint {path} was saved for a different model shape ({listing})")

    def tokenizer_path(self, *, path: Path) -> Optional[Path]:
        """The tokenizer file of checkpoint ``path``, if it names one that exists (in the directory, else as given)."""
        if not self.tokenizer:
            return None
        for candidate in (Path(path) / self.tokenizer, Path(self.tokenizer)):
            if candidate.is_file():
                return candidate
        return None


def _shapes(args: ModelArgs) -> dict[str, Any]:
    return {f: getattr(args, f) for f in SHAPE_FIELDS}
