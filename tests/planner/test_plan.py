"""The planner's estimates, search and command line (``python -m launch.plan``)."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import matplotlib.image
import pytest
import torch

from model.config import ModelArgs
from model.flops import param_counts
from planner.config import ClusterConfig
from planner.budget import budget
from planner.estimate import Workload, estimate
from planner.rehearsal import rehearse
from planner.search import candidates, plan_one, search
from tests.planner.conftest import PRESETS
from trainer.parallel.config import ACConfig, ACMode, FSDPConfig, ParallelConfig

REPO = Path(__file__).resolve().parents[2]
A100 = ClusterConfig(gpu="A100-SXM4-80GB", gpus=64, memory_gib=79.2)


def test_search_returns_only_layouts_that_fit_fastest_first():
    """7B on 64 A100-40GB-sized GPUs with a 1M-token batch: some layouts overflow (no checkpointing at a
    large micro-batch), the search keeps the rest, ordered by throughput."""
    cluster = dataclasses.replace(A100, memory_gib=39.4)
    args, seq, batch = PRESETS["llama1_7b"], 2048, 2**20
    every = list(candidates(args, base=ParallelConfig(), cluster=cluster, seq_len=seq, global_batch_tokens=batch))
    found = search(args, base=ParallelConfig(), cluster=cluster, seq_len=seq, global_batch_tokens=batch)
    assert any(not c.estimate.fits for c in every)  # the memory limit bites, so the filter is tested
    assert found and all(c.estimate.memory.total <= cluster.memory_bytes for c in found)
    assert len(found) == sum(c.estimate.fits for c in every)
    speeds = [c.estimate.tokens_per_sec_per_gpu for c in found]
    assert speeds == sorted(speeds, reverse=True)
    assert {c.parallel.tp for c in found} > {1}  # TP degrees beyond 1 were rehearsed
    assert all(c.estimate.global_batch_tokens == batch for c in every)


def test_memory_items_follow_the_layout():
    """Replicas hold bigger shards (HSDP), TP halves what FSDP gathers; more recomputation, fewer activation
    bytes; keeping gathered parameters after forward costs memory; accumulating with deferred reduction
    keeps unsharded gradients."""
    args, seq, batch = PRESETS["llama1_7b"], 2048, 64 * 2048 * 4

    def mem(**kw):
        micro = kw.pop("micro", 4)
        return plan_one(args, parallel=ParallelConfig(**kw), cluster=A100, seq_len=seq, global_batch_tokens=batch,
                        micro_batch=micro).estimate.memory  # fmt: skip

    base = mem()
    assert mem(dp_replicate=8).optimizer == pytest.approx(8 * base.optimizer, rel=1e-3)  # sharded over 8, not 64
    assert mem(tp=2).gathered_parameters == pytest.approx(base.gathered_parameters / 2, rel=1e-3)
    assert mem(tp=2).optimizer == pytest.approx(base.optimizer, rel=1e-3)  # the world still shares the model
    full, none = mem(ac=ACConfig(mode=ACMode.full)), mem(ac=ACConfig(mode=ACMode.none))
    assert full.activations < base.activations < none.activations
    assert mem(fsdp=FSDPConfig(reshard_after_forward=False)).gathered_parameters > base.gathered_parameters
    assert mem(micro=1).gradient_buffers > base.gradient_buffers  # accumulation 4, reduction deferred
    assert mem(micro=1, fsdp=FSDPConfig(defer_grad_sync=False)).gradient_buffers == base.gradient_buffers


def test_step_time_responds_to_the_cluster():
    """FLOP time scales with the efficiency (no checkpointing: no HBM-bound recomputation in it); a slower
    network only adds exposed communication."""
    args = PRESETS["llama1_7b"]
    par = ParallelConfig(ac=ACConfig(mode=ACMode.none))
    r = rehearse(args, parallel=par, world_size=64, seq_len=2048)
    work = Workload(micro_batch=2, grad_accum=1, seq_len=2048, compute_dtype=torch.bfloat16)
    fast = estimate(args, rehearsal=r, parallel=par, work=work, cluster=A100)
    half = estimate(args, rehearsal=r, parallel=par, work=work, cluster=dataclasses.replace(A100, gemm_efficiency=A100.gemm_efficiency / 2))
    slow_net = estimate(args, rehearsal=r, parallel=par, work=work, cluster=dataclasses.replace(A100, inter_node_gbps=2.5))
    assert half.time.compute == pytest.approx(2 * fast.time.compute)
    assert slow_net.time.compute == fast.time.compute and slow_net.time.fsdp_exposed > fast.time.fsdp_exposed
    assert fast.mfu == pytest.approx(fast.model_flops_per_gpu / (fast.time.total * fast.peak_flops))


def test_selective_ffn_sits_between_selective_and_full():
    """The FFN-rerunning policy keeps fewer activation bytes than selective and more than full, and costs
    its two rerun matmuls (4 d F FLOPs per token and layer) in compute time, less than full's forward."""
    args = PRESETS["llama1_7b"]
    r = rehearse(args, parallel=ParallelConfig(), world_size=64, seq_len=2048)
    work = Workload(micro_batch=2, grad_accum=1, seq_len=2048, compute_dtype=torch.bfloat16)
    est = {mode: estimate(args, rehearsal=r, parallel=ParallelConfig(ac=ACConfig(mode=mode)), work=work, cluster=A100)
           for mode in (ACMode.selective, ACMode.selective_ffn, ACMode.full)}  # fmt: skip
    acts = {mode: e.memory.activations for mode, e in est.items()}
    assert acts[ACMode.full] < acts[ACMode.selective_ffn] < acts[ACMode.selective]
    rate = A100.bf16_peak * A100.gemm_efficiency
    rerun = 4 * args.dim * args.ffn_hidden_dim * args.n_layers * work.micro_tokens / rate
    extra = est[ACMode.selective_ffn].time.compute - est[ACMode.selective].time.compute
    assert extra == pytest.approx(rerun, rel=1e-9)
    assert est[ACMode.selective_ffn].time.compute < est[ACMode.full].time.compute


