"""Parallel layouts: validation, and every layout's loss and weights against one process (the loss-compare
tool, gloo on CPU, fp32, fixed seed). The TP layers themselves: tests/trainer/parallel/test_tensor_parallel.py."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn

from launch.harness import LAYOUTS, losses, run_layout
from launch.local import build_command
from launch.loss_compare import compare
from model.config import ModelArgs
from model.llama import Transformer
from tests.distributed import run_workers
from trainer.parallel.config import ACConfig, ParallelConfig
from trainer.parallel.dims import ParallelDims
from trainer.parallel.initialize import model_parameter_name

REPO = Path(__file__).resolve().parents[3]


def test_dp_shard_takes_the_rest_of_the_world():
    dims = ParallelDims.from_config(ParallelConfig(dp_replicate=2, tp=2), world_size=16)
    assert (dims.dp_replicate, dims.dp_shard, dims.tp, dims.dp) == (2, 4, 2, 8)


def test_degrees_must_multiply_to_the_world_size():
    with pytest.raises(ValueError, match=r"parallel.dp_replicate=1 x parallel.dp_shard=2 x parallel.tp=2 = 4, but the world size is 8"):
        ParallelDims.from_config(ParallelConfig(dp_shard=2, tp=2), world_size=8)
    with pytest.raises(ValueError, match="does not divide the world size 6"):
        ParallelDims.from_config(ParallelConfig(tp=4), world_size=6)


def test_tp_must_divide_heads_kv_heads_and_vocab():
    cfg = ParallelConfig(tp=4)
    with pytest.raises(ValueError, match="model.n_kv_heads=2 is not divisible by parallel.tp=4"):
        ParallelDims.for_run(cfg, world_size=4, model=ModelArgs(dim=64, n_heads=4, n_kv_heads=2, vocab_size=512), seq_len=32)
    with pytest.raises(ValueError, match="model.vocab_size=510 is not divisible by parallel.tp=4"):
        ParallelDims.for_run(cfg, world_size=4, model=ModelArgs(dim=64, n_heads=4, vocab_size=510), seq_len=32)
    with pytest.raises(ValueError, match="data.seq_len=30 is not divisible by parallel.tp=4"):
        ParallelDims.for_run(cfg, world_size=4, model=ModelArgs(dim=64, n_heads=4, vocab_size=512), seq_len=30)


def test_dims_built_directly_are_validated():
    """A ParallelDims made without ``from_config`` gets the same checks (``__post_init__``)."""
    assert ParallelDims(dp_replicate=1, dp_shard=-1, tp=2, world_size=8).dp_shard == 4
    with pytest.raises(ValueError, match="but the world size is 8"):
        ParallelDims(dp_replicate=1, dp_shard=2, tp=2, world_size=8)
    with pytest.raises(ValueError, match="parallel.tp must be >= 1"):
        ParallelDims(dp_replicate=1, dp_shard=1, tp=0, world_size=1)


def test_local_launcher_commands():
    one = build_command(nproc=1, overrides=["model=debug"], python="py")
    assert one == ["py", "-m", "launch.train", "model=debug"]
    two = build_command(nproc=2, overrides=["hydra.run.dir=/x"], python="py")
    assert two == ["py", "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "launch.train",
                   "hydra.run.dir=/x"]  # fmt: skip
    # Restarts need torchrun even for one process.
    restarting = build_command(nproc=1, overrides=["hydra.run.dir=/x"], python="py", max_restarts=3)
    assert restarting[:6] == ["py", "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=1",
                              "--max-restarts=3"]  # fmt: skip
    nodes = build_command(nproc=1, overrides=[], python="py", rendezvous=("--nnodes=2", "--rdzv-backend=c10d"))
    assert nodes == ["py", "-m", "torch.distributed.run", "--nnodes=2", "--rdzv-backend=c10d", "--nproc-per-node=1",
                     "-m", "launch.train"]  # fmt: skip


@pytest.mark.parametrize(
    "args, message",
    [
        (["--nproc", "3", "parallel.tp=2"], "parallel.dp_replicate=1 x parallel.tp=2 does not divide the world size 3"),
        (["--nproc", "2", "parallel.tp=2", "data.seq_len=255"], "data.seq_len=255 is not divisible by parallel.tp=2"),
        (["--nproc", "4", "parallel.tp=4", "model=debug", "model.n_kv_heads=2"], "model.n_kv_heads=2 is not divisible"),
        (["--nproc", "2", "model.max_step=3"], "Key 'max_step' not in 'ModelArgs'"),
        # a key from before parallel.* was split by concern: the message names its new key
        (["--nproc", "2", "parallel.activation_checkpoint=full"], "parallel.activation_checkpoint is now parallel.ac.mode"),
    ],
)
def test_local_launcher_refuses_a_bad_layout_once_before_starting(args, message, tmp_path):
    """One message from the launcher, no worker started (nothing under torchrun, no run directory)."""
    proc = subprocess.run([sys.executable, "-m", "launch.local", *args, f"hydra.run.dir={tmp_path / 'run'}"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr and proc.stderr.count("error:") == 1
    assert "torch.distributed.run" not in proc.stdout and not (tmp_path / "run").exists()


def test_local_launcher_sets_what_restarts_need(monkeypatch):
    import launch.local as local

    monkeypatch.delenv("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", raising=False)
    executed = {}
    monkeypatch.setattr(local.os, "execv", lambda path, cmd: executed.update(cmd=cmd, env=dict(os.environ)))
    local.main(["--nproc", "2", "--max-restarts", "2", "--no-check", "hydra.run.dir=/x"])
    assert "--max-restarts=2" in executed["cmd"]
    local.main(["--no-check", "model=debug"])  # one run directory for all ranks, named by the time
    assert executed["cmd"][-1].startswith("hydra.run.dir=outputs/")
    assert executed["env"]["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] == "1"


class _Mlp(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.Linear(16, 32, bias=False)
        self.down = nn.Linear(32, 16, bias=False)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


def _grad_sync_worker(rank: int, world_size: int) -> None:
    """With sync off, backward leaves the sharded .grad unset (no reduce-scatter ran); with sync on, set."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    model = _Mlp()
    fully_shard(model, mesh=init_device_mesh("cpu", (world_size,)))
    x = torch.randn(4, 16)
    model.set_requires_gradient_sync(False)
    model(x).sum().backward()
    assert all(p.grad is None for p in model.parameters())
    model.set_requires_gradient_sync(True)
    model(x).sum().backward()
    assert all(p.grad is not None for p in model.parameters())
    dist.barrier()


