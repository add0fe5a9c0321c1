"""Causal self-attention through one function, several kernels.

Shape legend: B batch, T sequence, H query heads, Hkv key/value heads (H % Hkv == 0), D head dim.
All backends take and return the (B, T, H, D) layout of the projections, so callers never transpose.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

from model.config import AttnBackend


@torch.compiler.assume_constant_result  # torch.compile: a fact of the environment, not traced
@functools.cache
def flash_attn_available() -> bool:
    """True when the optional flash-attn package imports (it only builds on CUDA machines)."""
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_backend(backend: AttnBackend, *, q: torch.Tensor) -> AttnBackend:
    """Pick the kernel for ``auto`` and check that an explicit choice can run on these tensors."""
    flash_ok = q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and flash_attn_available()
    if backend == AttnBackend.auto:
        return AttnBackend.flash if flash_ok else AttnBackend.sdpa
    if backend == AttnBackend.flash and not flash_ok:
        raise ValueError(
            "model.attn_backend=flash needs the flash-attn package (pip install -e '.[gpu]'), CUDA tensors "
            f"and fp16/bf16; got device={q.device.type}, dtype={q.dtype}, "
            f"flash-attn installed={flash_attn_available()}. Use model.attn_backend=auto or sdpa."
        )
    return backend


def core_supports(backend: AttnBackend, *, q: torch.Tensor) -> bool:
    """Whether ``model.ops.attention_core`` (the flash kernels with a hand-written backward) serves ``backend``.

    It replaces SDPA wherever SDPA would pick the same flash kernel: on CPU (any float dtype) and on CUDA
    for fp16/bf16. flash-attn and the math reference keep their own backward.
    """
    if resolve_backend(backend, q=q) != AttnBackend.sdpa:
        return False
    return not q.is_cuda or q.dtype in (torch.float16, torch.bfloat16)


def causal_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, backend: AttnBackend = AttnBackend.auto
) -> torch.Tensor:
    """softmax(q k^T / sqrt(D) + causal mask) v.

    Args:
        q: (B, T, H, D); k, v: (B, T, Hkv, D).
    Returns:
        (B, T, H, D).
    """
    backend = resolve_backend(backend, q=q)
    if backend == AttnBackend.flash:
        from flash_attn import flash_attn_func

        return flash_attn_func(q, k, v, causal=True)  # handles Hkv < H itself
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, T, D)
    if backend == AttnBackend.sdpa:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=k.shape[1] != q.shape[1])
    else:
        out = _math_attention(q, k, v)
    return out.transpose(1, 2)


def _math_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The definition, in plain ops: a reference for the fused kernels. Takes and returns (B, H, T, D)."""
    groups = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(groups, dim=1)
    v = v.repeat_interleave(groups, dim=1)
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])  # (B, H, T, T)
    t = q.shape[2]
    mask = torch.ones(t, t, dtype=torch.bool, device=q.device).triu(1)
    scores = scores.masked_fill(mask, float("-inf"))
    # Softmax in at least fp32: exp of bf16 scores loses the small probabilities.
    probs = torch.softmax(scores.to(torch.promote_types(scores.dtype, torch.float32)), dim=-1)
    return probs.to(q.dtype) @ v
