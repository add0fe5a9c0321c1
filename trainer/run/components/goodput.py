"""Records where the run's time goes (trainer/run/goodput.py reads it) and advises on the checkpoint interval.

Rank 0 appends to ``<run_dir>/events.jsonl``: an ``attempt`` record at the loop's start, a ``progress``
record every ``goodput.record_every_s`` seconds and at the end (the loop's ``Progress.seconds``: training,
checkpoint, eval, rollback, other). At the end the whole run directory's goodput, restarts included, goes into
``summary.json`` (``goodput``) and the metrics (``goodput/goodput``, ``goodput/<category>_h``).

Checkpoint-interval advice: once a save's stall is measured (or known from an earlier attempt), the
Young/Daly interval sqrt(2 x stall x MTBF) is logged for this job's GPU count at ``goodput.failures_per_gpu_hour``,
next to the configured interval.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Optional

import psutil

from trainer.run.config import GoodputConfig
from trainer.run.goodput import EVENTS_FILE, goodput, job_mtbf_s, read_events, young_daly_interval_s
from trainer.run.loop import Component, Control, Progress, StepOutcome
from trainer.run.metrics import MetricLogger
from trainer.run.records import TrainResult

logger = logging.getLogger(__name__)


class GoodputRecorder(Component):
    def __init__(self, cfg: GoodputConfig, *, run_dir: Path, enabled: bool, progress: Progress, gpus: int,
                 metrics: MetricLogger, result: TrainResult, checkpoint_every_minutes: float):  # fmt: skip
        """
        Args:
            enabled: whether this process writes (rank 0).
            gpus: the job's processes, for the failure rate's MTBF.
        """
        self.cfg, self.enabled, self.progress, self.gpus = cfg, enabled, progress, gpus
        self.metrics, self.result, self.every_minutes = metrics, result, checkpoint_every_minutes
        self.path = Path(run_dir) / EVENTS_FILE
        self._last_record = 0.0
        self._stalls_seen = 0
        self._advised = False
        self._last: Optional[StepOutcome] = None

    def start(self, *, first_step: int) -> None:
        if not self.enabled:
            return
        earlier = read_events(self.path.parent) if self.path.is_file() else []
        self._write({"event": "attempt", "attempt": sum(e.get("event") == "attempt" for e in earlier) + 1,
                     "process_start": psutil.Process().create_time(), "loop_start": time.time(),
                     "resumed_step": first_step - 1, "world_size": self.gpus})  # fmt: skip
        stalls = [e["seconds"] for e in earlier if e.get("event") == "checkpoint_stall"]
        if stalls:
            self._advise(max(stalls), source="an earlier attempt's")
        self._last_record = time.monotonic()

    def step_end(self, outcome: StepOutcome, control: Control) -> None:
        self._last = outcome
        if not self.enabled:
            return
        stalls = self.result.checkpoint_stall_s
        if len(stalls) > self._stalls_seen:
            self._stalls_seen = len(stalls)
            self._write({"event": "checkpoint_stall", "time": time.time(), "step": outcome.step, "seconds": stalls[-1]})
            self._advise(stalls[-1], source="this run's")
        if time.monotonic() - self._last_record >= self.cfg.record_every_s:
            self._record()

    def end(self) -> None:
        if not self.enabled:
            return
        self._record(final=True)
        found = goodput(self.path.parent)
        self.result.goodput = found.as_dict()
        if self._last is not None:
            values = {"goodput": found.goodput, **{f"{k}_h": v / 3600 for k, v in found.seconds.items()}}
            self.metrics.log(values, step=self._last.step, tokens=self._last.total_tokens, namespace="goodput")

    def _record(self, *, final: bool = False) -> None:
        self._write({"event": "progress", "time": time.time(), "step": self.progress.step,
                     "seconds": dict(self.progress.seconds), **({"final": True} if final else {})})  # fmt: skip
        self._last_record = time.monotonic()

    def _advise(self, stall_s: float, *, source: str) -> None:
        if self._advised or stall_s <= 0:
            return
        self._advised = True
        mtbf = job_mtbf_s(gpus=self.gpus, failures_per_gpu_hour=self.cfg.failures_per_gpu_hour)
        interval = young_daly_interval_s(save_s=stall_s, mtbf_s=mtbf)
        logger.info("checkpoint interval: %s saves stall %.1f s; at %.2g failures per GPU-hour %d GPUs fail every "
                    "%.1f h on average, so the Young/Daly interval sqrt(2 x stall x MTBF) is %.1f min "
                    "(checkpoint.every_minutes=%g)", source, stall_s, self.cfg.failures_per_gpu_hour, self.gpus,
                    mtbf / 3600, interval / 60, self.every_minutes)  # fmt: skip

    def _write(self, event: dict) -> None:
        with self.path.open("a") as out:
            out.write(json.dumps(event) + "\n")
