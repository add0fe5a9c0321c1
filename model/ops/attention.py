"""Causal attention core (softmax(q k^T / sqrt(D)) v) around the fused flash kernels' forward and backward.

Shape legend: B batch, T sequence, H query heads, Hkv key/value heads (H % Hkv == 0), G = H / Hkv
query heads per kv head, D head dim. Inputs and output use the (B, T, H, D) layout of the projections
(as ``model.attention.causal_attention``); the kernels take (B, H, T, D) views of the same memory.

    forward:  P   = softmax(q k^T / sqrt(D) + causal mask)   (B, H, T, T), never stored; query head h
                                                             reads kv head h // G
              o   = P v                                      (B, T, H, D)
              lse = logsumexp(q k^T / sqrt(D) + mask)        (B, H, T), in at least fp32
    input:    dq, dk, dv = flash_backward(do, q, k, v, o, lse): the kernel rebuilds P tile by tile from
              q, k and lse; dk, dv sum over the G query heads that share each kv head.
    weight:   none (the projections around this core are ``linear`` ops).

Grouped-query heads: the CPU kernel takes k, v with Hkv heads itself (checked by the tests), so nothing
is expanded. For the CUDA kernel, which is not checked here, k and v are expanded to H heads first,
k' = repeat_interleave(k, G, dim=heads), and dk = the sum of dk' over each group of G copies.

Saved for backward (``keep``, model/ops/keep.py; no level stores P: the kernel's log-sum-exp is what lets
its backward rebuild it, which is the point of saving it):
    Keep.matmul_outputs, Keep.ffn_input:  q, k, v (Hkv heads), o, lse. Where k and v are expanded, the expansion is redone in
                     backward: a copy, cheap to redo, G times larger than k and v.
    Keep.all:        q, k', v' (the expanded H-head copies, which backward consumes, in place of k and
                     v), o, lse. Without an expansion (CPU, or G = 1) the levels save the same tensors: there
                     is no element-wise work outside the fused kernel to recompute.
All levels run the same kernels on the same values, so on CPU results are bitwise equal. On CUDA the
flash backward accumulates dq with atomic adds, so two runs (and the two modes) can differ in the last
bits: GPU tests compare with tolerances (tests/gpu/).

Kernels (called through ``compat``: private aten ops): on CPU,
``aten._scaled_dot_product_flash_attention_for_cpu`` and its ``_backward``; this is what
``F.scaled_dot_product_attention(..., is_causal=True)`` dispatches to on CPU for fp32/fp64, so output and
gradients equal the model's SDPA path bit for bit. On CUDA, ``aten._scaled_dot_product_flash_attention``
and its backward: fp16/bf16, sm80 or newer, head dim <= 256 and a multiple of 8. Where that kernel cannot
run, ``model.attention.core_supports`` sends the model to SDPA (with autograd's backward) instead. The
CUDA branch has not yet run on a GPU (none where this was written); ``make gpu-check`` tests it.
"""

from __future__ import annotations

import torch

from compat import flash_attention_backward, flash_attention_forward
from model.ops.amp import autocast_off, matmul_inputs, no_autocast_backward
from model.ops.keep import Keep


def _kernel_takes_gqa(q: torch.Tensor) -> bool:
    """Whether the kernel for ``q``'s device accepts k, v with fewer heads than q (no expansion needed)."""
    # CPU: verified by the tests. CUDA: FlashAttention-2 supports it, but torch's wrapper is untested here,
    # so expand there, which is correct either way.
    return not q.is_cuda


def _expand_heads(t: torch.Tensor, groups: int) -> torch.Tensor:
    """(B, T, Hkv, D) -> (B, T, Hkv * groups, D), each kv head repeated for its group of query heads."""
    return t if groups == 1 else t.repeat_interleave(groups, dim=2)


def _reduce_heads(dt: torch.Tensor, groups: int) -> torch.Tensor:
    """Adjoint of ``_expand_heads``: (B, T, Hkv * groups, D) -> (B, T, Hkv, D), summing each group."""
    return dt if groups == 1 else dt.unflatten(2, (-1, groups)).sum(3)


def _bhtd(*ts: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """(B, T, H, D) -> (B, H, T, D) views, the kernels' layout."""
    return tuple(t.transpose(1, 2) for t in ts)


class _AttentionCore(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, recompute: bool) -> torch.Tensor:
        groups = 1 if _kernel_takes_gqa(q) else q.shape[2] // k.shape[2]
        k_rep, v_rep = _expand_heads(k, groups), _expand_heads(v, groups)  # (B, T, H or Hkv, D)
        o, lse, extras = flash_attention_forward(*_bhtd(q, k_rep, v_rep))
        out = o.transpose(1, 2)  # (B, T, H, D)
        del o
        ctx.groups, ctx.recompute = groups, recompute
        # The CUDA kernel's extras are a few scalars and two tiny RNG-state tensors (unused: no dropout).
        ctx.extras = extras
        if recompute:
            ctx.save_for_backward(q, k, v, out, lse)
        else:
            ctx.save_for_backward(q, k_rep, v_rep, out, lse)
        return out

    @staticmethod
    @no_autocast_backward
    def backward(ctx, dout: torch.Tensor):
        q, k_saved, v_saved, out, lse = ctx.saved_tensors
        groups = ctx.groups
        if ctx.recompute:
            k_rep, v_rep = _expand_heads(k_saved, groups), _expand_heads(v_saved, groups)
        else:
            k_rep, v_rep = k_saved, v_saved
        del k_saved, v_saved
        dq, dk_rep, dv_rep = flash_attention_backward(*_bhtd(dout, q, k_rep, v_rep, out), lse, ctx.extras)
        del k_rep, v_rep
        dq, dk_rep, dv_rep = _bhtd(dq, dk_rep, dv_rep)  # back to (B, T, H, D)
        return dq, _reduce_heads(dk_rep, groups), _reduce_heads(dv_rep, groups), None


def attention_core(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, keep: Keep) -> torch.Tensor:
    """Causal softmax(q k^T / sqrt(D)) v with grouped-query heads and a hand-written backward.

    Args:
        q: (B, T, H, D); k, v: (B, T, Hkv, D) with H % Hkv == 0.
        keep: where k and v must be expanded to H heads for the kernel (CUDA), ``Keep.all`` saves the
            expanded copies, the other levels save k and v and redo the expansion in backward. No effect on CPU.
    Returns:
        (B, T, H, D).
    """
    if q.ndim != 4 or k.shape != v.shape or q.shape[2] % k.shape[2] != 0:
        raise ValueError(
            "attention_core takes q (B, T, H, D) and k, v (B, T, Hkv, D) with H % Hkv == 0; "
            f"got q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    q, k, v = matmul_inputs(q, k, v)  # under autocast: its dtype, as it gives SDPA (model.ops.amp)
    with autocast_off(q.device.type):
        return _AttentionCore.apply(q, k, v, keep.recomputes_elementwise)
