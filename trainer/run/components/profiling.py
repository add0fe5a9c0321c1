"""On-request torch.profiler traces of a few training steps, one chrome trace per rank.

``profile.step=k`` records steps k .. k + profile.steps - 1 and writes
``<run_dir>/profile/rank<r>.json`` (open in chrome://tracing or https://ui.perfetto.dev). The trace shows
each collective (``c10d::`` / ``gloo:`` / ``nccl:`` events, and FSDP's ``FSDP::all_gather``) next to
the matmuls of the same step, which is how the communication/compute overlap is read off.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
from torch.profiler import ProfilerActivity, profile

from trainer.run.config import ProfileConfig
from trainer.run.loop import Component, Control, StepOutcome


class StepProfiler(Component):
    """Starts before step ``profile.step`` and stops (writing the trace) after ``profile.step + profile.steps - 1``."""

    def __init__(self, cfg: ProfileConfig, *, run_dir: Path, rank: int):
        self.path = run_dir / "profile" / f"rank{rank}.json"
        self.first, self.last = cfg.step, cfg.step + cfg.steps - 1
        self._prof: Optional[profile] = None

    def step_begin(self, step: int) -> None:
        if step == self.first and self.first > 0:
            activities = [ProfilerActivity.CPU]
            if torch.cuda.is_available():
                activities.append(ProfilerActivity.CUDA)
            self._prof = profile(activities=activities)
            self._prof.start()

    def step_end(self, outcome: StepOutcome, control: Control) -> None:
        if self._prof is not None and outcome.step >= self.last:
            self.close()

    def close(self) -> None:
        """Write the trace (also when the run ends before the last profiled step)."""
        if self._prof is None:
            return
        self._prof.stop()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._prof.export_chrome_trace(str(self.path))
        self._prof = None
