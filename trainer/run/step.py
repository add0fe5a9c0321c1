"""One optimizer step and one evaluation pass, for any parallel layout.

The loss of a step is the mean cross-entropy over every valid label of the step's *global* batch (all
micro-batches on all data-parallel ranks). Each micro-batch backpropagates its loss *sum* divided by the
global count of valid labels (one all-reduce per step), so gradient accumulation and data parallelism
give the gradient of one big batch, and the loss is the same number for every layout.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.parallel import loss_parallel

from data.instructions import IGNORE_INDEX  # labels equal to it: neither loss nor token count (padding, prompts)
from trainer.parallel.dims import ParallelDims
from trainer.parallel.distributed import clip_grad_norm_, dp_sum
from trainer.parallel.pipeline import Pipeline



@dataclass(frozen=True)
class ComputeContext:
    """How this process computes: device and precision, and what the parallel layout means for the loss."""

    device: torch.device
    dtype: torch.dtype
    dims: ParallelDims = field(default_factory=ParallelDims.single)
    """The layout (with its meshes); one process by default."""

    @property
    def dp_mesh(self) -> Optional[DeviceMesh]:
        """Data-parallel ranks (the flattened dp axis); None for one process."""
        return self.dims.dp_mesh

    @property
    def dp(self) -> int:
        """Data-parallel degree (dp_replicate x dp_shard)."""
        return self.dims.dp

    def autocast(self):
        # Under FSDP, FSDP casts the parameters to ``dtype`` itself; autocast would only add casts.
        if self.dtype == torch.float32 or self.dims.fsdp_enabled:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)

    def loss_context(self):
        """Wraps forward *and* backward: under TP the logits are vocabulary-sharded DTensors, and the
        vocabulary-parallel cross-entropy has its own backward."""
        return loss_parallel() if self.dims.tp_enabled else contextlib.nullcontext()


@dataclass
class StepResult:
    loss: float
    grad_norm: float
    """The global gradient norm before clipping."""
    lr: float
    tokens: int
    """Valid labels in the global batch."""
    applied: bool = True
    """False where ``review`` declined the update: the optimizer step was skipped (the weights and the
    optimizer state are those of the step before; the LR schedule still advances)."""


def forward(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The model on a batch's inputs, with its document ids where the batch packs documents apart."""
    if "documents" in batch:
        return model(batch["inputs"], documents=batch["documents"])
    return model(batch["inputs"])


