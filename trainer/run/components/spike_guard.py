"""The loss-spike guard: a step whose loss or gradient norm jumps far above its recent history is a spike,
and ``spike.action`` says what happens (trainer/run/config.py, ``SpikeConfig``, has the thresholds and why):

- ``warn``: log it and train on;
- ``skip``: decline the step's update on every rank (the weights and optimizer state stay as they were);
- ``rollback``: decline it, reload the newest checkpoint from before the spike and never train on the
  batches that caused it (PaLM's recipe); the loader's state records the skipped samples, so a resume keeps
  skipping them. More than ``max_rollbacks`` within ``rollback_window`` steps stops the run;
- ``stop``: decline it and stop with an error naming the step and its batches (the newest checkpoint is
  from before the spike).

Detection uses global values (the step's loss and pre-clip gradient norm are the same on every rank), and the
verdict is agreed over all ranks in one small all-reduce, so ranks can never take different paths. A step
flagged as a spike does not enter the history. Every spike is a record in the metrics (``train/spikes``, the
running count, with its loss, gradient norm and the global samples of its batch) and in ``summary.json``.
"""

from __future__ import annotations

import logging
import math
import statistics
from collections import deque
from typing import Optional

import torch

from data import PackedLoader
from trainer.parallel.distributed import agree
from trainer.run.config import SpikeAction, SpikeConfig
from trainer.run.loop import Component, Control, Rollback, StepOutcome
from trainer.run.metrics import MetricLogger
from trainer.run.records import TrainResult

logger = logging.getLogger(__name__)


class LossSpikeError(RuntimeError):
    """The run stopped on a loss spike (``spike.action=stop``, or too many rollbacks)."""


def spike_reasons(cfg: SpikeConfig, *, loss: float, grad_norm: float, losses: list[float],
                  norms: list[float]) -> list[str]:  # fmt: skip
    """Why (loss, grad_norm) is a spike against the history; empty when it is not."""
    if not (math.isfinite(loss) and math.isfinite(grad_norm)):
        return [f"not finite (loss {loss}, grad norm {grad_norm})"]
    if len(losses) < cfg.min_history:
        return []
    reasons = []
    if cfg.loss_sigmas:
        mean, sd = statistics.fmean(losses), statistics.pstdev(losses)
        if loss > mean + cfg.loss_sigmas * sd:
            reasons.append(f"loss {loss:.4f} > mean {mean:.4f} + {cfg.loss_sigmas:g} x sd {sd:.4f}")
    if cfg.grad_norm_ratio:
        median = statistics.median(norms)
        if grad_norm > cfg.grad_norm_ratio * median:
            reasons.append(f"grad norm {grad_norm:.4g} > {cfg.grad_norm_ratio:g} x median {median:.4g}")
    return reasons


class SpikeGuard(Component):
    def __init__(self, cfg: SpikeConfig, *, loader: PackedLoader, samples_per_step: int, metrics: MetricLogger,
                 result: TrainResult, device: torch.device):  # fmt: skip
        """
        Args:
            loader: the training loader, whose position says which global samples a step trained on.
            samples_per_step: global samples per optimizer step (dp x micro-batch x accumulation).
            result: the run's summary; every spike is added to ``result.spikes``.
        """
        self.cfg, self.loader, self.samples_per_step = cfg, loader, samples_per_step
        self.metrics, self.result, self.device = metrics, result, device
        self._losses: deque[float] = deque(maxlen=cfg.window)
        self._norms: deque[float] = deque(maxlen=cfg.window)
        self._spike: Optional[dict] = None
        self._rollbacks: list[int] = []

    def pre_optim_step(self, step: int, *, loss: float, grad_norm: float) -> bool:
        reasons = spike_reasons(self.cfg, loss=loss, grad_norm=grad_norm, losses=list(self._losses),
                                norms=list(self._norms))  # fmt: skip
        if not agree({"spike": bool(reasons)}, device=self.device)["spike"]:
            self._losses.append(loss)
            self._norms.append(grad_norm)
            return True
        self._spike = {"step": step, "loss": loss, "grad_norm": grad_norm, "reasons": reasons or ["on another rank"],
                       "action": self.cfg.action.value}  # fmt: skip
        return self.cfg.action == SpikeAction.warn

    def step_end(self, outcome: StepOutcome, control: Control) -> None:
        if self._spike is None:
            return
        spike, self._spike = self._spike, None
        stop = self.loader.consumed_samples
        spike["samples"] = [stop - self.samples_per_step, stop]
        self.result.spikes.append(spike)
        where = f"step {spike['step']} (global samples [{spike['samples'][0]}, {stop}))"
        logger.warning("loss spike at %s: %s; %s", where, "; ".join(spike["reasons"]), spike["action"])
        self.metrics.log({"spikes": len(self.result.spikes), "spike_loss": spike["loss"],
                          "spike_grad_norm": spike["grad_norm"], "spike_first_sample": spike["samples"][0],
                          "spike_stop_sample": stop, "spike_action": spike["action"]}, step=outcome.step,
                         tokens=outcome.total_tokens, namespace="train")  # fmt: skip
        if self.cfg.action == SpikeAction.stop:
            raise LossSpikeError(f"loss spike at {where}: {'; '.join(spike['reasons'])}. The update was not applied; "
                                 "the newest checkpoint is from before it. Resume with spike.action=rollback (or skip), "
                                 f"or by hand with data.skip_samples=[[{spike['samples'][0]},{stop}]]")  # fmt: skip
        if self.cfg.action == SpikeAction.rollback:
            control.request_rollback(self._rollback(spike))
            self.metrics.redo_through(outcome.step)

    def _rollback(self, spike: dict) -> Rollback:
        step, stop = spike["step"], spike["samples"][1]
        recent = [s for s in self._rollbacks if s > step - self.cfg.rollback_window]
        if len(recent) >= self.cfg.max_rollbacks:
            spikes = ", ".join(f"step {s['step']} samples {s['samples']}" for s in self.result.spikes[-len(recent) - 1:])
            raise LossSpikeError(f"{len(recent) + 1} loss spikes within {self.cfg.rollback_window} steps ({spikes}), "
                                 f"more than spike.max_rollbacks={self.cfg.max_rollbacks}: stopping. Look at the data "
                                 "of those samples, lower optim.lr, or raise spike.max_rollbacks")  # fmt: skip
        self._rollbacks.append(step)
        first = max(0, stop - self.cfg.rollback_skip_steps * self.samples_per_step)
        spike["skipped"] = [first, stop]
        return Rollback(step=step, skip_first=first, skip_stop=stop)
