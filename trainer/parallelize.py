"""Apply parallelism to a LLaMA model from outside, in a fixed order:

1. tensor + sequence parallelism on the ``tp`` axis (``trainer.tensor_parallel``);
2. activation checkpointing (wraps blocks; must see the TP-transformed modules): none | selective | full |
   every_k;
3. ``torch.compile`` per block (compiles what 1-2 produced);
4. FSDP2 ``fully_shard`` per block, then the root (shards the DTensor parameters of 1 over the ``dp`` axes).

FSDP comes last because it shards whatever parameters the earlier steps left, and because each block
must already be its final module when it becomes an FSDP unit. The model is still on the meta device
here; the caller materialises it afterwards (``to_empty`` + ``init_weights``).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from model.llama import Transformer
from compat import checkpoint_wrapper, set_unshard_async_op
from trainer.config import ACMode, ParallelConfig, ReduceDtype
from trainer.parallel_dims import Meshes, ParallelDims
from trainer.tensor_parallel import apply_tensor_parallel


def parallelize_llama(
    model: Transformer,
    *,
    meshes: Optional[Meshes],
    dims: ParallelDims,
    cfg: ParallelConfig,
    compute_dtype: torch.dtype,
) -> Transformer:
    """Apply the configured parallelism and activation checkpointing; ``meshes`` is None for one process."""
    if meshes is not None and dims.tp_enabled:
        apply_tensor_parallel(model, tp_mesh=meshes.tp, overlap=cfg.overlap_comm)
    apply_activation_checkpointing(model, mode=cfg.activation_checkpoint, every_k=cfg.ac_every_k)
    if cfg.compile:
        apply_compile(model)
    if meshes is not None and dims.fsdp_enabled:
        reduce_dtype = torch.float32 if cfg.reduce_dtype == ReduceDtype.fp32 else torch.bfloat16
        # Replicate x shard = HSDP when dp_replicate > 1; with dp_replicate == 1 the first axis has size 1
        # and this is plain FSDP.
        apply_fsdp(
            model,
            dp_mesh=meshes.fsdp,
            param_dtype=compute_dtype,
            reduce_dtype=reduce_dtype,
            reshard_after_forward=cfg.reshard_after_forward,
            prefetch=cfg.fsdp_prefetch,
        )
    return model


def apply_activation_checkpointing(model: Transformer, *, mode: ACMode, every_k: int) -> None:
    """Choose what each block keeps for backward; the arithmetic is the same in every mode.

    Every mode runs the model's hand-written backward (``model.ops``). ``none`` makes those Functions keep
    their element-wise intermediates too (``recompute=False``); ``selective`` has them recompute that cheap
    work (``recompute=True``). ``full`` and ``every_k`` wrap whole blocks so that backward reruns their
    forward and only the block input is kept; the blocks ``every_k`` does not wrap run as ``none``.

    Non-reentrant checkpointing (``torch.utils.checkpoint`` with use_reentrant=False) composes with FSDP2
    and the TP layers. Recomputation repeats the same operations on the same inputs, so on CPU the losses are
    bitwise those of ``none`` (tested, fp32 and bf16); only memory and time change. On CUDA they agree to
    rounding, not bitwise: the flash backward's atomic adds reorder sums from run to run. The wrapper keeps parameter names unchanged in
    state dicts, so checkpoints move freely between modes.
    """
    _set_recompute(model, recompute=mode != ACMode.none)
    if mode in (ACMode.none, ACMode.selective):
        return
    k = 1 if mode == ACMode.full else every_k
    for name, block in list(model.layers.items()):
        # Blocks left unwrapped by every_k run as none. In a wrapped block the flag matters only in the
        # recomputed forward, whose saved tensors live for that block's backward alone: keeping the
        # element-wise intermediates there costs one block's worth of them, briefly, and saves computing
        # them a third time (a small saving: element-wise work is ~1% of the step on the bench model).
        _set_recompute(block, recompute=False)
        if int(name) % k == 0:
            # No RNG is used in the blocks (no dropout), so there is no RNG state to stash and restore.
            model.layers[name] = checkpoint_wrapper(block, preserve_rng_state=False)


def apply_compile(model: Transformer) -> None:
    """``torch.compile`` each block in place (``nn.Module.compile``), after TP and AC and before FSDP.

    Per block rather than the whole model: the blocks are identical, so one compiled graph serves them all,
    and FSDP's hooks stay outside the compiled code. In place, so parameter names (and checkpoints) are
    unchanged. The hand-written autograd Functions are traced with their backward; a TP block breaks the
    graph at its collectives, which then run eagerly.
    """
    for block in model.layers.values():
        block.compile()


def _set_recompute(module: nn.Module, *, recompute: bool) -> None:
    """Set the ``recompute`` flag of every model module under ``module`` that has one."""
    for sub in module.modules():
        if hasattr(sub, "recompute"):
            sub.recompute = recompute


def apply_fsdp(
    model: nn.Module,
    *,
    dp_mesh: DeviceMesh,
    param_dtype: torch.dtype,
    reduce_dtype: torch.dtype,
    reshard_after_forward: bool,
    prefetch: bool = True,
) -> None:
    """One FSDP unit per transformer block, then the root (embedding, final norm, output head).

    With ``prefetch``, block i asks for block i+1's all-gather as it starts its forward and for block
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
    # the blocks cast nothing; the root's only input is integer tokens.
    block_policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype, cast_forward_inputs=False)
    root_policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    blocks = list(model.layers.values())
    for index, block in enumerate(blocks):
        # The last block's parameters are needed again at once by backward: freeing them after its
        # forward would only make FSDP gather them straight back.
        last = index == len(blocks) - 1
        fully_shard(block, mesh=dp_mesh, mp_policy=block_policy,
                    reshard_after_forward=reshard_after_forward and not last)  # fmt: skip
    fully_shard(model, mesh=dp_mesh, mp_policy=root_policy, reshard_after_forward=False)
    if prefetch:
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
