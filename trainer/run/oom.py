"""What a run leaves behind when the GPU runs out of memory.

With ``trainer.memory_history`` (default on), a CUDA run records the caching allocator's history from its
start: the last 100,000 allocations and frees, each with its Python stack (torch's memory snapshot). When a
step raises ``torch.OutOfMemoryError``, every rank writes ``<run_dir>/oom/rank<N>.pickle`` (the snapshot:
drag it into https://pytorch.org/memory_viz) and ``rank<N>.txt`` (the step and phase, the allocator's
summary), and the run ends with ``TrainingOutOfMemory`` naming them. The entry point (launch/train.py) adds
the planner's prediction for the same layout, ``oom/prediction.txt``, and points to all three.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Optional

import torch

from compat import dump_cuda_memory_snapshot, record_cuda_memory_history

logger = logging.getLogger(__name__)

OOM_DIR = "oom"
HISTORY_ENTRIES = 100_000
"""Allocator events kept (each several KB with its stack): enough for a few steps of a 65B model's blocks."""


class TrainingOutOfMemory(RuntimeError):
    """A step ran out of device memory; ``report`` (and on CUDA ``snapshot``) say where and what held it."""

    def __init__(self, message: str, *, report: Path, snapshot: Optional[Path], step: int, phase: str):
        super().__init__(message)
        self.report, self.snapshot, self.step, self.phase = report, snapshot, step, phase


def start_memory_history(device: torch.device) -> None:
    """Record the CUDA allocator's history from now on (nothing to record on other devices)."""
    if device.type == "cuda":
        record_cuda_memory_history(max_entries=HISTORY_ENTRIES)


def out_of_memory(err: BaseException, *, run_dir: Path, rank: int, step: int, phase: str,
                  device: torch.device) -> TrainingOutOfMemory:  # fmt: skip
    """Write this rank's out-of-memory report (and snapshot) and return the error to raise."""
    folder = Path(run_dir) / OOM_DIR
    folder.mkdir(parents=True, exist_ok=True)
    report, snapshot = folder / f"rank{rank}.txt", None
    lines = [f"rank {rank}, {time.strftime('%Y-%m-%dT%H:%M:%S%z')}: out of memory at step {step}, phase {phase}",
             f"{type(err).__name__}: {err}", ""]  # fmt: skip
    if device.type == "cuda":
        snapshot = folder / f"rank{rank}.pickle"
        try:
            dump_cuda_memory_snapshot(snapshot)
        except Exception as dump_err:  # the report must not fail where the snapshot cannot be taken
            lines.append(f"(no memory snapshot: {type(dump_err).__name__}: {dump_err})")
            snapshot = None
        lines.append(torch.cuda.memory_summary(device))
    else:
        lines.append(f"(no allocator snapshot on {device.type}: the history is recorded on CUDA devices)")
    report.write_text("\n".join(lines) + "\n")
    where = f"{report}" + (f" and {snapshot} (open it at https://pytorch.org/memory_viz)" if snapshot else "")
    logger.error("out of memory at step %d, phase %s: %s", step, phase, where)
    return TrainingOutOfMemory(f"out of memory at step {step} (phase {phase}); the allocator's report: {where}",
                               report=report, snapshot=snapshot, step=step, phase=phase)  # fmt: skip
