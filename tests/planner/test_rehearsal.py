"""The planner's rehearsal: the trainer's construction code in fake worlds of 8 to 512 ranks, and its
per-rank figures against what a real 2-process gloo run allocates."""

from __future__ import annotations

import json

import pytest
import torch
import torch.distributed as dist

from compat import local_tensor
from model.config import ModelArgs
from model.flops import param_counts
from model.ops.memory import saved_bytes
from planner.estimate import ADAMW_STATES, Workload, activation_bytes
from planner.rehearsal import every_rank_local_numel, rehearse
from planner.search import planned_parallel
from tests.distributed import run_workers
from tests.planner.conftest import PRESETS
from trainer.parallel.build import build_model
from trainer.parallel.config import ACConfig, ACMode, ParallelConfig
from trainer.parallel.dims import ParallelDims
from trainer.run.config import OptimConfig
from trainer.run.optim import build_optimizer
from trainer.run.step import ComputeContext, token_loss_sum


def _replication(name: str, parallel: ParallelConfig) -> int:
    """How many ranks hold each element of a parameter: HSDP replicas, and TP ranks for the norm gains."""
    return parallel.dp_replicate * (parallel.tp if name.endswith("norm.weight") else 1)


@pytest.mark.parametrize(
    "preset, world, parallel",
    [
        ("debug", 8, ParallelConfig()),
        ("debug", 8, ParallelConfig(tp=2)),
        ("debug", 8, ParallelConfig(tp=2, dp_replicate=2)),
        ("small", 64, ParallelConfig(tp=4)),
        ("small", 64, ParallelConfig(dp_replicate=4)),
        ("llama1_7b", 64, ParallelConfig(tp=8)),
        ("llama1_65b", 512, ParallelConfig(tp=8, dp_replicate=2)),
        ("llama2_70b", 512, ParallelConfig(tp=8)),
    ],
)
def test_local_shards_partition_every_parameter(preset, world, parallel):
    """Summed over all ranks, each parameter's local shards cover it exactly once per replica: nothing
    lost, nothing doubled, whatever the padding."""
    args = PRESETS[preset]
    seq_len = 256
    totals = 0
    for name, counts in every_rank_local_numel(args, parallel=parallel, world_size=world, seq_len=seq_len):
        totals += sum(counts) // _replication(name, parallel)
        assert sum(counts) % _replication(name, parallel) == 0, name
    rank0 = rehearse(args, parallel=parallel, world_size=world, seq_len=seq_len)
    assert totals == rank0.param_count == param_counts(args).total


@pytest.mark.parametrize("rank", [0, 3, 7])
def test_rehearsal_reads_what_each_rank_builds(rank):
    """The shards rank ``rank`` really builds (its own fake-world rehearsal) match what DTensor's placement
    arithmetic gives for that rank from rank 0's model; padded storage is the same on every rank."""
    # The vocabulary shard of 65 rows splits 17 + 17 + 17 + 14 over dp_shard 4: rank 7 (last) is short.
    args = ModelArgs(dim=40, n_heads=4, vocab_size=130, multiple_of=16)
    parallel, world = ParallelConfig(tp=2), 8
    shares = {name: counts[rank] for name, counts in every_rank_local_numel(args, parallel=parallel, world_size=world, seq_len=64)}
    mine = rehearse(args, parallel=parallel, world_size=world, seq_len=64, rank=rank)
    first = rehearse(args, parallel=parallel, world_size=world, seq_len=64, rank=0)
    assert mine.local_numel == sum(shares.values())
    assert mine.padded_numel == first.padded_numel  # FSDP pads every rank to rank 0's (ceil) shard
    if rank == 7:
        assert mine.local_numel < mine.padded_numel  # the last ranks' shards are short: padding is real here


@pytest.mark.parametrize(
    "parallel, world, message",
    [
        (ParallelConfig(tp=3), 8, "does not divide the world"),
        (ParallelConfig(tp=8), 8, "model.n_heads=4 is not divisible by parallel.tp=8"),
        (ParallelConfig(dp_shard=3), 8, "but the world size is 8"),
    ],
)
def test_invalid_layouts_fail_as_in_training(parallel, world, message):
    with pytest.raises(ValueError, match=message) as planned:
        rehearse(ModelArgs(), parallel=parallel, world_size=world, seq_len=64)
    with pytest.raises(ValueError) as trained:
        ParallelDims.for_run(parallel, world_size=world, model=ModelArgs(), seq_len=64)
    assert str(planned.value) == str(trained.value)


def test_sequence_not_divisible_by_tp_fails_as_in_training():
    with pytest.raises(ValueError, match="data.seq_len=66 is not divisible by parallel.tp=4"):
        rehearse(ModelArgs(), parallel=ParallelConfig(tp=4), world_size=8, seq_len=66)


def test_rehearsal_leaves_no_process_group_behind():
    rehearse(ModelArgs(), parallel=ParallelConfig(tp=2), world_size=4, seq_len=64)
    assert not dist.is_initialized()


# --- the planner against a real run ------------------------------------------------------------------------


def _storage_bytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        storage = local_tensor(t).untyped_storage()
        if storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            total += storage.nbytes()
    return total


