"""Parallel layouts: validation, and every layout's loss and weights against one process (the loss-compare
tool, gloo on CPU, fp32, fixed seed). The TP layers themselves: tests/trainer/test_tensor_parallel.py."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch import nn

from launch.local import build_command
from launch.loss_compare import LAYOUTS, compare, run_layout
from model.config import ModelArgs
from tests.distributed import run_workers
from trainer.config import ParallelConfig
from trainer.parallel_dims import ParallelDims


def test_dp_shard_takes_the_rest_of_the_world():
    dims = ParallelDims.from_config(ParallelConfig(dp_replicate=2, tp=2), world_size=16)
    assert (dims.dp_replicate, dims.dp_shard, dims.tp, dims.dp) == (2, 4, 2, 8)


def test_degrees_must_multiply_to_the_world_size():
    with pytest.raises(ValueError, match=r"parallel.dp_replicate=1 x parallel.dp_shard=2 x parallel.tp=2 = 4, but the world size is 8"):
        ParallelDims.from_config(ParallelConfig(dp_shard=2, tp=2), world_size=8)
    with pytest.raises(ValueError, match="does not divide the world size 6"):
        ParallelDims.from_config(ParallelConfig(tp=4), world_size=6)


def test_tp_must_divide_heads_kv_heads_and_vocab():
    dims = ParallelDims.from_config(ParallelConfig(tp=4), world_size=4)
    with pytest.raises(ValueError, match="model.n_kv_heads=2 is not divisible by parallel.tp=4"):
        dims.check_model(ModelArgs(dim=64, n_heads=4, n_kv_heads=2, vocab_size=512))
    with pytest.raises(ValueError, match="model.vocab_size=510 is not divisible by parallel.tp=4"):
        dims.check_model(ModelArgs(dim=64, n_heads=4, vocab_size=510))
    with pytest.raises(ValueError, match="data.seq_len=30 is not divisible by parallel.tp=4"):
        dims.check_seq_len(30)


def test_local_launcher_commands():
    one = build_command(nproc=1, overrides=["model=debug"], python="py")
    assert one[:3] == ["py", "-m", "trainer.train"] and one[3] == "model=debug"
    assert one[4].startswith("hydra.run.dir=outputs/")
    two = build_command(nproc=2, overrides=["hydra.run.dir=/x"], python="py")
    assert two == ["py", "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "trainer.train",
                   "hydra.run.dir=/x"]  # fmt: skip


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
    from trainer.config import OptimConfig
    from trainer.optim import build_lr_scheduler, build_optimizer
    from trainer.step import IGNORE_INDEX, ComputeContext, train_step
    from trainer.train import build_model

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

    dims = ParallelDims.from_config(ParallelConfig(), world_size=world_size)
    meshes = dims.build_meshes(device_type="cpu")
    sharded = build_model(args, device=cpu, seed=0, meshes=meshes, dims=dims, parallel=ParallelConfig())
    ctx = ComputeContext(device=cpu, dtype=torch.float32, dp_mesh=meshes.dp, dp=dims.dp, fsdp_mixed_precision=True)
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
    import json

    fp32 = run_layout(LAYOUTS["fsdp2"], workdir=tmp_path, steps=3)
    bf16 = run_layout(
        LAYOUTS["fsdp2"].__class__("fsdp2_bf16", nproc=2, dp=2, overrides=("trainer.precision=bf16",)),
        workdir=tmp_path, steps=3,
    )  # fmt: skip
    a = json.loads((fp32 / "summary.json").read_text())["losses"]
    b = json.loads((bf16 / "summary.json").read_text())["losses"]
    assert a != b  # bf16 really ran
    for x, y in zip(a, b):
        assert abs(x - y) <= 2e-2 * x
