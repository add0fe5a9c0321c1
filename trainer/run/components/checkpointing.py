"""When the run saves a checkpoint: every ``checkpoint.every_steps`` steps, when ``checkpoint.every_minutes``
have passed since the last save, after the last step (``checkpoint.save_final``), and when a stop signal
(SIGUSR2 / SIGTERM, ``checkpoint.save_on_signal``) arrived, after which the loop stops. How a checkpoint is
written is ``trainer.checkpoint.checkpointer.Checkpointer``'s business.

The signal and the clock are per process, so the decision to save (and to stop) is agreed over all ranks in
one small all-reduce after the step, taken only where a signal or a clock can set it.

It also carries out a loss-spike rollback (``roll_back``): the newest checkpoint from before the spike is
loaded, the loader told to skip the spike's samples, and that checkpoint saved again with the skip in its
loader state, so a restart from it (a crash before the next save) keeps skipping them too.
"""

from __future__ import annotations

import logging
import time
from typing import Optional

import torch

from data import PackedLoader
from model.config import ModelArgs
from trainer.checkpoint.checkpointer import Checkpointer, complete_checkpoints, step_of
from trainer.checkpoint.config import CheckpointConfig
from trainer.parallel.distributed import agree
from trainer.run.loop import Component, Control, Resumed, Rollback, StepOutcome
from trainer.run.records import TrainResult
from trainer.run.signals import StopSignals

logger = logging.getLogger(__name__)


class PeriodicCheckpoints(Component):
    phase = "checkpoint"

    def __init__(self, cfg: CheckpointConfig, *, checkpointer: Checkpointer, max_steps: int, args: ModelArgs,
                 model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 scheduler: torch.optim.lr_scheduler.LRScheduler, loader: PackedLoader, run_config: dict,
                 wandb_id: Optional[str], result: TrainResult, device: torch.device):  # fmt: skip
        """
        Args:
            args: the model's shape, checked against a checkpoint before a rollback loads it.
            model, optimizer, scheduler, loader: what a checkpoint holds (with ``run_config`` and the wandb run).
            result: the run's summary: each save's stall, and whether a signal stopped the run.
            device: where the agreement's all-reduce runs.
        """
        self.cfg, self.checkpointer, self.max_steps, self.args = cfg, checkpointer, max_steps, args
        self.model, self.optimizer, self.scheduler, self.loader = model, optimizer, scheduler, loader
        self.run_config, self.wandb_id, self.result, self.device = run_config, wandb_id, result, device
        self.signals = StopSignals(enabled=cfg.save_on_signal)
        self._last_save = time.monotonic()

    def start(self, *, first_step: int) -> None:
        self.signals.__enter__()
        self._last_save = time.monotonic()

    def step_end(self, outcome: StepOutcome, control: Control) -> None:
        self.checkpointer.poll()  # finish a background save whose files are written
        step, every_s = outcome.step, self.cfg.every_minutes * 60
        stopping = time_due = False
        if self.signals.enabled or every_s:
            decided = agree({"stop": self.signals.received is not None,
                             "time": bool(every_s) and time.monotonic() - self._last_save >= every_s},
                            device=self.device)  # fmt: skip
            stopping, time_due = bool(decided["stop"]) and self.signals.enabled, bool(decided["time"])
        final = step == self.max_steps and self.cfg.save_final
        periodic = bool(self.cfg.every_steps) and step % self.cfg.every_steps == 0
        if stopping or time_due or final or periodic:
            self.result.checkpoint_stall_s.append(self._save(step=step, tokens=outcome.total_tokens))
            self._last_save = time.monotonic()
        if stopping:
            logger.warning("stop signal received: checkpoint of step %d saved, stopping", step)
            self.result.stopped_by_signal = True
            control.request_stop("stop signal")

    def roll_back(self, rollback: Rollback) -> Resumed:
        """Load the newest checkpoint from before ``rollback.step``, skip its samples from now on, and say where
        training continues (a collective, like every load and save)."""
        self.checkpointer.wait()
        before = [p for p in complete_checkpoints(self.checkpointer.root) if step_of(p) < rollback.step]
        if not before:
            raise RuntimeError(f"loss spike at step {rollback.step}: no checkpoint from before it under "
                               f"{self.checkpointer.root} to roll back to; save more often (checkpoint.every_steps) "
                               "or use spike.action=skip")  # fmt: skip
        meta = self.checkpointer.load(before[-1], model=self.model, optimizer=self.optimizer, scheduler=self.scheduler,
                                      loader=self.loader, args=self.args)  # fmt: skip
        self.loader.skip(rollback.skip_first, rollback.skip_stop)
        self.result.checkpoint_stall_s.append(self._save(step=meta.step, tokens=meta.tokens))
        self._last_save = time.monotonic()
        logger.warning("rolled back to step %d (%s); global samples [%d, %d) will not be trained on", meta.step,
                       before[-1], rollback.skip_first, rollback.skip_stop)  # fmt: skip
        return Resumed(next_step=meta.step + 1, tokens=meta.tokens)

    def end(self) -> None:
        self.checkpointer.wait()  # a background save finished and renamed before the run reports done

    def close(self) -> None:
        self.signals.__exit__(None, None, None)

    def _save(self, *, step: int, tokens: int) -> float:
        return self.checkpointer.save(step=step, tokens=tokens, model=self.model, optimizer=self.optimizer,
                                      scheduler=self.scheduler, loader=self.loader, run_config=self.run_config,
                                      wandb_id=self.wandb_id)  # fmt: skip
