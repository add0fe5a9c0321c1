"""Rehearse a layout with the real code: build the configured model in a fake world of any size, on the
meta device, and read what one rank holds from the shards that the trainer's own parallelisation made.

``compat.fake_process_group`` joins a world of ``world_size`` ranks whose collectives do nothing; the
trainer's ``ParallelDims.for_run`` (the same errors as training), the device meshes and
``build_meta_model`` (tensor parallelism -> activation checkpointing -> FSDP2, trainer/parallel/parallelize.py)
then run unchanged. No memory is allocated: meta tensors have shapes and storage sizes, not data. So a
sharding bug in the trainer changes the planner's answer, instead of a formula agreeing with itself.

What is read from each parameter's local tensor (``DTensor.to_local()``):
- its elements (``numel``): what the optimizer state is made like (AdamW's moments are ``zeros_like``
  the local shard, unpadded);
- its storage size: FSDP2 pads every rank's shard to the same length (ceil(dim0 / dp_shard) rows), so
  the storage is what the parameter and its gradient occupy, and the padded shard times ``dp_shard`` is
  what its all-gather produces.

Pipelining (``parallel.pp`` > 1): each rank builds only its stage, with the trainer's own split (stage 0 the
embedding, the last stage the final norm and the head, the blocks as ``stage_layers`` cuts them), so a
rehearsal is of one stage; ``rehearse_stages`` rehearses the stages that bound a layout (the first and the
last: no middle stage has more blocks than the first, nor the embedding, the head or as many micro-batches
in flight), and the planner takes the worst of them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from compat import fake_process_group, local_shard_shape
from model.config import ModelArgs
from trainer.parallel.build import build_meta_model
from trainer.parallel.config import ParallelConfig
from trainer.parallel.dims import ParallelDims


@dataclass(frozen=True)
class UnitShards:
    """One FSDP unit (a transformer block, or the root: embedding, final norm, output head) on one rank."""

    local_numel: int
    """Elements of this rank's shards, unpadded."""
    padded_numel: int
    """Elements of this rank's shard storage (FSDP pads every rank's shard to the same size)."""
    gathered_numel: int
    """Elements of the unit's parameters after FSDP's all-gather on this rank (its tensor-parallel share,
    padded): the size of the all-gather buffer."""


@dataclass(frozen=True)
class Rehearsal:
    """What one rank of a layout holds, read from the model the trainer's code built for it."""

    dims: ParallelDims
    """The layout (without meshes: the fake world is gone)."""
    rank: int
    param_count: int
    """Parameters of the model this rank built (global shapes): the whole model, or its pipeline stage."""
    blocks: tuple[UnitShards, ...]
    root: UnitShards
    param_dtype: torch.dtype
    """Dtype of the sharded (master) parameters."""
    layers: tuple[int, ...]
    """The model's indices of this rank's blocks (all of them without pipelining)."""
    embedding: bool
    """Whether this rank holds the token embedding (pipeline stage 0)."""
    head: bool
    """Whether this rank holds the final norm and the output head, and so computes the loss (the last stage)."""
    stage: int = 0
    """This rank's pipeline stage (0 without pipelining); the stages are ``dims.pp``."""

    @property
    def local_numel(self) -> int:
        return self.root.local_numel + sum(b.local_numel for b in self.blocks)

    @property
    def padded_numel(self) -> int:
        return self.root.padded_numel + sum(b.padded_numel for b in self.blocks)


def _local(p: torch.Tensor) -> torch.Tensor:
    return p.to_local() if isinstance(p, DTensor) else p


