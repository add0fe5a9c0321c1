"""RMSNorm with a hand-written backward that recomputes the normalised input.

Shape legend: N = B*T tokens (any leading dims), d model width. c is the compute dtype,
promote_types(x.dtype, float32): a bf16 mean-square loses bits, so the statistics are taken in at
least fp32 and the result cast back, exactly as ``model.llama.RMSNorm`` does.

    forward:  rrms  = 1 / sqrt(mean_d(x^2) + eps)            (N, 1) in c
              x_hat = x * rrms                              (N, d) in c
              y     = cast(x_hat, x.dtype) * g               (N, d)
    input:    gy    = cast(dy * g, c)
              dx    = rrms * (gy - x_hat * mean_d(gy * x_hat))
    weight:   dg    = sum_N(dy * cast(x_hat, x.dtype))       (d,)

Saved for backward (``keep``, model/ops/keep.py):
    Keep.matmul_outputs, Keep.ffn_input:  x, rrms, g. x is the residual stream, which the block keeps alive anyway for the
                     residual add, so saving it allocates nothing new; rrms is one number per token.
                     x_hat = x * rrms is recomputed (one multiply).
    Keep.all:        x_hat, rrms, g. Backward does not need x once x_hat is stored, so x is not saved;
                     x_hat is a fresh (N, d) buffer in c. In fp32 both modes save the same number of
                     bytes, but only this one allocates them.
Both run the same arithmetic in the same order, so outputs and gradients are bitwise equal.
"""

from __future__ import annotations

import torch

from model.ops.amp import autocast_off, no_autocast_backward
from model.ops.keep import Keep


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float, recompute: bool) -> torch.Tensor:
        xf = x.to(torch.promote_types(x.dtype, torch.float32))
        rrms = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)  # (..., 1)
        x_hat = xf * rrms  # (..., d)
        del xf
        y = x_hat.type_as(x) * weight
        ctx.x_dtype = x.dtype
        ctx.recompute = recompute
        ctx.save_for_backward(x if recompute else x_hat, rrms, weight)
        return y

    @staticmethod
    @no_autocast_backward
    def backward(ctx, dy: torch.Tensor):
        saved, rrms, weight = ctx.saved_tensors
        x_hat = saved.to(rrms.dtype) * rrms if ctx.recompute else saved
        del saved
        dx = dweight = None
        if ctx.needs_input_grad[1]:
            d = dy.shape[-1]
            dweight = (dy * x_hat.to(ctx.x_dtype)).reshape(-1, d).sum(0).to(weight.dtype)
        if ctx.needs_input_grad[0]:
            gy = (dy * weight).to(rrms.dtype)
            dx = rrms * (gy - x_hat * (gy * x_hat).mean(-1, keepdim=True))
            del gy
            dx = dx.to(ctx.x_dtype)
        return dx, dweight, None, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, *, eps: float, keep: Keep) -> torch.Tensor:
    """x / sqrt(mean(x^2) + eps) * g over the last dim, with a hand-written backward (module docstring).

    Args:
        x: (..., d); weight: g, (d,).
        eps: added to the mean square (``ModelArgs.norm_eps``).
        keep: ``Keep.all`` saves x_hat; the other levels save x and recompute x_hat in backward.
    """
    # Its dtypes are explicit (statistics in >= fp32, output in x's dtype times g's): autocast stays out.
    with autocast_off(x.device.type):
        return _RMSNorm.apply(x, weight, eps, keep.recomputes_elementwise)
