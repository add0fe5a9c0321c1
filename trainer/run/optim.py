"""AdamW and the learning-rate schedule (linear warm-up, cosine decay to a floor)."""

from __future__ import annotations

import math
import warnings

import torch
from torch import nn

from trainer.run.config import OptimConfig


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only.

    Decay applies to every parameter with 2 or more dimensions: the linear weights and the token
    embedding. The 1-D RMSNorm gains are not decayed: shrinking them towards 0 would scale the
    normalised activations down rather than regularise anything (the usual rule, as in nanoGPT and
    Megatron). Grouping by ``ndim`` also holds for FSDP/TP-sharded DTensor parameters, whose ``ndim``
    is that of the full tensor.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    # foreach=True: one fused multi-tensor kernel launch per group instead of one per parameter.
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, foreach=True)


def lr_factor(step: int, *, warmup_steps: int, decay_steps: int, min_ratio: float) -> float:
    """Multiplier of the peak lr for optimizer step ``step`` (0-based: the first update uses step 0).

    Warm-up: (step + 1) / warmup_steps, reaching 1 at the last warm-up step. Then cosine from 1 down to
    ``min_ratio`` at ``decay_steps``, and ``min_ratio`` after that.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if step >= decay_steps:
        return min_ratio
    progress = (step - warmup_steps) / max(1, decay_steps - warmup_steps)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def build_lr_scheduler(
    optimizer: torch.optim.Optimizer, cfg: OptimConfig, *, max_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    decay_steps = cfg.decay_steps if cfg.decay_steps is not None else max_steps
    if decay_steps < cfg.warmup_steps:
        # Allowed (a short smoke test of a full recipe), but the run never reaches the peak lr.
        warnings.warn(
            f"optim.decay_steps (or trainer.max_steps) = {decay_steps} is shorter than optim.warmup_steps = "
            f"{cfg.warmup_steps}: the run ends during warm-up and the cosine decay never starts",
            stacklevel=2,
        )

    def factor(step: int) -> float:
        return lr_factor(step, warmup_steps=cfg.warmup_steps, decay_steps=decay_steps, min_ratio=cfg.min_lr_ratio)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
