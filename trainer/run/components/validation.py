"""The validation loss every ``trainer.eval_every`` steps and after the last: ``val/loss`` and
``val/perplexity`` in the metrics, and ``val_losses`` in the run's summary. Every evaluation scores the
same ``trainer.eval_steps`` batches (a fresh loader with a fixed seed), so the curve compares like with like.
"""

from __future__ import annotations

import math
from typing import Callable

from trainer.run.loop import Component, Control, StepOutcome
from trainer.run.metrics import MetricLogger
from trainer.run.records import TrainResult


class Validation(Component):
    phase = "eval"

    def __init__(self, *, validate: Callable[[], float], every: int, max_steps: int, metrics: MetricLogger,
                 result: TrainResult):  # fmt: skip
        """
        Args:
            validate: the mean validation loss over the same batches every time (a collective).
            every: ``trainer.eval_every``; 0 never validates.
        """
        self.validate, self.every, self.max_steps = validate, every, max_steps
        self.metrics, self.result = metrics, result

    def step_end(self, outcome: StepOutcome, control: Control) -> None:
        step = outcome.step
        if not self.every or (step % self.every and step != self.max_steps):
            return
        loss = self.validate()
        self.result.val_losses[step] = loss
        self.metrics.log({"loss": loss, "perplexity": math.exp(min(loss, 50.0))}, step=step,
                         tokens=outcome.total_tokens, namespace="val")  # fmt: skip