def _unit(params: list[nn.Parameter], *, dims: ParallelDims) -> UnitShards:
    local = [_local(p) for p in params]
    padded = [t.untyped_storage().nbytes() // t.element_size() for t in local]
    # FSDP gathers over dp_shard (HSDP replicas hold the same shard); without FSDP nothing is gathered and
    # the local tensor is what the forward uses.
    gather = dims.dp_shard if dims.fsdp_enabled else 1
    return UnitShards(local_numel=sum(t.numel() for t in local), padded_numel=sum(padded),
                      gathered_numel=sum(n * gather for n in padded))  # fmt: skip


def read_rehearsal(model: nn.Module, *, dims: ParallelDims, rank: int) -> Rehearsal:
    """The per-rank sizes of a built (meta or real) model: one unit per block, the rest as the root."""
    block_ids = set()
    blocks = []
    for block in model.layers.values():
        params = list(block.parameters())
        block_ids.update(id(p) for p in params)
        blocks.append(_unit(params, dims=dims))
    root = [p for p in model.parameters() if id(p) not in block_ids]
    every = list(model.parameters())
    return Rehearsal(
        dims=dataclasses.replace(dims, meshes=None),
        rank=rank,
        param_count=sum(p.numel() for p in every),
        blocks=tuple(blocks),
        root=_unit(root, dims=dims),
        param_dtype=_local(every[0]).dtype,
        layers=tuple(int(name) for name in model.layers.keys()),
        embedding=model.tok_embeddings is not None,
        head=model.output is not None,
        stage=dims.pp_rank(),
    )


@contextlib.contextmanager
def fake_world_model(args: ModelArgs, *, parallel: ParallelConfig, world_size: int, seq_len: int, rank: int = 0,
                     compute_dtype: torch.dtype = torch.bfloat16) -> Iterator[tuple[nn.Module, ParallelDims]]:  # fmt: skip
    """The meta model rank ``rank`` builds for ``parallel`` in a fake world of ``world_size``, with its dims;
    the fake process group lives while the context does. The layout is checked (training's errors) first."""
    dims = ParallelDims.for_run(parallel, world_size=world_size, model=args, seq_len=seq_len)
    with fake_process_group(world_size=world_size, rank=rank):
        dims = dims.with_meshes(device_type="cpu")
        yield build_meta_model(args, dims=dims, parallel=parallel, compute_dtype=compute_dtype), dims


def rehearse(args: ModelArgs, *, parallel: ParallelConfig, world_size: int, seq_len: int, rank: int = 0,
             compute_dtype: torch.dtype = torch.bfloat16) -> Rehearsal:  # fmt: skip
    """Build ``args`` under ``parallel`` as rank ``rank`` of a fake world of ``world_size`` and read its shards.

    Raises the trainer's own errors for a layout that does not divide the world, the heads, the
    vocabulary or the sequence.
    """
    with fake_world_model(args, parallel=parallel, world_size=world_size, seq_len=seq_len, rank=rank,
                          compute_dtype=compute_dtype) as (model, dims):  # fmt: skip
        return read_rehearsal(model, dims=dims, rank=rank)


def stage_ranks(*, world_size: int, stages: int) -> list[int]:
    """The first rank of the first and of the last pipeline stage: ``pp`` is the outermost mesh axis, so
    stage s is ranks s * world / pp onwards (one rank, 0, without pipelining)."""
    return sorted({0, (stages - 1) * (world_size // stages)})


def rehearse_stages(args: ModelArgs, *, parallel: ParallelConfig, world_size: int, seq_len: int,
                    compute_dtype: torch.dtype = torch.bfloat16) -> tuple[Rehearsal, ...]:  # fmt: skip
    """``rehearse`` for every stage that bounds the layout's memory and step time: the first (embedding, the
    most blocks, the most micro-batches in flight) and the last (head, logits, loss); one rehearsal
    without pipelining."""
    stages = ParallelDims.from_config(parallel, world_size=world_size).pp
    return tuple(rehearse(args, parallel=parallel, world_size=world_size, seq_len=seq_len, rank=rank,
                          compute_dtype=compute_dtype)
                 for rank in stage_ranks(world_size=world_size, stages=stages))  # fmt: skip


def every_rank_local_numel(args: ModelArgs, *, parallel: ParallelConfig, world_size: int,
                           seq_len: int) -> Iterator[tuple[str, list[int]]]:  # fmt: skip
    """For each parameter, the unpadded local element count of every rank of the world, from rank 0's
    DTensor placements (``compat.local_shard_shape``: DTensor's own computation). Lets a test check that
    the shards of all ranks partition each parameter without building the model once per rank."""
    with fake_world_model(args, parallel=parallel, world_size=world_size, seq_len=seq_len) as (model, _):
        shapes: dict = {}  # the blocks repeat: one computation per (shape, mesh, placements)
        for name, p in model.named_parameters():
            if not isinstance(p, DTensor):
                yield name, [p.numel()] * world_size
                continue
            key = (tuple(p.shape), tuple(p.device_mesh.mesh.flatten().tolist()), tuple(p.device_mesh.shape),
                   tuple(p.placements))  # fmt: skip
            if key not in shapes:
                shapes[key] = _counts_per_rank(p, world_size=world_size)
            yield name, shapes[key]


def _counts_per_rank(p: DTensor, *, world_size: int) -> list[int]:
    mesh_shape = tuple(p.device_mesh.shape)
    counts = [0] * world_size
    for index, world_rank in enumerate(p.device_mesh.mesh.flatten().tolist()):
        shape = local_shard_shape(tuple(p.shape), mesh_shape=mesh_shape, coordinate=list(_unravel(index, mesh_shape)),
                                  placements=tuple(p.placements))  # fmt: skip
        counts[world_rank] = math.prod(shape)
    return counts


def _unravel(index: int, shape: tuple[int, ...]) -> tuple[int, ...]:
    coords = []
    for size in reversed(shape):
        index, c = divmod(index, size)
        coords.append(c)
    return tuple(reversed(coords))