def test_deferred_grad_sync_skips_the_reduce_scatter():
    run_workers(_grad_sync_worker, world_size=2)


@pytest.fixture(scope="module")
def layout_runs(reference_run):
    names = ("single", "fsdp2", "tp2", "fsdp2_tp2", "hsdp2x2", "fsdp2_accum2", "fsdp2_accum2_sync_each")
    return {name: reference_run(name) for name in names}


def test_every_layout_matches_one_process(layout_runs):
    table, ok = compare(layout_runs)
    print(table)
    assert ok, table
    assert table.count("OK") == len(layout_runs) - 1


def test_only_rank0_writes_metrics_and_every_rank_logs_with_its_rank(layout_runs):
    run = layout_runs["fsdp2_tp2"]
    assert (run / "metrics.jsonl").exists() and (run / "summary.json").exists()
    for rank in range(4):
        log = (run / f"train_rank{rank}.log").read_text()
        assert f"[rank{rank}]" in log
    assert "train[10/10]" in (run / "train_rank0.log").read_text()
    assert "train[10/10]" not in (run / "train_rank1.log").read_text()


def _uneven_labels_worker(rank: int, world_size: int) -> None:
    """Ranks with different numbers of valid labels: loss, grad norm and update equal one process's."""
    from trainer.run.config import OptimConfig
    from trainer.run.optim import build_lr_scheduler, build_optimizer
    from trainer.run.step import IGNORE_INDEX, ComputeContext, train_step
    from trainer.parallel.build import build_model

    args = ModelArgs(vocab_size=64, max_seq_len=16)
    cpu = torch.device("cpu")
    gen = torch.Generator().manual_seed(0)
    inputs = torch.randint(0, 64, (4, 8), generator=gen)
    labels = torch.randint(0, 64, (4, 8), generator=gen)
    labels[2:, 1:] = IGNORE_INDEX  # rank 1's half keeps 2 valid labels, rank 0's all 16
    optim_cfg = OptimConfig(warmup_steps=1, lr=1e-2)

    def step(model, ctx, batch):
        opt = build_optimizer(model, optim_cfg)
        sched = build_lr_scheduler(opt, optim_cfg, max_steps=2)
        return train_step(model, opt, sched, [batch], ctx=ctx, grad_clip=0.0, step=1)

    reference = build_model(args, device=cpu, seed=0)
    ref_out = step(reference, ComputeContext(device=cpu, dtype=torch.float32), {"inputs": inputs, "labels": labels})

    dims = ParallelDims.from_config(ParallelConfig(), world_size=world_size).with_meshes(device_type="cpu")
    sharded = build_model(args, device=cpu, seed=0, dims=dims, parallel=ParallelConfig())
    ctx = ComputeContext(device=cpu, dtype=torch.float32, dims=dims)
    half = slice(2 * rank, 2 * rank + 2)
    out = step(sharded, ctx, {"inputs": inputs[half], "labels": labels[half]})

    assert out.tokens == ref_out.tokens == 18
    assert abs(out.loss - ref_out.loss) <= 1e-6 * ref_out.loss
    assert abs(out.grad_norm - ref_out.grad_norm) <= 1e-5 * ref_out.grad_norm
    for (name, param), ref_param in zip(sharded.named_parameters(), reference.parameters()):
        torch.testing.assert_close(param.full_tensor(), ref_param, rtol=1e-5, atol=1e-6, msg=name)


def test_loss_is_the_global_token_mean_with_uneven_valid_labels():
    run_workers(_uneven_labels_worker, world_size=2)


