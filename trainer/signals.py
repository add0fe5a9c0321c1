"""Stop signals, and decisions every rank must take alike.

SIGUSR2 / SIGTERM (Slurm's preemption warning, a scheduler's stop) ask for a checkpoint and a clean stop.
The handler only sets a flag; the loop acts on it at the end of a step, after every rank has agreed (one
collective, ``agree``), so all ranks save the same step.
"""

from __future__ import annotations

import signal
import threading
from typing import Any, Optional

import torch
import torch.distributed as dist


class StopSignals:
    """While entered, SIGUSR2 and SIGTERM set ``received`` instead of ending the process."""

    SIGNALS = (signal.SIGUSR2, signal.SIGTERM)

    def __init__(self, *, enabled: bool):
        # Signal handlers can only be installed from the main thread (tests may run training elsewhere).
        self.enabled = enabled and threading.current_thread() is threading.main_thread()
        self.received: Optional[int] = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        if self.enabled:
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.received = signum

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def agree(flags: dict[str, bool], *, device: torch.device) -> dict[str, bool]:
    """Each flag true on every rank when it is true on any (one all-reduce for all of them): a decision to
    save or stop that differed between ranks would deadlock their collectives."""
    values = torch.tensor([int(v) for v in flags.values()], device=device)
    if dist.is_initialized():
        dist.all_reduce(values, op=dist.ReduceOp.MAX)
    return dict(zip(flags, (bool(v) for v in values.tolist())))
