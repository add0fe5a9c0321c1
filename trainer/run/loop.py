"""The training loop: a short driver, and the components it calls at named points of every step.

The driver (``run_loop``) only fetches micro-batches, runs ``train_step`` and tells the components what
happened. Everything else a run does around the step is a component, one module each
(trainer/run/components/: the training metrics, validation, checkpoints and stop signals, profiling;
evaluation/training.py: task evaluation), so a new concern (a spike guard, a hang watchdog, a straggler
monitor) is a new module, not an edit of the loop.

A component receives what it needs when it is built (its own sub-config, the objects it acts on), never the
trainer as a whole, and overrides the hooks it uses:

    start(first_step)        before the first step of this process (after any resume)
    step_begin(step)         before the step's data is fetched
    pre_optim_step(step, loss, grad_norm) -> bool
                             after backward, before the update; False from any component skips the update
    step_end(outcome, ctrl)  after the optimizer step; ``ctrl.request_stop(...)`` ends the loop after it,
                             ``ctrl.request_rollback(...)`` takes the run back to a checkpoint
    end()                    after the last step (or the stop), before the run's summary is written
    close()                  always, also when the run fails: release what ``start`` took

Components are called in list order at each hook; that order is the run's order of side work (metrics,
then validation, then checkpoints: a checkpoint is taken after the step's evaluation is logged). Hooks that
communicate are collectives: every rank has the same components and calls them at the same steps.

``Progress`` says where the loop is (the step, and the phase: data, forward, backward, optimizer, or the
``phase`` of the component being called: checkpoint, eval, ...); the hang watchdog reads it from its thread.
"""

from __future__ import annotations

import functools
import itertools
import time
from dataclasses import dataclass
from typing import Callable, Iterator, Optional, Sequence

import torch

from trainer.run.records import TrainResult
from trainer.run.step import StepResult


@dataclass(frozen=True)
class StepOutcome:
    """What one finished step tells the components."""

    step: int
    loss: float
    """The global batch's mean loss."""
    grad_norm: float
    lr: float
    """The learning rate the step used."""
    tokens: int
    """Valid labels in the step's global batch."""
    total_tokens: int
    """Training tokens consumed so far, all ranks together (the resumed run's included)."""
    data_s: float
    """Seconds this process waited for the step's micro-batches."""
    compute_s: float
    """Seconds of forward, backward and optimizer step (with the host synchronisation that ends it)."""
    applied: bool = True
    """False where a component declined the update (``pre_optim_step``)."""


@dataclass(frozen=True)
class Rollback:
    """Go back to the newest checkpoint from before ``step`` and never train on the global samples
    [``skip_first``, ``skip_stop``) (a loss spike's batches)."""

    step: int
    skip_first: int
    skip_stop: int


@dataclass(frozen=True)
class Resumed:
    """Where a rollback left the run: the next step to train and the tokens consumed before it."""

    next_step: int
    tokens: int


class Control:
    """What components tell the loop after a step: whether to stop (and why), or to roll back."""

    def __init__(self) -> None:
        self.stop_reason: Optional[str] = None
        self.rollback: Optional[Rollback] = None

    def request_stop(self, reason: str) -> None:
        self.stop_reason = self.stop_reason or reason

    def request_rollback(self, rollback: Rollback) -> None:
        self.rollback = self.rollback or rollback

    @property
    def stop(self) -> bool:
        return self.stop_reason is not None


class Progress:
    """Where the loop is: written by the loop's thread, read by the hang watchdog's (single attribute
    writes, atomic under the GIL)."""

    SIDE_WORK = ("checkpoint", "eval", "rollback")
    """Phases that may legitimately take long without a step finishing."""

    def __init__(self) -> None:
        now = time.monotonic()
        self.step, self.phase, self.phase_since = 0, "start", now
        self.steps_done = 0
        self.last_progress = now
        """When the last step finished, or the last side work ended (the hang clock starts there)."""
        self.slowest_step_s = 0.0
        self.seconds: dict[str, float] = {"train": 0.0, "checkpoint": 0.0, "eval": 0.0, "rollback": 0.0, "other": 0.0}
        """Where this process's loop time went: the steps, and each component's work by its ``phase``."""

    def spend(self, phase: str, seconds: float) -> None:
        key = phase if phase in self.seconds else "other"
        self.seconds[key] += seconds

    def enter(self, phase: str) -> None:
        now = time.monotonic()
        if self.phase in self.SIDE_WORK and phase not in self.SIDE_WORK:
            self.last_progress = now
        self.phase, self.phase_since = phase, now

    def step_done(self, step_s: float) -> None:
        self.steps_done += 1
        self.slowest_step_s = max(self.slowest_step_s, step_s)
        self.last_progress = time.monotonic()


