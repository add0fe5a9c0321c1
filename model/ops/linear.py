"""y = x W^T with a hand-written backward, and the two matmul gradients the other ops reuse.

Shape legend: N = B*T tokens (any leading dims are flattened), d_in input width, d_out output width.

    forward:  y  = x W^T              x (..., d_in), W (d_out, d_in) -> y (..., d_out)
    input:    dx = dy W               (..., d_out) @ (d_out, d_in) -> (..., d_in)
    weight:   dW = dy^T x             (d_out, N) @ (N, d_in) -> (d_out, d_in), summed over all N tokens

The weight gradient may be deferred (model/ops/deferred.py: zero-bubble pipeline schedules).

Saved for backward: x (for dW) and W (for dx), at every ``Keep`` level: that is all a linear layer needs,
and nothing in it is element-wise, so there is nothing to recompute.

Under autocast, x and W are cast to autocast's dtype first (``model.ops.amp``), so forward saves the bf16
copies autocast itself would have saved, and backward multiplies tensors of one dtype.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from model.ops.amp import autocast_off, matmul_inputs, no_autocast_backward
from model.ops.deferred import Deferral, deferral


def input_grad(dy: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """dx = dy W: (..., d_out) -> (..., d_in)."""
    return dy @ weight


def weight_grad(dy: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """dW = dy^T x with the leading dims of both flattened into N: (d_out, N) @ (N, d_in)."""
    return dy.reshape(-1, dy.shape[-1]).t() @ x.reshape(-1, x.shape[-1])


def weight_grad_or_defer(dy: torch.Tensor, x: torch.Tensor, *, defer: Optional[Deferral],
                         index: int) -> Optional[torch.Tensor]:  # fmt: skip
    """For a Function's backward: dW = dy^T x now (``defer`` None), or queued for the ``index``-th weight the
    forward gave ``deferral`` and None returned to autograd (model/ops/deferred.py)."""
    if defer is None:
        return weight_grad(dy, x)
    defer.put(index, lambda: weight_grad(dy, x))
    return None


class _Linear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.defer = deferral(weight)  # zero-bubble pipelines: dW later (model/ops/deferred.py)
        # F.linear, as nn.Linear calls it, so swapping this op in changes no bits of the forward.
        return F.linear(x, weight)

    @staticmethod
    @no_autocast_backward
    def backward(ctx, dy: torch.Tensor):
        x, weight = ctx.saved_tensors
        dx = input_grad(dy, weight) if ctx.needs_input_grad[0] else None
        dw = weight_grad_or_defer(dy, x, defer=ctx.defer, index=0) if ctx.needs_input_grad[1] else None
        return dx, dw


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x W^T with a hand-written backward (see the module docstring).

    Args:
        x: (..., d_in); weight: (d_out, d_in), as ``nn.Linear.weight``.
    Returns:
        (..., d_out).
    """
    x, weight = matmul_inputs(x, weight)  # under autocast: bf16 copies, as autocast gives F.linear
    with autocast_off(x.device.type):
        return _Linear.apply(x, weight)
