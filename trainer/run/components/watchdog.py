"""The hang watchdog: when the run makes no progress for too long, every rank says where it is stuck and
exits, so that the launcher restarts the job from its newest checkpoint instead of letting it sit until the
process group's timeout with no trace of where.

A thread per rank watches the loop's ``Progress`` (the step and the phase: data, forward, backward,
optimizer, checkpoint, eval, ...). Progress is a finished step, or the end of side work; how long the run may
go without it depends on the phase (``WatchdogConfig``: the steps, the first step, side work). When that is
exceeded the thread writes ``<run_dir>/hang/rank<N>.txt``: the step, the phase and for how long, the Python
stack of every thread of the process, and on CUDA the NCCL flight recorder's record of the collectives in
flight (``compat.nccl_flight_recorder``). It logs where the run was, waits ``grace_s`` so that the other ranks
(whose watchdogs fire within ``poll_s`` of its own: a hang stops them all at the same collective) write
theirs, and ends the process with exit code 86 (``EXIT_HANG``): torchrun's ``--max-restarts`` restarts the
workers, which resume from the newest checkpoint; the Slurm script (launch/slurm.sbatch) requeues a job
that ended on a hang report.
"""

from __future__ import annotations

import faulthandler
import logging
import os
import socket
import threading
import time
from pathlib import Path
from typing import Callable

import torch

from compat import nccl_flight_recorder
from trainer.run.config import WatchdogConfig
from trainer.run.loop import Component, Progress

logger = logging.getLogger(__name__)

EXIT_HANG = 86
"""The exit code of a process the watchdog ended (distinct from a crash's 1 and a signal's 128 + n)."""
HANG_DIR = "hang"


class HangWatchdog(Component):
    def __init__(self, cfg: WatchdogConfig, *, progress: Progress, run_dir: Path, rank: int, device: torch.device,
                 exit: Callable[[int], None] = os._exit):  # fmt: skip
        """
        Args:
            progress: the loop's, updated as it goes.
            exit: how the process ends (``os._exit``: the main thread is stuck, so nothing can be unwound).
        """
        self.cfg, self.progress, self.rank, self.device, self._exit = cfg, progress, rank, device, exit
        self.path = Path(run_dir) / HANG_DIR / f"rank{rank}.txt"
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self, *, first_step: int) -> None:
        self._thread = threading.Thread(target=self._watch, name="hang-watchdog", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.cfg.poll_s + 1)

    def allowance_s(self) -> float:
        """How long the current phase may go without progress."""
        p = self.progress
        if p.phase in Progress.SIDE_WORK:
            return self.cfg.side_work_timeout_s
        if p.steps_done == 0:
            return self.cfg.first_step_timeout_s
        if self.cfg.timeout_s is not None:
            return self.cfg.timeout_s
        return max(self.cfg.min_timeout_s, self.cfg.step_multiple * p.slowest_step_s)

    def stalled_s(self) -> float:
        """Seconds since the last progress (side work: since it began)."""
        p = self.progress
        since = p.phase_since if p.phase in Progress.SIDE_WORK else p.last_progress
        return time.monotonic() - since

    def _watch(self) -> None:
        while not self._stop.wait(self.cfg.poll_s):
            stalled, allowed = self.stalled_s(), self.allowance_s()
            if stalled > allowed:
                self.report(stalled_s=stalled, allowed_s=allowed)
                self._stop.wait(self.cfg.grace_s)
                self._exit(EXIT_HANG)
                return

    def report(self, *, stalled_s: float, allowed_s: float) -> Path:
        """Write this rank's hang report and log where the run was; returns the report's path."""
        p = self.progress
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("w") as out:
            out.write(f"rank {self.rank} on {socket.gethostname()} (pid {os.getpid()}), "
                      f"{time.strftime('%Y-%m-%dT%H:%M:%S%z')}\n"
                      f"step {p.step}, phase {p.phase}: no progress for {stalled_s:.0f} s (allowed {allowed_s:.0f} s); "
                      f"{p.steps_done} steps finished in this process, the slowest in {p.slowest_step_s:.2f} s\n\n"
                      "Python stacks of every thread (most recent call first):\n")  # fmt: skip
            out.flush()
            faulthandler.dump_traceback(file=out, all_threads=True)
            if self.device.type == "cuda":
                out.write("\n" + (nccl_flight_recorder() or "(no NCCL flight recorder in this torch)") + "\n")
        logger.error("hang: no progress for %.0f s (allowed %.0f s) at step %d, phase %s; stacks in %s; exiting with "
                     "code %d so the launcher restarts from the newest checkpoint", stalled_s, allowed_s, p.step, p.phase,
                     self.path, EXIT_HANG)  # fmt: skip
        return self.path
