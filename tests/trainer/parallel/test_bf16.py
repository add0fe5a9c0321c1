"""bf16 training, the GPU's default precision, in every layout and activation-checkpointing policy, on CPU.

The layouts take both of the trainer's bf16 code paths:
- autocast (fp32 parameters, bf16 matmuls): one process, and TP 2 without FSDP;
- FSDP2 mixed precision (bf16 parameters, fp32 gradient reduction, no autocast): FSDP over one rank
  (``parallel.fsdp.one_rank``, what one GPU runs), FSDP 2, and FSDP 2 x TP 2.
Each runs the debug-sized model (GQA, so TP splits kv heads too) under each AC policy and is compared with
the fp32 single-process run on the same batches: the first step's gradients and three steps of loss.
On CPU the AC policies do the same arithmetic, so within a layout they must agree bitwise.

Two bf16 defects are checked where they would hide in a small numerical difference: the RoPE table must
reach ``apply_rope`` in fp32 (FSDP's default casts forward inputs to bf16), and no gradient all-reduce may
run in bf16 (the sequence-parallel norm gain's).
"""

from __future__ import annotations

import functools

import pytest
import torch
import torch.distributed as dist

import model.llama as llama
from model.config import ModelArgs
from tests.distributed import run_workers
from trainer.parallel.build import build_model
from trainer.parallel.config import ACConfig, ACMode, FSDPConfig, ParallelConfig
from trainer.parallel.dims import ParallelDims
from trainer.run.config import OptimConfig
from trainer.run.optim import build_lr_scheduler, build_optimizer
from trainer.run.step import ComputeContext, global_token_count, token_loss_sum, train_step

ARGS = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=128, max_seq_len=32)
GLOBAL_BATCH, SEQ, STEPS = 4, 16, 3
AC_MODES = (ACMode.none, ACMode.selective, ACMode.selective_ffn, ACMode.full, ACMode.every_k)
OPTIM = OptimConfig(lr=3e-3, warmup_steps=1)
LAYOUTS = {  # name: (processes, tp, fsdp_one_rank)
    "single": (1, 1, False),
    "fsdp1": (1, 1, True),
    "tp2": (2, 2, False),
    "fsdp2": (2, 1, False),
    "fsdp2_tp2": (4, 2, False),
}

# Tolerances against fp32, from bf16's 8-bit mantissa (relative rounding up to 2^-9 = 2e-3 per op) and
# what the layouts measure (printed with -s; torch 2.13, 2026-12-01):
# - first-step gradients, worst tensor's ||g_bf16 - g_fp32|| / ||g_fp32||: 7.4e-3 (autocast) to 9.5e-3
#   (FSDP x TP, whose bf16 parameters and residual stream round more than autocast's fp32 ones): a few
#   roundings of 2e-3 from the loss back to the first layer. Bound 3e-2, three times the worst measured;
#   a wrong backward (a missing term, a wrong shard, a dropped reduction) is off by O(1).
# - loss, worst |l_bf16 - l_fp32| / l_fp32 over three steps: 2.4e-4 to 5.9e-4. Bound 3e-3.
GRAD_RTOL = 3e-2
LOSS_RTOL = 3e-3


def _batches() -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    out = []
    for _ in range(STEPS + 1):  # the first is for the gradient check
        tokens = torch.randint(0, ARGS.vocab_size, (GLOBAL_BATCH, SEQ + 1), generator=gen)
        out.append({"inputs": tokens[:, :-1], "labels": tokens[:, 1:]})
    return out


