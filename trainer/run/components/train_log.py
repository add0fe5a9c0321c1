"""The training metrics of a step, logged every ``logging.log_every`` steps (and at the first and last):
``train/loss``, ``lr``, ``grad_norm``, ``tokens_per_sec``, ``mfu``, ``step_time_s``, ``data_wait_frac`` and
the memory readings, through the run's ``MetricLogger``.

Throughput counts the time of the steps themselves (waiting for data, forward, backward, optimizer step)
over the steps since the last record; validation, task evaluation and checkpoint saves happen between
steps and are not training time, so they never lower it.
"""

from __future__ import annotations

from typing import Optional

import torch

from trainer.run.device import memory_stats
from trainer.run.loop import Component, Control, StepOutcome
from trainer.run.metrics import MetricLogger
from trainer.run.records import TrainResult


class TrainLog(Component):
    def __init__(self, *, metrics: MetricLogger, result: TrainResult, log_every: int, max_steps: int,
                 flops_per_token: int, peak_flops: Optional[float], device: torch.device):  # fmt: skip
        """
        Args:
            result: the run's summary; ``tokens_per_sec`` (this process's steps only) is set at the end.
            peak_flops: FLOP/s of all processes together; None where unknown (no MFU is logged).
        """
        self.metrics, self.result, self.device = metrics, result, device
        self.log_every, self.max_steps = log_every, max_steps
        self.flops_per_token, self.peak_flops = flops_per_token, peak_flops
        self.first_step = 1
        self._window = _Window()
        self._run = _Window()

    def start(self, *, first_step: int) -> None:
        self.first_step = first_step

    def step_end(self, outcome: StepOutcome, control: Control) -> None:
        self._window.add(outcome)
        self._run.add(outcome)
        step = outcome.step
        if step % self.log_every and step not in (self.first_step, self.max_steps):
            return
        w = self._window
        tps = w.tokens / w.seconds
        mfu = {} if self.peak_flops is None else {"mfu": tps * self.flops_per_token / self.peak_flops}
        self.metrics.log(
            {"loss": outcome.loss, "lr": outcome.lr, "grad_norm": outcome.grad_norm, "tokens_per_sec": tps, **mfu,
             "step_time_s": w.seconds / w.steps, "data_wait_frac": w.data_s / w.seconds, **memory_stats(self.device)},
            step=step, tokens=outcome.total_tokens, namespace="train", console=f"train[{step}/{self.max_steps}]",
        )  # fmt: skip
        self._window = _Window()

    def end(self) -> None:
        run = self._run
        self.result.tokens_per_sec = run.tokens / run.seconds if run.seconds else 0.0


class _Window:
    """Steps, tokens and seconds added up over some steps."""

    def __init__(self) -> None:
        self.steps, self.tokens, self.data_s, self.seconds = 0, 0, 0.0, 0.0

    def add(self, outcome: StepOutcome) -> None:
        self.steps += 1
        self.tokens += outcome.tokens
        self.data_s += outcome.data_s
        self.seconds += outcome.data_s + outcome.compute_s
