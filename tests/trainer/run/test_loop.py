"""The loop driver (trainer/run/loop.py) and its small components, without a model: a fake step, fake data.

The components' work inside real runs (metrics, validation, checkpoints, stop signals, profiling, task
evaluation) is tested through training in test_train.py, test_metrics.py, tests/trainer/checkpoint/ and
tests/evaluation/; here: the order of the hooks, stopping, failure, and what the training log measures.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from trainer.run.components.train_log import TrainLog
from trainer.run.components.validation import Validation
from trainer.run.loop import Component, Control, Resumed, Rollback, StepOutcome, run_loop
from trainer.run.records import TrainResult
from trainer.run.step import StepResult


class Recorder(Component):
    """Writes every hook call into a shared list; optionally stops after a step."""

    def __init__(self, name: str, calls: list, *, stop_after: int = 0):
        self.name, self.calls, self.stop_after = name, calls, stop_after

    def start(self, *, first_step: int) -> None:
        self.calls.append((self.name, "start", first_step))

    def step_begin(self, step: int) -> None:
        self.calls.append((self.name, "begin", step))

    def step_end(self, outcome: StepOutcome, control: Control) -> None:
        self.calls.append((self.name, "end", outcome.step))
        if outcome.step == self.stop_after:
            control.request_stop(f"{self.name} asked")

    def end(self) -> None:
        self.calls.append((self.name, "finish"))

    def close(self) -> None:
        self.calls.append((self.name, "close"))


def batches():
    for i in itertools.count():
        yield {"inputs": torch.tensor([i])}


def fake_step(micro_batches, step, review=None, phase=None):
    out = StepResult(loss=10.0 / step, grad_norm=1.0, lr=1e-3, tokens=4 * len(micro_batches))
    out.applied = review(out) if review is not None else True
    return out


def test_hooks_run_in_order_and_the_result_adds_up():
    calls: list = []
    result = TrainResult(first_step=3, tokens=100)  # resumed: 100 tokens before step 3
    run_loop(steps=range(3, 5), batches=batches(), grad_accum_steps=2, train_step=fake_step, result=result,
             components=[Recorder("a", calls), Recorder("b", calls)])  # fmt: skip
    assert calls == [("a", "start", 3), ("b", "start", 3),
                     ("a", "begin", 3), ("b", "begin", 3), ("a", "end", 3), ("b", "end", 3),
                     ("a", "begin", 4), ("b", "begin", 4), ("a", "end", 4), ("b", "end", 4),
                     ("a", "finish"), ("b", "finish"), ("a", "close"), ("b", "close")]  # fmt: skip
    assert result.losses == [10.0 / 3, 10.0 / 4] and result.tokens == 100 + 2 * 8


def test_a_component_stops_the_loop_after_the_step_every_component_saw():
    calls: list = []
    result = TrainResult()
    run_loop(steps=range(1, 11), batches=batches(), grad_accum_steps=1, train_step=fake_step, result=result,
             components=[Recorder("a", calls, stop_after=2), Recorder("b", calls)])  # fmt: skip
    assert len(result.losses) == 2
    assert ("b", "end", 2) in calls and ("a", "begin", 3) not in calls
    assert calls[-4:] == [("a", "finish"), ("b", "finish"), ("a", "close"), ("b", "close")]


def test_a_failing_step_still_closes_every_component_but_does_not_end_them():
    calls: list = []

    def failing(micro_batches, step, review=None, phase=None):
        if step == 2:
            raise FloatingPointError("step 2: loss=nan")
        return fake_step(micro_batches, step, review, phase)

    with pytest.raises(FloatingPointError, match="step 2"):
        run_loop(steps=range(1, 5), batches=batches(), grad_accum_steps=1, train_step=failing, result=TrainResult(),
                 components=[Recorder("a", calls)])  # fmt: skip
    assert calls[-1] == ("a", "close") and ("a", "finish") not in calls


class Veto(Component):
    """Declines the update of one step; records what every component saw."""

    def __init__(self, step: int, seen: list):
        self.step, self.seen = step, seen

    def pre_optim_step(self, step: int, *, loss: float, grad_norm: float) -> bool:
        return step != self.step

    def step_end(self, outcome: StepOutcome, control: Control) -> None:
        self.seen.append((outcome.step, outcome.applied))


def test_any_component_can_decline_an_update_and_every_one_is_asked():
    asked, seen = [], []

    class Asked(Component):
        def pre_optim_step(self, step: int, *, loss: float, grad_norm: float) -> bool:
            asked.append(step)
            return True

    run_loop(steps=range(1, 4), batches=batches(), grad_accum_steps=1, train_step=fake_step, result=TrainResult(),
             components=[Veto(2, seen), Asked()])  # fmt: skip
    assert seen == [(1, True), (2, False), (3, True)] and asked == [1, 2, 3]


def test_a_rollback_drops_the_undone_losses_and_continues_after_the_checkpoint():
    class SpikeAt(Component):
        def __init__(self):
            self.fired = False

        def step_end(self, outcome: StepOutcome, control: Control) -> None:
            if outcome.step == 4 and not self.fired:
                self.fired = True
                control.request_rollback(Rollback(step=4, skip_first=12, skip_stop=16))

    asked = []

    def roll_back(rollback: Rollback) -> Resumed:
        asked.append(rollback)
        return Resumed(next_step=3, tokens=8)  # back to the checkpoint of step 2

    result = TrainResult()
    run_loop(steps=range(1, 6), batches=batches(), grad_accum_steps=1, train_step=fake_step, result=result,
             components=[SpikeAt()], rollback=roll_back)  # fmt: skip
    assert asked == [Rollback(step=4, skip_first=12, skip_stop=16)]
    assert result.losses == [10.0 / s for s in (1, 2, 3, 4, 5)] and result.tokens == 8 + 3 * 4


class FakeMetrics:
    def __init__(self):
        self.records = []

    def log(self, metrics, *, step, tokens, namespace, console=None):
        self.records.append((namespace, step, tokens, dict(metrics)))


def outcome(step: int, *, data_s: float, compute_s: float, tokens: int = 1000) -> StepOutcome:
    return StepOutcome(step=step, loss=1.0, grad_norm=0.5, lr=1e-3, tokens=tokens, total_tokens=step * tokens,
                       data_s=data_s, compute_s=compute_s)  # fmt: skip


def test_train_log_measures_the_steps_themselves():
    """Throughput over the logged window counts data wait + compute only (side work between steps is not
    training time); records at the first step, every log_every, and the last."""
    metrics, result = FakeMetrics(), TrainResult()
    log = TrainLog(metrics=metrics, result=result, log_every=2, max_steps=5, flops_per_token=6, peak_flops=12_000.0,
                   device=torch.device("cpu"))  # fmt: skip
    log.start(first_step=1)
    for step in range(1, 6):
        log.step_end(outcome(step, data_s=0.25, compute_s=0.75), Control())
    log.end()
    assert [r[1] for r in metrics.records] == [1, 2, 4, 5]
    _, step, tokens, values = metrics.records[2]  # steps 3 and 4: 2000 tokens in 2 s
    assert (step, tokens) == (4, 4000)
    assert values["tokens_per_sec"] == pytest.approx(1000.0) and values["step_time_s"] == pytest.approx(1.0)
    assert values["data_wait_frac"] == pytest.approx(0.25) and values["mfu"] == pytest.approx(1000.0 * 6 / 12_000)
    assert result.tokens_per_sec == pytest.approx(1000.0)


def test_validation_runs_every_n_steps_and_after_the_last():
    metrics, result, seen = FakeMetrics(), TrainResult(), []

    def validate() -> float:
        seen.append(True)
        return 2.0

    validation = Validation(validate=validate, every=3, max_steps=7, metrics=metrics, result=result)
    for step in range(1, 8):
        validation.step_end(outcome(step, data_s=0.0, compute_s=1.0), Control())
    assert sorted(result.val_losses) == [3, 6, 7] and len(seen) == 3
    assert [(r[0], r[1]) for r in metrics.records] == [("val", 3), ("val", 6), ("val", 7)]
    assert metrics.records[0][3]["perplexity"] == pytest.approx(7.389, rel=1e-3)
