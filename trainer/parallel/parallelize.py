"""Apply parallelism to a LLaMA model from outside, in a fixed order:

1. tensor + sequence parallelism on the ``tp`` axis (``trainer.parallel.tensor_parallel``);
2. activation checkpointing's block wrappers (trainer/parallel/activation_checkpointing.py; they wrap blocks,
   so they must see the TP-transformed modules; what each module keeps the policy already gave the model
   when it was built);
3. ``torch.compile`` per block (compiles what 1-2 produced);
4. FSDP2 ``fully_shard`` per block, then the root (shards the DTensor parameters of 1 over the ``dp`` axes);
   where a rank holds several pipeline stages, each stage's view is a root (``pipeline.stage_modules``).

FSDP comes last because it shards whatever parameters the earlier steps left, and because each block
must already be its final module when it becomes an FSDP unit. The model is still on the meta device
here; the caller materialises it afterwards (``to_empty`` + ``init_weights``).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from compat import set_unshard_async_op
from model.llama import RMSNorm, Transformer
from trainer.parallel.activation_checkpointing import ACPolicy
from trainer.parallel.config import FSDPConfig, ParallelConfig, ReduceDtype
from trainer.parallel.dims import ParallelDims
from trainer.parallel.pipeline import stage_modules
from trainer.parallel.tensor_parallel import apply_tensor_parallel


def parallelize_llama(model: Transformer, *, dims: ParallelDims, cfg: ParallelConfig, ac: ACPolicy,
                      compute_dtype: torch.dtype) -> list[nn.Module]:  # fmt: skip
    """Apply the configured parallelism and ``ac``'s block wrappers (``dims`` with its meshes built); each
    step receives only its own part of ``cfg``. Returns this rank's pipeline stage modules
    (``pipeline.stage_modules``: ``[model]``, or views over it where the rank holds several stages)."""
    if dims.tp_enabled:
        apply_tensor_parallel(model, tp_mesh=dims.tp_mesh, overlap=cfg.tp_overlap)
    ac.wrap(model)
    if cfg.compile:
        # Zero-bubble schedules defer weight gradients from Python in backward, which a compiled graph cannot.
        apply_compile(model, defers_weight_grads=dims.pp_enabled and cfg.pp_schedule.splits_backward)
    stages = stage_modules(model, dims=dims, cfg=cfg)  # views hold the blocks as wrapped above
    if dims.fsdp_enabled:
        # Replicate x shard = HSDP when dp_replicate > 1; with dp_replicate == 1 the first axis has size 1
        # and this is plain FSDP.
        apply_fsdp(stages, dp_mesh=dims.fsdp_mesh, cfg=cfg.fsdp, param_dtype=compute_dtype)
    return stages


def apply_compile(model: Transformer, *, defers_weight_grads: bool = False) -> None:
    """``torch.compile`` each block in place (``nn.Module.compile``), after TP and AC and before FSDP.

    Per block rather than the whole model: the blocks are identical, so one compiled graph serves them all,
    and FSDP's hooks stay outside the compiled code. In place, so parameter names (and checkpoints) are
    unchanged. The hand-written autograd Functions are traced with their backward; a TP block breaks the
    graph at its collectives, which then run eagerly.

    ``defers_weight_grads`` (zero-bubble pipeline schedules): the matmul Functions queue their weight
    gradients from Python in backward (model/ops/deferred.py), which a traced backward cannot hold, so they
    stay eager and what lies between them is compiled: the two norms of each block. (A matmul gains nothing
    from compile; the fusions lost are SwiGLU's gate and RoPE's rotations, which the Functions and the
    attention run eagerly.) torch's own zero-bubble schedules refuse compiled stages outright (#161904).
    """
    for block in model.layers.values():
        if defers_weight_grads:
            for norm in (module for module in block.modules() if isinstance(module, RMSNorm)):
                norm.compile()
        else:
            block.compile()


def apply_fsdp(roots: list[nn.Module], *, dp_mesh: DeviceMesh, cfg: FSDPConfig, param_dtype: torch.dtype) -> None:
    """One FSDP unit per transformer block, then each root (embedding, final norm, output head, where it has
    them): the model, or each of a rank's pipeline stages (a root's forward is where FSDP gathers its own
    parameters and, in backward, reduces them; a stage run without the model's forward needs its own).

    With ``cfg.prefetch``, block i asks for block i+1's all-gather as it starts its forward and for block
    i-1's as it starts its backward, and those all-gathers are issued asynchronously: the gather of the
    next block's parameters runs while the current block computes. FSDP2's implicit prefetching relies
    on the CPU issuing work ahead of a CUDA device (all-gathers on their own stream); on a CPU device
    nothing runs ahead, so only explicit, asynchronous prefetching overlaps there. Gradient
    reduce-scatters are issued by FSDP2 as each block's backward ends; on CUDA they run on their own
    stream, overlapping the backward of the blocks before.
    """
    # The blocks take (h, rope). FSDP's default casts every floating-point forward input to param_dtype,
    # which would round the fp32 RoPE table to bf16 before apply_rope (16 bits of cos/sin lost at every
    # position). h needs no cast: it comes out of the embedding, whose parameters FSDP already casts. So
    # the blocks cast nothing. A root's input is integer tokens, or, for a later pipeline stage, hidden
    # states already in param_dtype (the cast changes nothing).
    reduce_dtype = torch.float32 if cfg.reduce_dtype == ReduceDtype.fp32 else torch.bfloat16
    block_policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype, cast_forward_inputs=False)
    root_policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    for root in roots:
        blocks = list(root.layers.values())
        for index, block in enumerate(blocks):
            # The last block's parameters are needed again at once by backward: freeing them after its
            # forward would only make FSDP gather them straight back.
            last = index == len(blocks) - 1
            fully_shard(block, mesh=dp_mesh, mp_policy=block_policy,
                        reshard_after_forward=cfg.reshard_after_forward and not last)  # fmt: skip
        fully_shard(root, mesh=dp_mesh, mp_policy=root_policy, reshard_after_forward=False)
        if cfg.prefetch:  # within a root: another root's blocks run in an order of the schedule's
            _set_explicit_prefetch(blocks, async_op=dp_mesh.device_type == "cpu")


def _set_explicit_prefetch(blocks: list, *, async_op: bool) -> None:
    for index, block in enumerate(blocks):
        block.set_modules_to_forward_prefetch(blocks[index + 1 : index + 2])
        block.set_modules_to_backward_prefetch(blocks[max(index - 1, 0) : index])
        if async_op:
            # On CPU a synchronous prefetch blocks the thread that issued it, so nothing would overlap.
            # There is no public setter for this (compat.py). On CUDA the all-gather stream already
            # overlaps, and this flag would move the copy-in onto the compute stream, so it stays off there.
            set_unshard_async_op(block, True)