class Component:
    """A part of the run the loop calls at its hook points; every hook is a no-op unless overridden."""

    phase: str = "after_step"
    """What the run is doing while this component's ``step_end`` runs (``Progress``): ``checkpoint`` and
    ``eval`` are side work, which may take long without a step finishing."""

    def start(self, *, first_step: int) -> None:
        pass

    def step_begin(self, step: int) -> None:
        pass

    def pre_optim_step(self, step: int, *, loss: float, grad_norm: float) -> bool:
        """Whether the step's update may be applied (every rank must answer alike)."""
        return True

    def step_end(self, outcome: StepOutcome, control: Control) -> None:
        pass

    def end(self) -> None:
        pass

    def close(self) -> None:
        pass


StepFn = Callable[[list[dict[str, torch.Tensor]], int, Callable[[StepResult], bool], Callable[[str], None]],
                  StepResult]
"""``train_step(micro_batches, step, review, phase)``."""


def run_loop(*, steps: range, batches: Iterator[dict[str, torch.Tensor]], grad_accum_steps: int, train_step: StepFn,
             result: TrainResult, components: Sequence[Component],
             rollback: Optional[Callable[[Rollback], Resumed]] = None, progress: Optional[Progress] = None) -> None:  # fmt: skip
    """Run ``steps`` (optimizer steps, 1-based), adding each step's loss and tokens to ``result``.

    Args:
        batches: the loader's micro-batches, already on the device.
        train_step: ``train_step(micro_batches, step, review, phase)``: forward, backward and, if ``review``
            allows it, the update, telling ``phase`` when forward, backward and the optimizer begin.
        result: the run's summary; ``result.tokens`` holds the tokens consumed before ``steps`` (resume).
        rollback: restores the checkpoint a ``Rollback`` asks for; the losses of the steps it undid are
            dropped from ``result`` and training continues from the step after the checkpoint.
        progress: kept up to date with the step and phase (for a watchdog); a private one if None.
    """
    first = steps.start
    progress = progress if progress is not None else Progress()
    try:
        for component in components:
            component.start(first_step=first)
        step = first
        while step < steps.stop:
            progress.step = step
            progress.enter("data")
            for component in components:
                component.step_begin(step)
            started = time.perf_counter()
            micro_batches = list(itertools.islice(batches, grad_accum_steps))
            fetched = time.perf_counter()
            out = train_step(micro_batches, step, functools.partial(_review, components, step), progress.enter)
            computed = time.perf_counter()
            progress.step_done(computed - started)
            progress.spend("train", computed - started)
            result.losses.append(out.loss)
            result.tokens += out.tokens
            outcome = StepOutcome(step=step, loss=out.loss, grad_norm=out.grad_norm, lr=out.lr, tokens=out.tokens,
                                  total_tokens=result.tokens, data_s=fetched - started, compute_s=computed - fetched,
                                  applied=out.applied)  # fmt: skip
            control = Control()
            for component in components:
                progress.enter(component.phase)
                began = time.perf_counter()
                component.step_end(outcome, control)
                progress.spend(component.phase, time.perf_counter() - began)
            if control.stop:
                break
            if control.rollback is not None:
                if rollback is None:
                    raise RuntimeError("a component asked for a rollback, but this loop was given no way to roll back")
                progress.enter("rollback")
                began = time.perf_counter()
                resumed = rollback(control.rollback)
                # The undone steps' training time was lost to the rollback too (at this run's mean step time).
                undone = (step + 1 - resumed.next_step) * progress.seconds["train"] / max(progress.steps_done, 1)
                progress.spend("train", -undone)
                progress.spend("rollback", time.perf_counter() - began + undone)
                del result.losses[resumed.next_step - first :]  # the undone steps' losses
                result.tokens = resumed.tokens
                step = resumed.next_step
                continue
            step += 1
        for component in components:
            component.end()
    finally:
        for component in components:
            component.close()


def _review(components: Sequence[Component], step: int, out: StepResult) -> bool:
    """Every component's verdict on the update (all are asked: a verdict may be a collective)."""
    verdicts = [c.pre_optim_step(step, loss=out.loss, grad_norm=out.grad_norm) for c in components]
    return all(verdicts)
