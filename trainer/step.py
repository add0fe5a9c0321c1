"""One optimizer step and one evaluation pass.

The loss of a step is the mean cross-entropy over every valid label of the step's whole batch (all
micro-batches): each micro-batch contributes its *sum* divided by the step's total count of valid
labels, so gradient accumulation gives the same gradient as one big batch.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

IGNORE_INDEX = -100
"""Labels equal to this contribute neither loss nor token count (padding, masked spans)."""


@dataclass
class StepResult:
    loss: float
    grad_norm: float
    lr: float
    tokens: int


def autocast_context(*, device: torch.device, dtype: torch.dtype):
    """bf16 compute with fp32 weights when dtype is bf16; nothing to do in fp32."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def token_loss_sum(model: nn.Module, batch: dict[str, torch.Tensor], *, autocast) -> torch.Tensor:
    """Sum of cross-entropy over the valid labels of one micro-batch, in fp32."""
    with autocast:
        logits = model(batch["inputs"])  # (B, T, V)
    return F.cross_entropy(
        logits.float().flatten(0, 1), batch["labels"].flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
    )


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    micro_batches: list[dict[str, torch.Tensor]],
    *,
    grad_clip: float,
    autocast,
    step: int,
) -> StepResult:
    """Forward/backward over the micro-batches, clip, check for NaN/inf, then update."""
    lr = scheduler.get_last_lr()[0]
    num_tokens = sum(int((mb["labels"] != IGNORE_INDEX).sum()) for mb in micro_batches)
    if num_tokens == 0:
        raise ValueError(f"step {step}: the batch has no valid labels (all equal {IGNORE_INDEX})")
    loss = torch.zeros((), device=micro_batches[0]["inputs"].device)
    for mb in micro_batches:
        mb_loss = token_loss_sum(model, mb, autocast=autocast) / num_tokens
        mb_loss.backward()
        loss += mb_loss.detach()
    # max_norm=inf still returns the norm (for logging and the NaN check) but scales nothing.
    max_norm = grad_clip if grad_clip > 0 else math.inf
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=max_norm, foreach=True)
    loss_value, norm_value = loss.item(), grad_norm.item()
    if not (math.isfinite(loss_value) and math.isfinite(norm_value)):
        # Raised before optimizer.step(): the weights (and any checkpoint of them) stay finite.
        raise FloatingPointError(
            f"step {step}: loss={loss_value}, grad_norm={norm_value} is not finite; stopped before the "
            f"optimizer step (lr was {lr:.3e}). Lower optim.lr, raise optim.warmup_steps, or check the data."
        )
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    scheduler.step()
    return StepResult(loss=loss_value, grad_norm=norm_value, lr=lr, tokens=num_tokens)


@torch.no_grad()
def evaluate(model: nn.Module, batches, *, autocast) -> float:
    """Mean loss per valid label over ``batches`` (an iterable of micro-batches)."""
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), dtype=torch.float64)
    count = 0
    for batch in batches:
        loss_sum += token_loss_sum(model, batch, autocast=autocast).double().cpu()
        count += int((batch["labels"] != IGNORE_INDEX).sum())
    model.train(was_training)
    if count == 0:
        raise ValueError("evaluation saw no valid labels: raise trainer.eval_steps or the validation data")
    return (loss_sum / count).item()