def cross_entropy_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum of cross-entropy over the valid labels, in fp32: logits (B, T, V), or a DTensor sharded over V
    under TP (inside ``loss_parallel``); labels (B, T)."""
    return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")


def token_loss_sum(model: nn.Module, batch: dict[str, torch.Tensor], *, ctx: ComputeContext) -> torch.Tensor:
    """Sum of cross-entropy over the valid labels of one local micro-batch, in fp32."""
    with ctx.autocast():
        logits = forward(model, batch)  # (B, T, V), or a DTensor sharded over V under TP
    return cross_entropy_sum(logits, batch["labels"])


def _plain(x: torch.Tensor) -> torch.Tensor:
    return x.full_tensor() if isinstance(x, DTensor) else x


def global_token_count(micro_batches: list[dict[str, torch.Tensor]], *, ctx: ComputeContext) -> torch.Tensor:
    """Valid labels in the global batch, as a device tensor: nothing is read back to the host here, so the
    GPU can start the forward while the count (and its all-reduce) is still queued."""
    local = torch.stack([(mb["labels"] != IGNORE_INDEX).sum() for mb in micro_batches]).sum()
    return dp_sum(local.to(device=ctx.device, dtype=torch.int64), dp_mesh=ctx.dp_mesh)


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    micro_batches: list[dict[str, torch.Tensor]],
    *,
    ctx: ComputeContext,
    grad_clip: float,
    defer_grad_sync: bool = True,
    step: int,
    review: Optional[Callable[[StepResult], bool]] = None,
    phase: Callable[[str], None] = lambda name: None,
    pipeline: Optional[Pipeline] = None,
) -> StepResult:
    """Forward/backward over the micro-batches, clip by the global norm, check for NaN/inf, then update.

    ``review`` sees the step's loss and gradient norm before the update and may decline it (a loss-spike
    guard): it must decide alike on every rank (its inputs are global values, the same everywhere).
    ``phase(name)`` is told when forward, backward and the optimizer begin (the hang watchdog reports it).

    ``pipeline`` (``parallel.pp`` > 1): each micro-batch runs through the pipeline schedule, which does its
    forward and backward (trainer/parallel/pipeline.py); the loss sum is the same on every stage.

    One host-device synchronisation per step, after backward: loss, gradient norm and token count are read
    together for the NaN check and the result. Before the forward nothing is read back (the token count
    stays a device tensor), so a GPU never waits for the host at the start of a step.
    """
    lr = scheduler.get_last_lr()[0]
    phase("forward")
    num_tokens = global_token_count(micro_batches, ctx=ctx)
    # FSDP averages gradients over the dp ranks; scaling by dp turns that average into the sum that the
    # global mean needs. clamp: a batch without valid labels must not divide by zero before it is reported.
    scale = ctx.dp / num_tokens.clamp(min=1)
    loss_sum = torch.zeros((), device=ctx.device)
    for index, mb in enumerate(micro_batches):
        # (A pipeline schedule sets FSDP's gradient sync for its own micro-batches.)
        if isinstance(model, FSDPModule) and defer_grad_sync and pipeline is None:
            # Reduce-scatter only after the last micro-batch; earlier ones accumulate unsharded gradients.
            model.set_requires_gradient_sync(index == len(micro_batches) - 1)
        if pipeline is not None:
            if index:
                phase("forward")
            with ctx.loss_context(), ctx.autocast():  # loss_parallel: the last stage's logits are vocabulary-sharded
                mb_sum = pipeline.loss_sum(mb, scale=scale)  # forward and backward of every micro-batch
        else:
            with ctx.loss_context():
                if index:
                    phase("forward")
                mb_sum = token_loss_sum(model, mb, ctx=ctx)
                phase("backward")
                (mb_sum * scale).backward()
        loss_sum += _plain(mb_sum.detach())
    phase("optimizer")
    loss = dp_sum(loss_sum, dp_mesh=ctx.dp_mesh) / num_tokens.clamp(min=1)
    # max_norm=inf still returns the norm (for logging and the NaN check) but scales nothing.
    grad_norm = clip_grad_norm_(model.parameters(), max_norm=grad_clip if grad_clip > 0 else math.inf,
                                pp_mesh=ctx.dims.pp_mesh)  # fmt: skip
    loss_value, norm_value, tokens = torch.stack([loss.double(), grad_norm.double(), num_tokens.double()]).tolist()
    if tokens == 0:
        raise ValueError(f"step {step}: the batch has no valid labels (all equal {IGNORE_INDEX})")
    out = StepResult(loss=loss_value, grad_norm=norm_value, lr=lr, tokens=int(tokens))
    out.applied = review(out) if review is not None else True
    if out.applied and not (math.isfinite(loss_value) and math.isfinite(norm_value)):
        # Raised before optimizer.step() on every rank alike (both values are global): the weights, and
        # any checkpoint of them, stay finite.
        raise FloatingPointError(
            f"step {step}: loss={loss_value}, grad_norm={norm_value} is not finite; stopped before the "
            f"optimizer step (lr was {lr:.3e}). Lower optim.lr, raise optim.warmup_steps, or check the data."
        )
    if out.applied:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    scheduler.step()
    return out


@torch.no_grad()
def evaluate(model: nn.Module, batches, *, ctx: ComputeContext, pipeline: Optional[Pipeline] = None) -> float:
    """Mean loss per valid label over ``batches`` (this rank's micro-batches), across all dp ranks."""
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), dtype=torch.float64, device=ctx.device)
    count = torch.zeros((), dtype=torch.int64, device=ctx.device)
    for batch in batches:
        if pipeline is not None:  # forward only, through the stages
            with ctx.loss_context(), ctx.autocast():
                loss_sum += pipeline.loss_sum(batch, scale=None).double()
        else:
            with ctx.loss_context():
                loss_sum += _plain(token_loss_sum(model, batch, ctx=ctx)).double()
        count += (batch["labels"] != IGNORE_INDEX).sum()
    model.train(was_training)
    loss_sum, count = dp_sum(loss_sum, dp_mesh=ctx.dp_mesh), dp_sum(count, dp_mesh=ctx.dp_mesh)
    if count.item() == 0:
        raise ValueError("evaluation saw no valid labels: raise trainer.eval_steps or the validation data")
    return (loss_sum / count).item()
