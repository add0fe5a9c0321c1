"""A packed, document-masked batch under FSDP 2, TP 2 and pp 2 (gloo) gives the loss and the gradients of its
documents run one by one, unpacked, in one process (fp32)."""

from __future__ import annotations

import pytest
import torch

from model.config import ModelArgs
from tests.distributed import run_workers
from trainer.parallel.build import build_stages
from trainer.parallel.config import ACConfig, ACMode, ParallelConfig
from trainer.parallel.dims import ParallelDims
from trainer.parallel.distributed import dp_sum
from trainer.parallel.pipeline import Pipeline
from trainer.run.step import IGNORE_INDEX, ComputeContext, cross_entropy_sum, global_token_count, token_loss_sum

ARGS = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=128, max_seq_len=32)
# Four rows of 16 tokens (two per data-parallel rank), each packing two to four documents.
LENGTHS = [[5, 11], [3, 4, 9], [16], [2, 6, 3, 5]]
# pp2: the ids travel to both stages, cut into the schedule's two micro-batches with the rows; pp2_tp2 (4
# processes, slow): the later stage's input is a sequence shard while the ids are whole.
LAYOUTS = {"fsdp2": ParallelConfig(), "tp2": ParallelConfig(tp=2), "pp2": ParallelConfig(pp=2),
           "pp2_tp2": ParallelConfig(pp=2, tp=2)}  # fmt: skip
WORLD = {"pp2_tp2": 4}  # processes; 2 for the others
FAST = [layout if layout not in WORLD else pytest.param(layout, marks=pytest.mark.slow) for layout in LAYOUTS]
# fp32: the same sums in another order (shards, GEMM shapes, the reduce-scatter): ~1e-7 of the gradient's
# size measured; a document that saw another, or a lost reduction, is off by O(1).
RTOL = 1e-6


def batch() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    documents = torch.tensor([[d for d, n in enumerate(row) for _ in range(n)] for row in LENGTHS])
    inputs = torch.randint(0, ARGS.vocab_size, documents.shape, generator=gen)
    labels = torch.randint(0, ARGS.vocab_size, documents.shape, generator=gen)
    positions = torch.cat([torch.arange(n) for row in LENGTHS for n in row]).view(documents.shape)
    labels[positions < 2] = IGNORE_INDEX  # each document's first two tokens are its "prompt"
    return {"inputs": inputs, "labels": labels, "documents": documents}


