"""The loss-spike guard (trainer/run/components/spike_guard.py) on deterministically poisoned batches.

``faults.poison_samples`` relabels the global samples of one step with a token the model has never had as a
target (test-only bad data), so that step's loss and gradient norm jump. One process, 4 samples per step:
step k trains global samples [4(k-1), 4k).
"""

from __future__ import annotations

import json

import pytest
import torch

from conf.schema import to_config
from launch.train import train
from tests.conftest import compose_config
from tests.wandb_file import read_run
from trainer.checkpoint.checkpointer import complete_checkpoints
from trainer.checkpoint.meta import CheckpointMeta
from trainer.run.components.spike_guard import LossSpikeError, spike_reasons
from trainer.run.config import SpikeConfig
from trainer.run.loop import Component, Control, StepOutcome

SPIKE_STEP = 9
SPIKE_SAMPLES = [4 * (SPIKE_STEP - 1), 4 * SPIKE_STEP]
SHORT = ("spike.min_history=4", "spike.window=20")  # a 14-step run: history from step 5 on
# The debug model's poisoned step 9 measured: loss 7.27 against 5.69 clean (the history's mean 5.9, sd 0.46,
# so ~3 sd), gradient norm 16.8 against 7.8 clean (the history's median ~3.1, so 5.4x). The clean run's
# largest excursions: no rise in loss, a norm of 2.5x the median. Thresholds between the two: 3 sd, 4x.
TEST_THRESHOLDS = ("spike.loss_sigmas=3", "spike.grad_norm_ratio=4")


def run(tiny_overrides, run_dir, *extra, components=(), thresholds=TEST_THRESHOLDS):
    cfg = to_config(compose_config([*tiny_overrides, "trainer.max_steps=14", "trainer.eval_every=0",
                                    "logging.wandb_mode=disabled", "optim.warmup_steps=2", "optim.decay_steps=14",
                                    "checkpoint.every_steps=4", *SHORT, *thresholds, *extra]))  # fmt: skip
    return train(cfg, run_dir=run_dir, components=components)


def poison(samples=SPIKE_SAMPLES) -> str:
    return f"faults.poison_samples=[[{samples[0]},{samples[1]}]]"


def test_spike_reasons_on_a_hand_computed_history():
    cfg = SpikeConfig(loss_sigmas=3.0, grad_norm_ratio=10.0, window=10, min_history=4)
    losses, norms = [2.0, 2.2, 1.8, 2.0], [1.0, 2.0, 3.0, 100.0]  # mean 2.0, sd 0.1414; median norm 2.5
    assert spike_reasons(cfg, loss=2.4, grad_norm=24.0, losses=losses, norms=norms) == []
    assert spike_reasons(cfg, loss=2.43, grad_norm=24.0, losses=losses, norms=norms) == [
        "loss 2.4300 > mean 2.0000 + 3 x sd 0.1414"]  # 2.0 + 3 x 0.1414 = 2.424
    assert spike_reasons(cfg, loss=2.0, grad_norm=25.1, losses=losses, norms=norms) == [
        "grad norm 25.1 > 10 x median 2.5"]
    assert spike_reasons(cfg, loss=9.0, grad_norm=99.0, losses=losses[:3], norms=norms[:3]) == []  # no history yet
    assert "not finite" in spike_reasons(cfg, loss=float("nan"), grad_norm=1.0, losses=[], norms=[])[0]
    off = SpikeConfig(loss_sigmas=0, grad_norm_ratio=0, window=10, min_history=4)
    assert spike_reasons(off, loss=1e9, grad_norm=1e9, losses=losses, norms=norms) == []


def test_a_clean_run_with_the_guard_is_bitwise_the_run_without_it(tiny_overrides, tmp_path):
    """With the default thresholds (and the tests' tighter ones) nothing fires, and the guard's agreement
    changes no bit of the run."""
    on = run(tiny_overrides, tmp_path / "on", thresholds=())
    tight = run(tiny_overrides, tmp_path / "tight")
    off = run(tiny_overrides, tmp_path / "off", "spike.enabled=false")
    assert on.spikes == tight.spikes == [] and len(on.losses) == 14
    assert on.losses == tight.losses == off.losses


class WeightSnapshots(Component):
    """After every step: a copy of the weights (a test's window on what the update did)."""

    def __init__(self, model: torch.nn.Module, store: dict):
        self.model, self.store = model, store

    def step_end(self, outcome: StepOutcome, control: Control) -> None:
        self.store[outcome.step] = {k: v.detach().clone() for k, v in self.model.state_dict().items()}


