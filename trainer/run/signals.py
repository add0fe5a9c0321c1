"""Stop signals: SIGUSR2 / SIGTERM (Slurm's preemption warning, a scheduler's stop) ask for a checkpoint and
a clean stop. The handler only sets a flag; the checkpointing component (trainer/run/components/
checkpointing.py) acts on it at the end of a step, after every rank has agreed (one collective,
``trainer.parallel.distributed.agree``), so all ranks save the same step.
"""

from __future__ import annotations

import signal
import threading
from typing import Any, Optional



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
