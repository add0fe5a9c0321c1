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

Saved for backward (``keep``, model/ops/keep.py), besides x and W1, W3, W2: the rule of ``kept_activations``
and ``backward_activations``, which the tensor-parallel form (trainer/parallel/tensor_parallel.py) uses too:
    Keep.matmul_outputs: a, b. s and h are recomputed from a and b (two element-wise ops), which is far
                     cheaper than the matmuls that produced a and b.
    Keep.all:        also s and h, two more (N, F) buffers.
    Keep.ffn_input:  nothing more. Backward reruns a = x W1^T and b = x W3^T (two of the layer's seven
                     matmuls, 4 d F FLOPs per token) before the element-wise work: the two (N, F) buffers
                     that dominate the selective layer's memory (F ~ 8d/3) are not kept.
The three weight gradients may be deferred (model/ops/deferred.py: zero-bubble pipeline schedules).
All levels run the same arithmetic in the same order (a rerun matmul of the same operands gives the same
bits), so outputs and gradients are bitwise equal. The
forward is ``model.llama.FeedForward.forward`` op for op, so swapping this in changes no output bits.
Under autocast, x and the weights are cast to autocast's dtype first and the gate runs in that dtype, as
it would between two autocast matmuls (``model.ops.amp``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from typing import Callable

from model.ops.amp import autocast_off, matmul_inputs, no_autocast_backward
from model.ops.deferred import deferral
from model.ops.keep import Keep
from model.ops.linear import input_grad, weight_grad_or_defer


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


def kept_activations(keep: Keep, *, a: torch.Tensor, b: torch.Tensor, s: torch.Tensor,
                     h: torch.Tensor) -> tuple[torch.Tensor, ...]:  # fmt: skip
    """What SwiGLU's forward saves for backward besides its input and weights, per ``keep``."""
    if keep == Keep.ffn_input:
        return ()
    return (a, b) if keep == Keep.matmul_outputs else (a, b, s, h)


def backward_activations(keep: Keep, kept: list[torch.Tensor], *,
                         rerun_up: Callable[[], tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, ...]:  # fmt: skip
    """a, b, s, h for backward from what ``kept_activations`` kept: ``rerun_up()`` recomputes (a, b) from the
    input where they were not kept, and s, h = gate(a, b) are recomputed where they were not."""
    a, b, *rest = rerun_up() if keep == Keep.ffn_input else kept
    s, h = rest if rest else gate(a, b)
    return a, b, s, h


class _SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w1, w3, w2, keep: Keep) -> torch.Tensor:
        a = F.linear(x, w1)  # (..., F)
        b = F.linear(x, w3)
        s, h = gate(a, b)
        y = F.linear(h, w2)  # (..., d)
        ctx.keep = keep
        ctx.defer = deferral(w1, w3, w2)  # zero-bubble pipelines: dW1, dW3, dW2 later (model/ops/deferred.py)
        ctx.save_for_backward(x, w1, w3, w2, *kept_activations(keep, a=a, b=b, s=s, h=h))
        return y

    @staticmethod
    @no_autocast_backward
    def backward(ctx, dy: torch.Tensor):
        x, w1, w3, w2, *kept = ctx.saved_tensors
        a, b, s, h = backward_activations(ctx.keep, kept, rerun_up=lambda: (F.linear(x, w1), F.linear(x, w3)))
        del kept
        need_x, need_w1, need_w3, need_w2 = ctx.needs_input_grad[:4]
        dw2 = weight_grad_or_defer(dy, h, defer=ctx.defer, index=2) if need_w2 else None
        del h
        da, db = gate_backward(input_grad(dy, w2), a=a, b=b, s=s)  # dh = dy W2, (..., F)
        del a, b, s
        dx = input_grad(da, w1) + input_grad(db, w3) if need_x else None
        dw1 = weight_grad_or_defer(da, x, defer=ctx.defer, index=0) if need_w1 else None
        del da
        dw3 = weight_grad_or_defer(db, x, defer=ctx.defer, index=1) if need_w3 else None
        return dx, dw1, dw3, dw2, None


def swiglu(x: torch.Tensor, w1: torch.Tensor, w3: torch.Tensor, w2: torch.Tensor, *, keep: Keep) -> torch.Tensor:
    """w2(silu(w1 x) * w3 x) with a hand-written backward (see the module docstring).

    Args:
        x: (..., d); w1, w3: (F, d); w2: (d, F), the ``nn.Linear`` weights of ``FeedForward``.
        keep: what backward keeps (``kept_activations``); the rest is recomputed.
    """
    x, w1, w3, w2 = matmul_inputs(x, w1, w3, w2)  # autocast's rule for the three matmuls (model.ops.amp)
    with autocast_off(x.device.type):
        return _SwiGLU.apply(x, w1, w3, w2, keep)
