"""Deterministic fault injection for the tests of the run's guards (``faults.*``); all off by default.

Nothing here belongs in a real run: each fault stands in for something a large run meets by chance, made to
happen at a chosen step, rank or sample, so a test can check what the user sees afterwards.

- ``poison_samples``: the global training samples in these ``[first, stop)`` ranges get a label the model has
  never seen as a target at every position: bad data whose loss and gradient spike (the spike guard's test).
- ``slow_rank`` / ``slow_factor``: that rank's device computes ``slow_factor`` times slower (each of its
  straggler-probe matmuls runs that many times), as a throttled GPU would (the straggler monitor's test).
- ``hang_rank`` / ``hang_step``: that rank blocks forever at the start of that step, before the step's first
  collective, as a rank stuck in a driver call or a dead file system would; the others then wait in that
  collective (the hang watchdog's test). Only in the first attempt: a run restarted by torchrun
  (``TORCHELASTIC_RESTART_COUNT`` > 0) goes on.
- ``oom_step``: every rank raises ``torch.OutOfMemoryError`` at the start of that step, as an allocation too
  large for the device would (the out-of-memory report's test, on any device).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Iterator

import torch

from data import PackedLoader
from trainer.run.loop import Component


@dataclass
class FaultConfig:
    """Test-only fault injection (trainer/run/faults.py)."""

    poison_samples: list[list[int]] = field(default_factory=list)
    """Global training samples ``[first, stop)`` whose labels are replaced by ``poison_label``."""
    poison_label: int = -1
    """The label poisoned samples get; -1: the last token id of the vocabulary."""
    slow_rank: int = -1
    """The rank whose compute is slowed (-1: none)."""
    slow_factor: int = 1
    """How many times slower that rank computes."""
    hang_rank: int = -1
    """The rank that blocks (-1: none)."""
    hang_step: int = 0
    """The step at whose start it blocks."""
    oom_step: int = 0
    """The step at whose start every rank runs out of memory (0: never)."""

    @property
    def injects_in_loop(self) -> bool:
        return self.hang_rank >= 0 or self.oom_step > 0


class FaultInjector(Component):
    """Blocks ``hang_rank`` at the start of ``hang_step`` (first attempt only); runs out of memory at
    ``oom_step``."""

    def __init__(self, cfg: FaultConfig, *, rank: int):
        self.cfg, self.rank = cfg, rank

    def step_begin(self, step: int) -> None:
        first_attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"
        if self.rank == self.cfg.hang_rank and step == self.cfg.hang_step and first_attempt:
            injected_hang()
        if step == self.cfg.oom_step:
            raise torch.OutOfMemoryError(f"CUDA out of memory. Tried to allocate 20.00 GiB (injected at step {step})")


def injected_hang() -> None:
    """Block forever (the frame the hang report's stack must show)."""
    while True:
        time.sleep(1.0)


def poisoned(batches: Iterator[dict[str, torch.Tensor]], *, loader: PackedLoader, cfg: FaultConfig,
             vocab_size: int) -> Iterator[dict[str, torch.Tensor]]:  # fmt: skip
    """``batches`` (drawn from ``loader``) with the rows of poisoned global samples relabelled."""
    label = cfg.poison_label if cfg.poison_label >= 0 else vocab_size - 1
    per_rank = loader.batch_size
    for batch in batches:
        # The batch just drawn ends where the loader now stands; this rank's rows are its dp_rank-th slice.
        first = loader.consumed_samples - loader.dp_size * per_rank + loader.dp_rank * per_rank
        rows = [i for i in range(per_rank) if any(a <= first + i < b for a, b in cfg.poison_samples)]
        if rows:
            batch = dict(batch, labels=batch["labels"].clone())
            batch["labels"][rows] = label
        yield batch