def test_loss_compare_flags_a_disagreeing_layout(tmp_path):
    """The comparison can fail: a loss off by 1e-4 relative, or weights off by 1e-3, is a mismatch."""
    import json

    weights = {"w": torch.ones(4, 4)}

    def fake_run(name, losses, scale=1.0):
        run = tmp_path / name
        run.mkdir()
        (run / "summary.json").write_text(json.dumps({"losses": losses}))
        torch.save({k: v * scale for k, v in weights.items()}, run / "final_model.pt")
        return run

    runs = {"single": fake_run("single", [2.0, 1.5]), "same": fake_run("same", [2.0, 1.5 * (1 + 1e-7)])}
    assert compare(runs)[1]
    runs["loss_off"] = fake_run("loss_off", [2.0, 1.5 * (1 + 1e-4)])
    table, ok = compare(runs)
    assert not ok and "loss_off vs single" in table and "MISMATCH" in table
    del runs["loss_off"]
    runs["weights_off"] = fake_run("weights_off", [2.0, 1.5], scale=1 + 1e-3)
    assert not compare(runs)[1]


def test_fsdp_bf16_mixed_precision_tracks_fp32(tmp_path):
    """bf16 parameters/compute with fp32 gradient reduction: close to the fp32 run, not equal (bf16 keeps
    8 bits of mantissa, so 2% on the loss after a few steps is the expected scale, not a bug)."""
    fp32 = run_layout(LAYOUTS["fsdp2"], workdir=tmp_path, steps=3)
    bf16 = run_layout(
        LAYOUTS["fsdp2"].__class__("fsdp2_bf16", nproc=2, dp=2, overrides=("trainer.precision=bf16",)),
        workdir=tmp_path, steps=3,
    )  # fmt: skip
    a, b = losses(fp32), losses(bf16)
    assert a != b  # bf16 really ran
    for x, y in zip(a, b):
        assert abs(x - y) <= 2e-2 * x


def _slow_rank0_prepare_worker(rank: int, world_size: int, store_path: str) -> None:
    """A process group whose timeout (3 s) is shorter than rank 0's data preparation (6 s)."""
    from datetime import timedelta

    import trainer.run.train as train_module
    from data.config import DataConfig
    from trainer.parallel.distributed import DistEnv

    dist.destroy_process_group()  # the harness's group; this one has a short timeout
    dist.init_process_group("gloo", store=dist.FileStore(store_path, world_size), rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=3))  # fmt: skip

    def prepare(cfg):
        if rank == 0:
            import time

            time.sleep(6)
        return f"prepared by rank {rank}"

    train_module.prepare_data = prepare
    cfg = DataConfig(prepare_timeout_minutes=0.5)
    out = train_module.prepare_data_rank0_first(cfg, env=DistEnv(rank=rank, local_rank=rank, world_size=world_size))
    assert out == f"prepared by rank {rank}"
    dist.barrier()  # the default group still works afterwards


def test_ranks_wait_for_rank0s_data_preparation_longer_than_the_group_timeout(tmp_path):
    run_workers(_slow_rank0_prepare_worker, world_size=2, args=(str(tmp_path / "store"),))


# Uneven FSDP shards (vocab 98 over 4 ranks: 25, 25, 24, 24 rows) and GQA heads split by TP.
_INIT_ARGS = ModelArgs(dim=48, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=98, max_seq_len=16)


def _init_worker(rank: int, world_size: int, layouts: list[dict]) -> None:
    """Every layout's initial weights, gathered, equal the one-process init_weights under the same seed."""
    from trainer.parallel.build import build_model

    reference = build_model(_INIT_ARGS, device=torch.device("cpu"), seed=7)
    plain = Transformer(_INIT_ARGS)
    plain.init_weights(seed=7)
    for name, param in reference.named_parameters():
        assert torch.equal(param, dict(plain.named_parameters())[name]), name
    for layout in layouts:
        cfg = ParallelConfig(**layout)
        dims = ParallelDims.from_config(cfg, world_size=world_size).with_meshes(device_type="cpu")
        model = build_model(_INIT_ARGS, device=torch.device("cpu"), seed=7, dims=dims, parallel=cfg)
        for raw_name, param in model.named_parameters():
            name = model_parameter_name(raw_name)
            full = param.full_tensor() if hasattr(param, "full_tensor") else param
            assert torch.equal(full, dict(reference.named_parameters())[name]), (layout, name)


@pytest.mark.parametrize(
    "world_size, layouts",
    [
        (2, [{}, {"tp": 2}, {"ac": ACConfig(mode="full")}]),
        (4, [{"tp": 2}, {"dp_replicate": 2}, {"dp_replicate": 2, "tp": 2}]),
    ],
    ids=["fsdp2_tp2_fullac", "fsdp2xtp2_hsdp2x2_hsdp2xtp2"],
)
def test_every_layout_starts_from_the_same_weights(world_size, layouts):
    run_workers(_init_worker, world_size=world_size, args=(layouts,))