def _measure_worker(rank: int, world_size: int, cases: list, out: str) -> None:
    """One real step's allocations on this rank for each case: parameters, gradients, AdamW state, and the
    bytes autograd saves during the forward."""
    for index, (args, parallel, micro, seq_len, dtype_name) in enumerate(cases):
        dtype = getattr(torch, dtype_name)
        dims = ParallelDims.for_run(parallel, world_size=world_size, model=args, seq_len=seq_len)
        dims = dims.with_meshes(device_type="cpu")
        ctx = ComputeContext(device=torch.device("cpu"), dtype=dtype, dims=dims)
        model = build_model(args, device=torch.device("cpu"), seed=0, dims=dims, parallel=parallel, compute_dtype=dtype)
        optimizer = build_optimizer(model, OptimConfig())
        gen = torch.Generator().manual_seed(dims.dp_rank() if dims.meshes else 0)  # TP ranks see the same batch
        tokens = torch.randint(0, args.vocab_size, (micro, seq_len + 1), generator=gen)
        batch = {"inputs": tokens[:, :-1].contiguous(), "labels": tokens[:, 1:].contiguous()}
        params = list(model.parameters())
        with ctx.loss_context():
            kept = {}

            def forward():
                kept["loss"] = token_loss_sum(model, batch, ctx=ctx)

            # Asked at each save: FSDP swaps the unsharded parameters in during forward.
            activations = saved_bytes(forward, params=lambda: [*model.parameters(), *model.buffers()]).activations
            kept["loss"].backward()
        grads = _storage_bytes([p.grad for p in params])
        optimizer.step()
        states = [v for state in optimizer.state.values() for key, v in state.items() if key != "step"]
        with open(f"{out}/case{index}_rank{rank}.json", "w") as f:
            json.dump({"parameters": _storage_bytes(params), "gradients": grads, "optimizer": _storage_bytes(states),
                       "activations": activations}, f)  # fmt: skip


def _planned(args: ModelArgs, parallel: ParallelConfig, *, micro: int, seq_len: int, dtype: torch.dtype,
             world: int, rank: int) -> dict:  # fmt: skip
    r = rehearse(args, parallel=parallel, world_size=world, seq_len=seq_len, rank=rank, compute_dtype=dtype)
    work = Workload(micro_batch=micro, grad_accum=1, seq_len=seq_len, compute_dtype=dtype)
    return {
        "parameters": r.padded_numel * 4,
        "gradients": r.padded_numel * 4,
        "optimizer": ADAMW_STATES * r.local_numel * 4,
        "activations": activation_bytes(args, parallel=parallel, work=work, tp=parallel.tp),
    }


def compare_with_real_run(layouts: dict, *, models: dict, world: int, tmp_path) -> list[tuple]:
    """Run every (model, layout, dtype) in ``world`` gloo processes and return (case, rank, planned, real)."""
    cases, names = [], []
    for model_name, args in models.items():
        for layout_name, layout in layouts.items():
            for dtype_name in ("float32", "bfloat16"):
                # As planned: bf16 through FSDP's mixed precision, on a mesh of one where dp is 1.
                parallel = planned_parallel(layout, world_size=world, compute_dtype=getattr(torch, dtype_name))
                cases.append((args, parallel, 2, 32, dtype_name))
                names.append(f"{model_name}/{layout_name}/{dtype_name}")
    run_workers(_measure_worker, world_size=world, args=(cases, str(tmp_path)))
    results = []
    for index, ((args, parallel, micro, seq_len, dtype_name), name) in enumerate(zip(cases, names)):
        for rank in range(world):
            real = json.loads((tmp_path / f"case{index}_rank{rank}.json").read_text())
            planned = _planned(args, parallel, micro=micro, seq_len=seq_len, dtype=getattr(torch, dtype_name),
                               world=world, rank=rank)  # fmt: skip
            results.append((name, rank, planned, real))
    return results


# A width that does not split evenly everywhere (the vocabulary's 130 rows, GQA with 2 kv heads).
UNEVEN = ModelArgs(dim=40, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=130, multiple_of=16, max_seq_len=32)


def test_planner_figures_equal_a_real_two_process_run(tmp_path):
    """Per rank, in fp32 and bf16: parameter, gradient and optimizer bytes equal the real tensors' storage;
    activation bytes equal what autograd really saved (``model.ops.memory.saved_bytes``)."""
    layouts = {"fsdp2": ParallelConfig(), "fsdp2_full_ac": ParallelConfig(ac=ACConfig(mode=ACMode.full)),
               "tp2": ParallelConfig(tp=2), "tp2_no_ac": ParallelConfig(tp=2, ac=ACConfig(mode=ACMode.none))}  # fmt: skip
    for name, rank, planned, real in compare_with_real_run(layouts, models={"uneven": UNEVEN}, world=2, tmp_path=tmp_path):
        assert planned == real, (name, rank)


@pytest.mark.slow
def test_planner_figures_equal_a_real_four_process_run(tmp_path):
    """The same at 4 processes for the debug and small presets: FSDP, TP, FSDP x TP, HSDP."""
    layouts = {"fsdp4": ParallelConfig(), "tp4": ParallelConfig(tp=4), "fsdp2_tp2": ParallelConfig(tp=2),
               "hsdp2x2": ParallelConfig(dp_replicate=2), "hsdp_tp2": ParallelConfig(dp_replicate=2, tp=2)}  # fmt: skip
    models = {"debug": PRESETS["debug"], "small": PRESETS["small"]}
    for name, rank, planned, real in compare_with_real_run(layouts, models=models, world=4, tmp_path=tmp_path):
        assert planned == real, (name, rank)
