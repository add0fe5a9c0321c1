"""SwiGLU feed-forward with a hand-written backward that recomputes the gate (xformers' recipe).

Shape legend: N = B*T tokens (any leading dims), d model width, F hidden width
(``ModelArgs.ffn_hidden_dim``). W1, W3: (F, d); W2: (d, F), as ``nn.Linear`` weights.

    forward:  a = x W1^T,  b = x W3^T                        (N, F)   the two expensive matmuls
              s = silu(a) = a * sigmoid(a),  h = s * b       (N, F)   cheap, element-wise
              y = h W2^T                                     (N, d)
    input:    dh = dy W2                                     (N, F)
              db = dh * s
              da = dh * b * silu'(a),  silu'(a) = sig(a) * (1 + a * (1 - sig(a)))   (taken in >= fp32)
              dx = da W1 + db W3                             (N, d)
    weight:   dW2 = dy^T h,  dW1 = da^T x,  dW3 = db^T x    summed over the N tokens

Saved for backward:
    recompute=True:  x, a, b and W1, W3, W2. s and h are recomputed from a and b (two element-wise ops),
                     which is far cheaper than the matmuls that produced a and b.
    recompute=False: also s and h, two more (N, F) buffers.
    recompute_up=True: x and the weights only. Backward reruns a = x W1^T and b = x W3^T (two of the
                     layer's seven matmuls, 4 d F FLOPs per token) before the element-wise work: the two
                     (N, F) buffers that dominate the selective layer's memory (F ~ 8d/3) are not kept.
All modes run the same arithmetic in the same order (a rerun matmul of the same operands gives the same
bits), so outputs and gradients are bitwise equal. The
forward is ``model.llama.FeedForward.forward`` op for op, so swapping this in changes no output bits.
Under autocast, x and the weights are cast to autocast's dtype first and the gate runs in that dtype, as
it would between two autocast matmuls (``model.ops.amp``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from model.ops.amp import autocast_off, matmul_inputs, no_autocast_backward
from model.ops.linear import input_grad, weight_grad


def _silu_grad_times(a: torch.Tensor, dgate: torch.Tensor) -> torch.Tensor:
    """dgate * silu'(a) in at least fp32 (the sigmoid of a bf16 a loses bits), cast back to a.dtype."""
    af = a.to(torch.promote_types(a.dtype, torch.float32))
    sig = torch.sigmoid(af)
    out = dgate.to(af.dtype) * (sig * (1 + af * (1 - sig)))
    return out.to(a.dtype)


def gate(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The element-wise middle of SwiGLU: s = silu(a), h = s * b, both (..., F)."""
    s = F.silu(a)
    return s, s * b


def gate_backward(dh: torch.Tensor, *, a: torch.Tensor, b: torch.Tensor, s: torch.Tensor):
    """Gradients of h = silu(a) * b: db = dh * s, da = dh * b * silu'(a); all (..., F)."""
    db = dh * s
    da = _silu_grad_times(a, dh * b)
    return da, db


class _SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w1, w3, w2, recompute: bool, recompute_up: bool) -> torch.Tensor:
        a = F.linear(x, w1)  # (..., F)
        b = F.linear(x, w3)
        s, h = gate(a, b)
        y = F.linear(h, w2)  # (..., d)
        ctx.recompute, ctx.recompute_up = recompute, recompute_up
        if recompute_up:
            ctx.save_for_backward(x, w1, w3, w2)
        elif recompute:
            ctx.save_for_backward(x, a, b, w1, w3, w2)
        else:
            ctx.save_for_backward(x, a, b, w1, w3, w2, s, h)
        return y

    @staticmethod
    @no_autocast_backward
    def backward(ctx, dy: torch.Tensor):
        if ctx.recompute_up:
            x, w1, w3, w2 = ctx.saved_tensors
            a, b = F.linear(x, w1), F.linear(x, w3)
            s, h = gate(a, b)
        elif ctx.recompute:
            x, a, b, w1, w3, w2 = ctx.saved_tensors
            s, h = gate(a, b)
        else:
            x, a, b, w1, w3, w2, s, h = ctx.saved_tensors
        need_x, need_w1, need_w3, need_w2 = ctx.needs_input_grad[:4]
        dw2 = weight_grad(dy, h) if need_w2 else None
        del h
        da, db = gate_backward(input_grad(dy, w2), a=a, b=b, s=s)  # dh = dy W2, (..., F)
        del a, b, s
        dx = input_grad(da, w1) + input_grad(db, w3) if need_x else None
        dw1 = weight_grad(da, x) if need_w1 else None
        del da
        dw3 = weight_grad(db, x) if need_w3 else None
        return dx, dw1, dw3, dw2, None, None


def swiglu(
    x: torch.Tensor, w1: torch.Tensor, w3: torch.Tensor, w2: torch.Tensor, *, recompute: bool = True,
    recompute_up: bool = False,
) -> torch.Tensor:
    """w2(silu(w1 x) * w3 x) with a hand-written backward (see the module docstring).

    Args:
        x: (..., d); w1, w3: (F, d); w2: (d, F), the ``nn.Linear`` weights of ``FeedForward``.
        recompute: True saves x, a = x W1^T, b = x W3^T and recomputes silu(a) * b in backward;
            False also saves silu(a) and silu(a) * b.
        recompute_up: save only x and rerun the two up projections in backward (overrides ``recompute``).
    """
    x, w1, w3, w2 = matmul_inputs(x, w1, w3, w2)  # autocast's rule for the three matmuls (model.ops.amp)
    with autocast_off(x.device.type):
        return _SwiGLU.apply(x, w1, w3, w2, recompute, recompute_up)
