"""Build the model for a layout: the one construction path of the trainer, the benchmarks, the tests and
the planner (which stops at the meta device: ``build_meta_model``).

Order (Meta Lingua's and torchtitan's): build on the meta device (no memory), with what every module keeps
for backward as the activation-checkpointing policy says -> parallelise from outside (TP -> activation
checkpointing's block wrappers -> compile -> FSDP, trainer/parallel/parallelize.py) -> materialise with
``to_empty`` on the device -> fill buffers and initialise the weights, identically for every layout
(trainer/parallel/initialize.py).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from model.config import ModelArgs
from model.llama import Transformer
from trainer.parallel.activation_checkpointing import policy
from trainer.parallel.config import ParallelConfig
from trainer.parallel.dims import ParallelDims
from trainer.parallel.initialize import init_parameters
from trainer.parallel.parallelize import parallelize_llama
from trainer.parallel.pipeline import local_stages, split_stage


def build_meta_model(
    args: ModelArgs,
    *,
    dims: ParallelDims,
    parallel: Optional[ParallelConfig] = None,
    compute_dtype: torch.dtype = torch.float32,
) -> Transformer:
    """The model of ``args`` parallelised for ``dims`` (with its meshes, where it needs them) and ``parallel``
    (default ``ParallelConfig()``), still on the meta device: every parameter is its final (sharded) local
    tensor, with no memory behind it. ``build_model`` materialises it; the planner reads its shards."""
    return _build_meta(args, dims=dims, parallel=parallel, compute_dtype=compute_dtype)[0]


def _build_meta(args: ModelArgs, *, dims: ParallelDims, parallel: Optional[ParallelConfig],
                compute_dtype: torch.dtype) -> tuple[Transformer, list[nn.Module]]:  # fmt: skip
    if dims.needs_meshes and dims.meshes is None:
        raise ValueError("build_model needs the layout's meshes: pass dims.with_meshes(device_type=...)")
    parallel = parallel if parallel is not None else ParallelConfig()
    ac = policy(parallel.ac)  # the one decision of what is kept: the modules are built with it
    with torch.device("meta"):
        model = Transformer(args, keep=ac.keep, keep_final_norm=ac.keep_final_norm)
    if dims.pp_enabled:  # this rank's pipeline stage, cut before anything is parallelised or allocated
        virtual = parallel.pp_stages_per_rank
        split_stage(model, stages=local_stages(rank=dims.pp_rank(), pp=dims.pp, virtual=virtual, schedule=parallel.pp_schedule),
                    total=dims.pp * virtual)  # fmt: skip
    stages = parallelize_llama(model, dims=dims, cfg=parallel, ac=ac, compute_dtype=compute_dtype)
    return model, stages


def build_model(
    args: ModelArgs,
    *,
    device: torch.device,
    seed: int,
    dims: Optional[ParallelDims] = None,
    parallel: Optional[ParallelConfig] = None,
    compute_dtype: torch.dtype = torch.float32,
) -> Transformer:
    """The model of ``args`` under ``dims`` (default one process; its meshes built where it needs them) and
    ``parallel``'s settings (default: ``ParallelConfig()``, i.e. selective activation checkpointing).

    Args:
        compute_dtype: FSDP's parameter dtype (bf16 runs); without FSDP, autocast applies it instead.
    """
    model, stages = build_stages(args, device=device, seed=seed, dims=dims, parallel=parallel, compute_dtype=compute_dtype)
    if stages != [model]:  # several stages per rank: the views (FSDP's roots there) are what runs the model
        raise ValueError("this layout holds several pipeline stages per rank: build it with build_stages and run "
                         "it through trainer.parallel.pipeline.Pipeline")  # fmt: skip
    return model


def build_stages(args: ModelArgs, *, device: torch.device, seed: int, dims: Optional[ParallelDims] = None,
                 parallel: Optional[ParallelConfig] = None,
                 compute_dtype: torch.dtype = torch.float32) -> tuple[Transformer, list[nn.Module]]:  # fmt: skip
    """``build_model``'s model and this rank's pipeline stage modules, for ``Pipeline``: ``[model]``, or
    views over it where the rank holds several stages (under FSDP each its own root, so they must be these
    objects and not views made afterwards)."""
    dims = dims if dims is not None else ParallelDims.single()
    model, stages = _build_meta(args, dims=dims, parallel=parallel, compute_dtype=compute_dtype)
    model.to_empty(device=device)
    model.init_buffers(device=device)
    init_parameters(model, seed=seed)
    return model, stages
