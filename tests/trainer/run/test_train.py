"""The training loop end to end on the debug model and a tiny real corpus (CPU, fp32)."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conf.schema import to_config
from launch.train import sweep_names, train
from model.config import ModelArgs
from tests.conftest import compose_config
from tests.wandb_file import read_run
from trainer.parallel.build import build_model
from trainer.run.config import OptimConfig
from trainer.run.optim import build_lr_scheduler, build_optimizer
from trainer.run.records import TrainResult
from trainer.run.step import ComputeContext, train_step

REPO = Path(__file__).resolve().parents[3]


def make_cfg(overrides, *extra):
    return to_config(compose_config([*overrides, *extra]))


def test_training_reduces_loss_and_writes_the_run_directory(tiny_overrides, tmp_path):
    result = train(make_cfg(tiny_overrides), run_dir=tmp_path / "run")
    losses = result.losses
    assert len(losses) == 30 and all(math.isfinite(x) for x in losses)
    # The head's init gives logits of unit variance: about ln(V) + 1/2 nats, far from a collapsed model.
    assert math.log(512) < losses[0] < math.log(512) + 1
    assert sum(losses[-5:]) / 5 < losses[0] - 1.0
    assert set(result.val_losses) == {15, 30} and result.val_losses[30] < result.val_losses[15]

    run = tmp_path / "run"
    saved = (run / "config.yaml").read_text()
    assert "vocab_size: 512" in saved and "wandb_mode: offline" in saved
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train_records = [r for r in records if "train/loss" in r]
    assert [r["step"] for r in train_records] == [1, 5, 10, 15, 20, 25, 30]
    for key in ("loss", "lr", "grad_norm", "tokens_per_sec", "mfu", "step_time_s", "rss_gib", "peak_rss_gib", "data_wait_frac"):
        assert all(f"train/{key}" in r for r in train_records), key
    assert [r["tokens"] for r in train_records] == [s * 4 * 64 for s in (1, 5, 10, 15, 20, 25, 30)]
    assert not any("[" in key for r in records for key in r)  # one series per metric, never one per step
    val = [r for r in records if "val/loss" in r]
    assert [r["step"] for r in val] == [15, 30]
    assert val[-1]["val/perplexity"] == pytest.approx(math.exp(val[-1]["val/loss"]))
    assert TrainResult.read(run).losses == losses
    # The offline wandb run, read back as `wandb sync` would upload it: one chart per metric, every point.
    (offline,) = (run / "wandb").glob("offline-run-*")
    wandb_run = read_run(offline)
    assert wandb_run.series("train/loss") == [(r["step"], r["train/loss"]) for r in train_records]
    assert [s for s, _ in wandb_run.series("val/loss")] == [15, 30]
    assert wandb_run.series("tokens") == [(step, step * 4 * 64) for step in (1, 5, 10, 15, 20, 25, 30)]
    assert not any("[" in key for row in wandb_run.history for key in row)
    assert wandb_run.name == "run" and wandb_run.config["trainer"]["max_steps"] == 30


def test_unknown_peak_trains_and_logs_no_mfu(tiny_overrides, tmp_path, monkeypatch):
    """A GPU without a known data-sheet peak: training runs and MFU is left out, not a crash."""
    import trainer.run.train as train_module

    monkeypatch.setattr(train_module, "peak_flops", lambda **kwargs: None)
    cfg = make_cfg(tiny_overrides, "trainer.max_steps=2", "optim.warmup_steps=1", "trainer.eval_every=0",
                   "logging.wandb_mode=disabled")
    result = train(cfg, run_dir=tmp_path / "run")
    assert len(result.losses) == 2
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    records = [r for r in records if not any(k.startswith("goodput/") for k in r)]  # the run's end summary
    assert [r["step"] for r in records] == [1, 2] and all("train/loss" in r for r in records)
    assert not any(k.endswith("/mfu") for r in records for k in r)


def test_same_seed_same_losses_bitwise(tiny_overrides, tmp_path):
    cfg = make_cfg(tiny_overrides, "trainer.max_steps=4", "optim.warmup_steps=2", "trainer.eval_every=0",
                   "logging.wandb_mode=disabled")
    a = train(cfg, run_dir=tmp_path / "a").losses
    b = train(cfg, run_dir=tmp_path / "b").losses
    assert a == b


def test_gradient_accumulation_matches_one_large_batch(tiny_overrides, tmp_path):
    common = ("trainer.max_steps=3", "optim.warmup_steps=2", "trainer.eval_every=0", "logging.wandb_mode=disabled")
    big = train(make_cfg(tiny_overrides, *common, "trainer.micro_batch_size=8"), run_dir=tmp_path / "big")
    acc = train(make_cfg(tiny_overrides, *common, "trainer.micro_batch_size=4", "trainer.grad_accum_steps=2"),
                run_dir=tmp_path / "acc")  # fmt: skip
    # Same samples, same mean over tokens; only the summation order differs (fp32 rounding).
    torch.testing.assert_close(torch.tensor(acc.losses), torch.tensor(big.losses), rtol=1e-5, atol=0)


def test_nan_stops_before_the_optimizer_step():
    model = build_model(ModelArgs(vocab_size=64, max_seq_len=16), device=torch.device("cpu"), seed=0)
    opt = build_optimizer(model, OptimConfig(warmup_steps=1))
    sched = build_lr_scheduler(opt, OptimConfig(warmup_steps=1), max_steps=10)
    with torch.no_grad():
        model.layers["0"].feed_forward.w1.weight[0, 0] = float("nan")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    batch = {"inputs": torch.randint(0, 64, (2, 8)), "labels": torch.randint(0, 64, (2, 8))}
    with pytest.raises(FloatingPointError, match="step 7: loss=nan.*before the optimizer step"):
        ctx = ComputeContext(device=torch.device("cpu"), dtype=torch.float32)
        train_step(model, opt, sched, [batch], ctx=ctx, grad_clip=1.0, step=7)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]) or torch.isnan(value).any(), key
    assert not opt.state  # no Adam moments were created: the step never ran


def test_no_host_sync_before_the_forward_and_one_after(monkeypatch):
    """A GPU must not idle at the start of a step waiting for the host: nothing is read back from a tensor
    (item, tolist, bool, int, float) between the step's start and the model's forward; after backward, one
    read brings loss, gradient norm and token count together. (On CPU every tensor is host memory; the
    calls counted are the ones that would synchronise with a GPU.)"""
    model = build_model(ModelArgs(vocab_size=64, max_seq_len=16), device=torch.device("cpu"), seed=0)
    cfg = OptimConfig(warmup_steps=1)
    opt, reads, phase = build_optimizer(model, cfg), [], {"now": "before forward"}
    sched = build_lr_scheduler(opt, cfg, max_steps=10)
    model.register_forward_pre_hook(lambda *args: phase.update(now="forward and after"))
    for method in ("item", "tolist", "__bool__", "__int__", "__float__"):
        original = getattr(torch.Tensor, method)

        def reading(self, *args, _original=original, _method=method, **kwargs):
            reads.append((phase["now"], _method))
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, method, reading)
    # AdamW's bookkeeping reads its step counters, which live on the CPU even on GPUs: not counted.
    opt.register_step_pre_hook(lambda *args: phase.update(now="optimizer"))
    batches = [{"inputs": torch.randint(0, 64, (2, 8)), "labels": torch.randint(0, 64, (2, 8))} for _ in range(2)]
    out = train_step(model, opt, sched, batches, ctx=ComputeContext(device=torch.device("cpu"), dtype=torch.float32),
                     grad_clip=1.0, step=1)  # fmt: skip
    monkeypatch.undo()
    assert [r for r in reads if r[0] == "before forward"] == []
    assert [r for r in reads if r[0] != "optimizer"] == [("forward and after", "tolist")], reads
    assert out.tokens == 32 and math.isfinite(out.loss)


def test_vocab_mismatch_is_refused_with_the_fix(tiny_overrides, tmp_path):
    cfg = make_cfg(tiny_overrides, "model.vocab_size=1000")
    with pytest.raises(ValueError, match=r"model.vocab_size=1000 does not match .* 512.*Set model.vocab_size=512"):
        train(cfg, run_dir=tmp_path)


def test_empty_corpus_is_refused_naming_the_source(tiny_overrides, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    cfg = make_cfg(tiny_overrides, f"data.sources.tiny.paths=[{empty}]", f"data.cache_dir={tmp_path / 'c'}")
    with pytest.raises(ValueError, match="data.sources.tiny"):
        train(cfg, run_dir=tmp_path / "run")


def test_command_line_entry_point_with_multirun(tiny_overrides, tmp_path):
    """`python -m launch.train --multirun a=1,2` runs one job per value, each in its own run directory; their
    wandb runs share a group named after the sweep, and each is named by its swept values."""
    overrides = [o for o in tiny_overrides if not o.startswith(("trainer.max_steps", "logging.wandb_mode"))]
    cmd = [sys.executable, "-m", "launch.train", "--multirun", *overrides, "trainer.max_steps=2",
           "trainer.eval_every=0", "logging.wandb_mode=offline", "optim.lr=1e-3,2e-3", "optim.warmup_steps=1",
           f"hydra.sweep.dir={tmp_path / 'sweep'}"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for job in ("0", "1"):
        run = tmp_path / "sweep" / job
        assert (run / "config.yaml").exists() and (run / "metrics.jsonl").exists()
        assert (run / ".hydra" / "overrides.yaml").exists()
    lrs = [(tmp_path / "sweep" / j / "config.yaml").read_text() for j in ("0", "1")]
    assert "lr: 0.001" in lrs[0] and "lr: 0.002" in lrs[1]
    runs = [read_run(next((tmp_path / "sweep" / j / "wandb").glob("offline-run-*"))) for j in ("0", "1")]
    assert runs[0].group == runs[1].group and runs[0].group.endswith("sweep")
    assert [r.name for r in runs] == ["optim.lr=0.001", "optim.lr=0.002"]  # as Hydra writes the values
    assert runs[0].run_id != runs[1].run_id


def test_sweep_names():
    group, name = sweep_names(sweep_dir="multirun/2026-12-01/20-40-00", job_num=3,
                              job_overrides=["model=debug", "optim.lr=0.001", "parallel.tp=2"],
                              command_line=["model=debug", "optim.lr=0.001,0.002", "parallel.tp=choice(1,2)"])  # fmt: skip
    assert (group, name) == ("multirun-2026-12-01-20-40-00", "optim.lr=0.001,parallel.tp=2")
    assert sweep_names(sweep_dir="/s", job_overrides=["a=1"], command_line=["a=1"], job_num=0) == ("s", "job0")


def test_profiler_writes_a_chrome_trace_of_the_requested_steps(tiny_overrides, tmp_path):
    cfg = make_cfg(tiny_overrides, "trainer.max_steps=3", "trainer.eval_every=0", "logging.wandb_mode=disabled",
                   "profile.step=2", "profile.steps=1")
    train(cfg, run_dir=tmp_path / "run")
    trace = json.loads((tmp_path / "run" / "profile" / "rank0.json").read_text())
    names = {event.get("name", "") for event in trace["traceEvents"]}
    assert "aten::mm" in names or "aten::addmm" in names  # the step's matmuls were recorded