def test_skip_leaves_the_weights_of_the_spike_step_unchanged(tiny_overrides, tmp_path):
    snapshots: dict = {}
    result = run(tiny_overrides, tmp_path / "run", poison(), "spike.action=skip", "logging.wandb_mode=offline",
                 components=[lambda built: WeightSnapshots(built.model, snapshots)])  # fmt: skip
    assert [s["step"] for s in result.spikes] == [SPIKE_STEP]
    spike = result.spikes[0]
    assert spike["action"] == "skip" and spike["samples"] == SPIKE_SAMPLES and spike["reasons"]
    before, at, after = (snapshots[SPIKE_STEP + d] for d in (-1, 0, 1))
    assert all(torch.equal(before[k], at[k]) for k in before)  # the spike's update was not applied
    assert not all(torch.equal(at[k], after[k]) for k in at)  # the next one was
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in records if "train/spikes" in r]
    assert [(r["step"], r["train/spikes"], r["train/spike_first_sample"], r["train/spike_action"]) for r in logged] == [
        (SPIKE_STEP, 1, SPIKE_SAMPLES[0], "skip")]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["spikes"][0]["step"] == SPIKE_STEP
    wandb_run = read_run(next((tmp_path / "run" / "wandb").glob("offline-run-*")))  # what a sync would upload
    assert wandb_run.series("train/spikes") == [(SPIKE_STEP, 1)]
    assert wandb_run.series("train/spike_first_sample") == [(SPIKE_STEP, SPIKE_SAMPLES[0])]
    assert wandb_run.series("train/spike_action") == [(SPIKE_STEP, "skip")]


def test_rollback_gives_exactly_the_run_that_never_saw_the_batch(tiny_overrides, tmp_path):
    """Spike at step 9 -> back to the step-8 checkpoint, samples [32, 36) skipped: every loss of the final
    trajectory equals a run whose loader skipped those samples from the start; later checkpoints carry the
    skip, and a run resumed from one keeps skipping (the reference run resumes the same way)."""
    rolled = run(tiny_overrides, tmp_path / "rolled", poison(), "spike.action=rollback")
    assert [(s["step"], s["action"], s["skipped"]) for s in rolled.spikes] == [(SPIKE_STEP, "rollback", SPIKE_SAMPLES)]
    reference = run(tiny_overrides, tmp_path / "reference", f"data.skip_samples=[[{SPIKE_SAMPLES[0]},{SPIKE_SAMPLES[1]}]]")
    assert reference.spikes == [] and len(reference.losses) == 14
    assert rolled.losses == reference.losses  # bitwise: the same arithmetic on the same data
    newest = complete_checkpoints(tmp_path / "rolled" / "checkpoints")[-1]
    assert CheckpointMeta.read(newest).loader["skipped"] == [SPIKE_SAMPLES]
    records = [json.loads(line) for line in (tmp_path / "rolled" / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records if "train/loss" in r]
    assert steps == sorted(set(steps))  # the redone steps were not logged twice


def test_stop_names_the_step_and_its_samples(tiny_overrides, tmp_path):
    with pytest.raises(LossSpikeError, match=rf"step {SPIKE_STEP} \(global samples \[32, 36\)\).*data.skip_samples=\[\[32,36\]\]"):
        run(tiny_overrides, tmp_path / "run", poison(), "spike.action=stop")


def test_too_many_rollbacks_stop_the_run(tiny_overrides, tmp_path):
    two = "faults.poison_samples=[[32,36],[40,44]]"  # step 9, then after skipping [32, 36) step 10
    with pytest.raises(LossSpikeError, match=r"2 loss spikes within 1000 steps .*step 9.*step 10"):
        run(tiny_overrides, tmp_path / "run", two, "spike.action=rollback", "spike.max_rollbacks=1")


def test_ranks_agree_and_fsdp_rolls_back_like_one_process(tmp_path):
    """Two gloo processes (FSDP 2, 4 samples each of a global batch of 8): the spike is caught at the same
    step, both ranks roll back together, and the losses are one process's (loss-compare's tolerance)."""
    from launch.harness import LAYOUTS, run_layout
    from launch.loss_compare import LOSS_RTOL
    from trainer.run.records import TrainResult

    extra = ("faults.poison_samples=[[64,72]]", "spike.action=rollback", "checkpoint.every_steps=4", *SHORT,
             *TEST_THRESHOLDS)  # step 9 of a global batch of 8  # fmt: skip
    results = {name: TrainResult.read(run_layout(LAYOUTS[name], workdir=tmp_path, steps=12, extra=extra))
               for name in ("single", "fsdp2")}  # fmt: skip
    for result in results.values():
        assert [(s["step"], s["skipped"]) for s in result.spikes] == [(9, [64, 72])]
        assert len(result.losses) == 12
    single, fsdp = results["single"].losses, results["fsdp2"].losses
    assert max(abs(a - b) / abs(b) for a, b in zip(fsdp, single)) <= LOSS_RTOL
