"""Typed config of checkpointing: where, when, what to resume from."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass
class CheckpointConfig:
    """Distributed checkpoints (torch.distributed.checkpoint) of everything a run needs to continue."""

    dir: Optional[str] = None
    """Where checkpoints go; None means ``<run_dir>/checkpoints``."""
    every_steps: int = 1000
    """Save every this many steps (0: not by step count). A run that dies without a stop signal (a node
    failure, an OOM kill) restarts from the newest of these."""
    every_minutes: float = 60.0
    """Also save when this many minutes have passed since the last save (or the start), whatever the step
    count (0: not by time): the bound on lost work when steps are slow or their speed unknown."""
    save_final: bool = True
    """Save after the last step."""
    keep_last_k: int = 3
    """Keep this many newest complete checkpoints, delete older ones; 0 keeps all."""
    async_save: bool = False
    """Stage tensors to host memory, then write them from a background thread while training goes on."""
    resume: Optional[str] = "auto"
    """auto: continue from the newest complete checkpoint in ``dir`` if there is one; a path: from that one
    (it must exist); null: never resume."""
    init_from: Optional[str] = None
    """A checkpoint to take the model weights from (not optimizer or data state) when not resuming, e.g. one
    written by ``python -m launch.hf import``."""
    save_on_signal: bool = True
    """On SIGUSR2 or SIGTERM, save a checkpoint at the end of the current step and stop (Slurm preemption)."""

    def __post_init__(self) -> None:
        if self.every_steps < 0 or self.keep_last_k < 0 or self.every_minutes < 0:
            raise ValueError("checkpoint.every_steps, checkpoint.every_minutes and checkpoint.keep_last_k must be >= 0")