def loss_and_grads(*, parallel: ParallelConfig, world_size: int, packed: bool,
                   dtype: torch.dtype = torch.float32) -> tuple[float, dict]:  # fmt: skip
    """The global batch's mean loss and gradients; every rank calls it."""
    dims = ParallelDims.from_config(parallel, world_size=world_size).with_meshes(device_type="cpu")
    ctx = ComputeContext(device=torch.device("cpu"), dtype=dtype, dims=dims)
    model, stages = build_stages(ARGS, device=ctx.device, seed=0, dims=dims, parallel=parallel, compute_dtype=dtype)
    full = batch()
    rows = slice(dims.dp_rank() * 4 // dims.dp, (dims.dp_rank() + 1) * 4 // dims.dp)
    mine = {k: v[rows] for k, v in full.items()}
    if packed:
        micro = [mine]
    else:  # every document a batch of its own, no document ids: the plain model
        micro = [{"inputs": mine["inputs"][r:r + 1, w], "labels": mine["labels"][r:r + 1, w]}
                 for r in range(mine["inputs"].shape[0]) for d in mine["documents"][r].unique()
                 for w in [mine["documents"][r] == d]]  # fmt: skip
    count = global_token_count(micro, ctx=ctx)
    total = 0.0
    if dims.pp_enabled:  # every stage reports the loss sum; each holds its own parameters' gradients
        pipeline = Pipeline(stages, dims, cfg=parallel, device=ctx.device, loss=cross_entropy_sum)
        with ctx.loss_context(), ctx.autocast():
            total = float(pipeline.loss_sum(mine, scale=ctx.dp / count))
        micro = []
    for mb in micro:
        with ctx.loss_context():
            loss = token_loss_sum(model, mb, ctx=ctx)
            (loss * ctx.dp / count).backward()
        total += float(loss.full_tensor() if hasattr(loss, "full_tensor") else loss)
    grads = {n.replace("_checkpoint_wrapped_module.", ""): (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad).float().clone()
             for n, p in model.named_parameters()}  # fmt: skip
    return float(dp_sum(torch.tensor(total), dp_mesh=ctx.dp_mesh)) / float(count), grads


def _worker(rank: int, world_size: int, layout: str, out: str, dtype: torch.dtype = torch.float32) -> None:
    loss, grads = loss_and_grads(parallel=LAYOUTS[layout], world_size=world_size, packed=True, dtype=dtype)
    torch.save({"loss": loss, "grads": grads}, f"{out}.{rank}")


def _saved(out) -> dict:
    """Rank 0's loss and every rank's gradients (a pipeline stage holds only its own parameters)."""
    ranks = [torch.load(path) for path in sorted(out.parent.glob(f"{out.name}.*"))]
    return {"loss": ranks[0]["loss"], "grads": {name: g for rank in ranks for name, g in rank["grads"].items()}}


@pytest.mark.parametrize("layout", FAST)
def test_packed_documents_under_fsdp_and_tp_equal_one_by_one_in_one_process(layout, tmp_path):
    ref_loss, reference = loss_and_grads(parallel=ParallelConfig(), world_size=1, packed=False)
    single_loss, packed_single = loss_and_grads(parallel=ParallelConfig(), world_size=1, packed=True)
    run_workers(_worker, world_size=WORLD.get(layout, 2), args=(layout, str(tmp_path / "out.pt")))
    saved = _saved(tmp_path / "out.pt")
    assert single_loss == pytest.approx(ref_loss, rel=RTOL) and saved["loss"] == pytest.approx(ref_loss, rel=RTOL)
    for grads, label in ((packed_single, "one process"), (saved["grads"], layout)):
        assert set(grads) == set(reference)
        for name, ref in reference.items():
            assert ref.norm() > 1e-3, name
            err = ((grads[name] - ref).norm() / ref.norm()).item()
            assert err <= RTOL, (label, name, err)


@pytest.mark.parametrize("mode", [m for m in ACMode if m != ACMode.none])
def test_every_activation_checkpointing_policy_keeps_documents_apart(mode):
    """The blocks recomputed in backward get the document ids again: the packed gradients stay the unpacked ones."""
    _, reference = loss_and_grads(parallel=ParallelConfig(ac=ACConfig(mode=ACMode.none)), world_size=1, packed=False)
    _, grads = loss_and_grads(parallel=ParallelConfig(ac=ACConfig(mode=mode, every_k=2)), world_size=1, packed=True)
    for name, ref in reference.items():
        assert ((grads[name] - ref).norm() / ref.norm()).item() <= RTOL, (mode, name)


# bf16 against the fp32 reference: tests/trainer/parallel/test_bf16.py's bounds (a few roundings of 2^-9 from
# the loss back to the first layer; a document seeing another is off by O(1)).
BF16_GRAD_RTOL, BF16_LOSS_RTOL = 3e-2, 3e-3


@pytest.mark.parametrize("layout", FAST)
def test_packed_documents_in_bf16_track_fp32_one_by_one(layout, tmp_path):
    ref_loss, reference = loss_and_grads(parallel=ParallelConfig(), world_size=1, packed=False)
    run_workers(_worker, world_size=WORLD.get(layout, 2), args=(layout, str(tmp_path / "out.pt"), torch.bfloat16))
    saved = _saved(tmp_path / "out.pt")
    assert saved["loss"] == pytest.approx(ref_loss, rel=BF16_LOSS_RTOL) and saved["loss"] != ref_loss
    for name, ref in reference.items():
        assert ((saved["grads"][name] - ref).norm() / ref.norm()).item() <= BF16_GRAD_RTOL, (layout, name)
