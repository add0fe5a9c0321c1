"""Decomposed references for the ops in ``model.ops``: the same forward in plain ops, differentiated by
autograd. The tests compare the hand-written backward functions against these."""

from __future__ import annotations

import torch

from model.attention import causal_attention
from model.config import AttnBackend


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, *, eps: float) -> torch.Tensor:
    """x / sqrt(mean(x^2) + eps) * g in at least fp32, cast back: ``model.llama.RMSNorm.forward``."""
    xf = x.to(torch.promote_types(x.dtype, torch.float32))
    normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return normed.type_as(x) * weight


def linear_reference(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x W^T as a plain matmul."""
    return x @ weight.t()


def swiglu_reference(x: torch.Tensor, w1: torch.Tensor, w3: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """(silu(x W1^T) * x W3^T) W2^T with silu written out as a * sigmoid(a)."""
    a = x @ w1.t()
    return (a * torch.sigmoid(a) * (x @ w3.t())) @ w2.t()


def attention_core_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Explicit softmax(q k^T / sqrt(D) + causal mask) v on (B, T, H, D) / (B, T, Hkv, D) inputs."""
    return causal_attention(q, k, v, backend=AttnBackend.math)