def test_validation_table_marks_published_out_of_memory_runs():
    from planner.validate import markdown

    base = {"gpus": 64, "calibration": False, "layout": "tp1 rep1 full mb2", "memory_gib": 90.0}
    rows = [{**base, "run": "agrees", "published_oom": True, "fits": False, "published_tokens_per_sec_per_gpu": None,
             "predicted_tokens_per_sec_per_gpu": 1.0},
            {**base, "run": "disagrees", "published_oom": True, "fits": True, "published_tokens_per_sec_per_gpu": None,
             "predicted_tokens_per_sec_per_gpu": 1.0},
            {**base, "run": "ran", "published_oom": False, "fits": True, "published_tokens_per_sec_per_gpu": 100.0,
             "predicted_tokens_per_sec_per_gpu": 90.0, "error": -0.1}]  # fmt: skip
    lines = markdown(rows).splitlines()[2:]
    assert "| OOM | OOM (agrees) |" in lines[0] and "does not fit" in lines[0]
    assert "**fits (disagrees)**" in lines[1]
    assert "| 100 | 90 | -10.0% |" in lines[2]


def test_budget_reproduces_the_llama_papers_carbon_arithmetic():
    """Table 15 of the LLaMA paper: 65B, 1,022,362 GPU-hours -> 449 MWh -> 173 tCO2eq (400 W, PUE 1.1,
    0.385 kg/kWh). The step time is set so that the run takes the paper's GPU-hours."""
    args = PRESETS["llama1_65b"]
    cluster = dataclasses.replace(A100, gpus=2048)
    chosen = plan_one(args, parallel=ParallelConfig(tp=8), cluster=cluster, seq_len=2048, global_batch_tokens=4 * 2**20,
                      micro_batch=8)  # fmt: skip
    est = chosen.estimate
    steps = 1.4e12 / est.global_batch_tokens
    target_step = 1_022_362 * 3600 / 2048 / steps
    scaled = dataclasses.replace(est, time=dataclasses.replace(est.time, compute=target_step - (est.time.total - est.time.compute)))
    cost = budget(scaled, tokens=1.4e12, cluster=cluster, params=param_counts(args).total)
    assert cost.gpu_hours == pytest.approx(1_022_362, rel=1e-3)
    assert cost.mwh == pytest.approx(449, abs=1)
    assert cost.tco2eq == pytest.approx(173, abs=1)
    # Failures (Llama 3's rate): 2,048 GPUs fail every ~24.8 h; a save of 12 B x 65.3B parameters at 2 GB/s per
    # node x 256 nodes takes ~1.5 s, so checkpoint every sqrt(2 x 1.5 s x 24.8 h) ~ 8.6 min and keep ~98.7%.
    assert cost.mtbf_hours == pytest.approx(24.75, rel=1e-3)
    assert cost.checkpoint_save_s == pytest.approx(12 * param_counts(args).total / (256 * 2e9))
    assert cost.checkpoint_interval_s == pytest.approx((2 * cost.checkpoint_save_s * cost.mtbf_hours * 3600) ** 0.5)
    assert 0.98 < cost.expected_goodput < 0.99 and cost.days_with_failures > cost.days


def _plan(*args: str, tmp_path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "launch.plan", *args, f"plan.out_dir={tmp_path}",
                           f"hydra.run.dir={tmp_path / 'hydra'}"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)  # fmt: skip


def test_plan_command_prints_the_report_and_draws_the_memory(tmp_path):
    done = _plan("model=llama1_7b", "cluster=h100_80gb", "cluster.gpus=16", "parallel.tp=2", "--search", tmp_path=tmp_path)
    assert done.returncode == 0, done.stderr
    out = done.stdout
    for expected in ("memory per GPU", "optimizer", "activations", "fits", "tokens/s per GPU", "MFU", "GPU-hours",
                     "tCO2eq", "layouts fit", "parallel.tp=", "trainer.micro_batch_size="):  # fmt: skip
        assert expected in out, expected
    assert (tmp_path / "report.txt").read_text().strip() in out
    picture = matplotlib.image.imread(tmp_path / "memory.png")  # what a user opens
    assert picture.ndim == 3 and picture.shape[0] > 100 and picture.shape[1] > 100


def test_plan_command_names_an_invalid_layout(tmp_path):
    done = _plan("model=llama1_7b", "cluster.gpus=16", "parallel.tp=3", tmp_path=tmp_path)
    assert done.returncode == 2
    assert "parallel.dp_replicate=1 x parallel.tp=3 does not divide the world size 16" in done.stderr
    assert "Traceback" not in done.stderr


def test_unknown_gpu_needs_its_peak():
    with pytest.raises(ValueError, match="set cluster.peak_flops"):
        ClusterConfig(gpu="Mystery X1")
    assert ClusterConfig(gpu="Mystery X1", peak_flops=1e15).bf16_peak == 1e15


def test_every_cluster_preset_composes():
    from hydra import compose, initialize_config_module

    from conf.schema import to_config

    with initialize_config_module(config_module="conf", version_base="1.3"):
        for preset in sorted(p.stem for p in (REPO / "conf" / "cluster").glob("*.yaml")):
            cfg = to_config(compose(config_name="plan", overrides=[f"cluster={preset}", "model=llama1_7b"]))
            assert cfg.cluster.bf16_peak > 1e14 and cfg.data.seq_len == 2048
            assert isinstance(cfg.model, ModelArgs)