def _plain_name(name: str) -> str:
    return name.replace("_checkpoint_wrapped_module.", "")


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def run_layout(*, world_size: int, tp: int, fsdp_one_rank: bool, dtype: torch.dtype, modes=AC_MODES,
               device: torch.device = torch.device("cpu"), compile: bool = False) -> dict:  # fmt: skip
    """{mode: (first-step gradients by name, losses of STEPS steps)} on this rank; every rank must call it.

    Also used by the GPU tests (tests/gpu/) with ``device`` a CUDA device."""
    dims = ParallelDims.from_config(ParallelConfig(tp=tp, fsdp=FSDPConfig(one_rank=fsdp_one_rank)), world_size=world_size)
    dims = dims.with_meshes(device_type=device.type)
    dp_rank = dims.dp_rank()
    local = slice(dp_rank * GLOBAL_BATCH // dims.dp, (dp_rank + 1) * GLOBAL_BATCH // dims.dp)
    batches = [{k: v[local].to(device) for k, v in b.items()} for b in _batches()]
    ctx = ComputeContext(device=device, dtype=dtype, dims=dims)
    records = {}
    for mode in modes:
        parallel = ParallelConfig(tp=tp, fsdp=FSDPConfig(one_rank=fsdp_one_rank), ac=ACConfig(mode=mode), compile=compile)
        model = build_model(ARGS, device=device, seed=0, dims=dims, parallel=parallel,
                            compute_dtype=dtype)  # fmt: skip
        first = batches[0]
        count = global_token_count([first], ctx=ctx)
        with ctx.loss_context():
            (token_loss_sum(model, first, ctx=ctx) * ctx.dp / count).backward()
        grads = {_plain_name(n): _full(p.grad).detach().cpu().clone() for n, p in model.named_parameters()}
        model.zero_grad(set_to_none=True)
        optimizer = build_optimizer(model, OPTIM)
        scheduler = build_lr_scheduler(optimizer, OPTIM, max_steps=STEPS)
        losses = [train_step(model, optimizer, scheduler, [b], ctx=ctx, grad_clip=1.0, step=i + 1).loss
                  for i, b in enumerate(batches[1:])]  # fmt: skip
        records[mode.value] = (grads, losses)
    return records


class _Spies:
    """Records the dtype of every RoPE table ``apply_rope`` receives and of every non-scalar all-reduce."""

    def __init__(self):
        self.rope_dtypes: set[torch.dtype] = set()
        self.all_reduce_dtypes: set[torch.dtype] = set()

    def install(self, patch) -> None:
        original_rope, original_all_reduce = llama.apply_rope, dist.all_reduce

        def rope(x, table):
            self.rope_dtypes.add(table.dtype)
            return original_rope(x, table)

        def all_reduce(tensor, *args, **kwargs):
            if tensor.is_floating_point() and tensor.ndim > 0:  # not the loss / token-count scalars
                self.all_reduce_dtypes.add(tensor.dtype)
            return original_all_reduce(tensor, *args, **kwargs)

        patch(llama, "apply_rope", rope)
        patch(dist, "all_reduce", all_reduce)


def _layout_worker(rank: int, world_size: int, tp: int, fsdp_one_rank: bool, out: str) -> None:
    spies = _Spies()
    spies.install(setattr)  # a spawned process of its own: nothing to restore
    records = run_layout(world_size=world_size, tp=tp, fsdp_one_rank=fsdp_one_rank, dtype=torch.bfloat16)
    if rank == 0:
        torch.save({"records": records, "rope": spies.rope_dtypes, "all_reduce": spies.all_reduce_dtypes}, out)


@functools.cache
def fp32_reference(device: torch.device = torch.device("cpu")) -> tuple[dict, list]:
    """The fp32 single-process run that every bf16 layout is compared with."""
    return run_layout(world_size=1, tp=1, fsdp_one_rank=False, dtype=torch.float32, modes=(ACMode.selective,),
                      device=device)["selective"]  # fmt: skip


@pytest.mark.parametrize("layout", LAYOUTS)
def test_bf16_tracks_fp32_in_every_layout_and_ac_policy(layout, tmp_path):
    nproc, tp, fsdp_one_rank = LAYOUTS[layout]
    out = tmp_path / "records.pt"
    run_workers(_layout_worker, world_size=nproc, args=(tp, fsdp_one_rank, str(out)))
    saved = torch.load(out, weights_only=False)
    ref_grads, ref_losses = fp32_reference()

    assert saved["rope"] == {torch.float32}, f"apply_rope received a {saved['rope']} RoPE table"
    assert torch.bfloat16 not in saved["all_reduce"], "a gradient was all-reduced in bf16"

    check_against_fp32(saved["records"], reference=(ref_grads, ref_losses), label=layout)
    first_mode, (first_grads, first_losses) = next(iter(saved["records"].items()))
    for mode, (grads, losses) in saved["records"].items():
        # CPU: recomputation repeats the same bf16 arithmetic, so every policy equals the first one exactly.
        # (Not on CUDA, where the flash backward's atomic adds reorder sums: tests/gpu/ uses a tolerance.)
        assert losses == first_losses, (mode, losses, first_mode, first_losses)
        for name in grads:
            assert torch.equal(grads[name], first_grads[name]), (mode, name)


def check_against_fp32(records: dict, *, reference: tuple[dict, list], label: str) -> None:
    """Every mode's first-step gradients and losses within GRAD_RTOL / LOSS_RTOL of the fp32 reference."""
    ref_grads, ref_losses = reference
    for mode, (grads, losses) in records.items():
        worst = max(((grads[n].float() - g).norm() / g.norm()).item() for n, g in ref_grads.items())
        loss_rel = max(abs(a - b) / b for a, b in zip(losses, ref_losses))
        print(f"{label} {mode}: grad rel err max {worst:.2e}, loss rel err max {loss_rel:.2e}")
        assert set(grads) == set(ref_grads)
        for name, ref in ref_grads.items():
            assert ref.norm() > 1e-3, name  # a real gradient, not one that passes by being ~0
            assert grads[name].dtype == torch.float32, (name, grads[name].dtype)  # fp32 master gradients
            err = ((grads[name].float() - ref).norm() / ref.norm()).item()
            assert err <= GRAD_RTOL, (label, mode, name, err)
        assert losses != ref_losses  # bf16 really ran
        assert loss_rel <= LOSS_RTOL, (label, mode, losses, ref_losses)
