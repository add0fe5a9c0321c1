"""Apply parallelism to a LLaMA model from outside, in a fixed order:

1. tensor + sequence parallelism (DTensor plans on the ``tp`` axis);
2. activation checkpointing (wraps blocks; must see the TP-transformed modules): none | full | every_k;
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
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointImpl, checkpoint_wrapper
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    PrepareModuleInput,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)

from model.llama import Transformer
from trainer.config import ACMode, ParallelConfig, ReduceDtype
from trainer.parallel_dims import Meshes, ParallelDims


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
        apply_tensor_parallel(model, tp_mesh=meshes.tp)
    apply_activation_checkpointing(model, mode=cfg.activation_checkpoint, every_k=cfg.ac_every_k)
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
        )
    return model


def apply_tensor_parallel(model: Transformer, *, tp_mesh: DeviceMesh) -> None:
    """Megatron's layout with sequence parallelism.

    Between blocks the residual stream is sharded along the sequence (Shard(1)): the RMSNorms run on
    sequence shards. Entering attention/FFN, the input is all-gathered (Shard(1) -> Replicate) and fed to
    the column-parallel q/k/v and w1/w3, whose outputs are split by head / hidden unit; the row-parallel
    wo and w2 produce partial sums that are reduce-scattered back to sequence shards. The embedding is
    split over the vocabulary (its output reduce-scattered to sequence shards) and the output head over
    the vocabulary too, its logits left sharded (Shard(-1)) for the vocabulary-parallel cross-entropy
    (``loss_parallel``), so the full (B, T, V) logits are never gathered.
    """
    parallelize_module(
        model,
        tp_mesh,
        {
            "tok_embeddings": RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(1)),
            "norm": SequenceParallel(),
            "output": ColwiseParallel(input_layouts=Shard(1), output_layouts=Shard(-1), use_local_output=False),
        },
    )
    for block in model.layers.values():
        plan = {
            "attention_norm": SequenceParallel(),
            # The second input is the RoPE table, the same on every rank: None leaves it a plain tensor.
            "attention": PrepareModuleInput(
                input_layouts=(Shard(1), None), desired_input_layouts=(Replicate(), None)
            ),
            "attention.wq": ColwiseParallel(),
            "attention.wk": ColwiseParallel(),
            "attention.wv": ColwiseParallel(),
            "attention.wo": RowwiseParallel(output_layouts=Shard(1)),
            "ffn_norm": SequenceParallel(),
            "feed_forward": PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),)),
            "feed_forward.w1": ColwiseParallel(),
            "feed_forward.w2": RowwiseParallel(output_layouts=Shard(1)),
            "feed_forward.w3": ColwiseParallel(),
        }
        parallelize_module(block, tp_mesh, plan)


def apply_activation_checkpointing(model: Transformer, *, mode: ACMode, every_k: int) -> None:
    """Wrap the chosen blocks so that backward recomputes their forward instead of keeping its activations.

    Non-reentrant checkpointing (``torch.utils.checkpoint`` with use_reentrant=False) composes with FSDP2
    and DTensor TP. Recomputation repeats the same operations on the same inputs, so the losses are bitwise
    those of ``none`` (tested); only memory and time change. The wrapper keeps parameter names unchanged in
    state dicts, so checkpoints move freely between modes.
    """
    if mode == ACMode.none:
        return
    k = 1 if mode == ACMode.full else every_k
    for name, block in list(model.layers.items()):
        if int(name) % k == 0:
            # No RNG is used in the blocks (no dropout), so there is no RNG state to stash and restore.
            model.layers[name] = checkpoint_wrapper(block, checkpoint_impl=CheckpointImpl.NO_REENTRANT,
                                                    preserve_rng_state=False)  # fmt: skip


def apply_fsdp(
    model: nn.Module,
    *,
    dp_mesh: DeviceMesh,
    param_dtype: torch.dtype,
    reduce_dtype: torch.dtype,
    reshard_after_forward: bool,
) -> None:
    """One FSDP unit per transformer block, then the root (embedding, final norm, output head)."""
    mp_policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    blocks = list(model.layers.values())
    for index, block in enumerate(blocks):
        # The last block's parameters are needed again at once by backward: freeing them after its
        # forward would only make FSDP gather them straight back.
        last = index == len(blocks) - 1
        fully_shard(block, mesh=dp_mesh, mp_policy=mp_policy, reshard_after_forward=reshard_after_forward and not last)
    fully_shard(model, mesh=dp_mesh, mp_policy=mp_policy, reshard_after_forward=False)
