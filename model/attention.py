"""Causal self-attention through one function, several kernels.

Shape legend: B batch, T sequence, H query heads, Hkv key/value heads (H % Hkv == 0), D head dim.
All backends take and return the (B, T, H, D) layout of the projections, so callers never transpose.
"""

from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F

from compat import flash_attention_forward
from model.config import AttnBackend


# Facts of the environment, decided once per process. Under torch.compile the deciding functions are
# marked constant (evaluated eagerly while tracing, their result baked into the graph). They cache in a
# dict rather than through functools.cache: Dynamo traces *into* an lru_cache wrapper, ignoring the mark.
_DECIDED: dict[tuple, bool] = {}


@torch.compiler.assume_constant_result
def flash_attn_available() -> bool:
    """True when the optional flash-attn package imports (it only builds on CUDA machines)."""
    if ("flash_attn",) not in _DECIDED:
        try:
            import flash_attn  # noqa: F401  (only whether it imports)
        except ImportError:
            _DECIDED[("flash_attn",)] = False
        else:
            _DECIDED[("flash_attn",)] = True
    return _DECIDED[("flash_attn",)]


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

    It replaces SDPA wherever SDPA would pick the same flash kernel: on CPU (any float dtype), and on CUDA
    where torch's flash kernel runs (``cuda_flash_kernel_runs``). Elsewhere (fp32 on CUDA, a pre-Ampere GPU,
    head dim > 256) SDPA picks another kernel and keeps its own backward. flash-attn and the math reference
    keep their own backward too.

    Args:
        q: (B, T, H, D).
    """
    if resolve_backend(backend, q=q) != AttnBackend.sdpa:
        return False
    if not q.is_cuda:
        return True
    return cuda_flash_kernel_runs(device_index=q.device.index, dtype=q.dtype, head_dim=q.shape[-1])


def flash_kernel_shape_ok(*, capability: tuple[int, int], dtype: torch.dtype, head_dim: int) -> bool:
    """The documented limits of torch's CUDA flash kernel: fp16/bf16, sm80 (Ampere) or newer, head dim a
    multiple of 8 and at most 256."""
    return (
        dtype in (torch.float16, torch.bfloat16) and capability >= (8, 0) and head_dim % 8 == 0 and head_dim <= 256
    )


@torch.compiler.assume_constant_result
def cuda_flash_kernel_runs(*, device_index: int | None, dtype: torch.dtype, head_dim: int) -> bool:
    """Whether the hand-written core may call torch's CUDA flash kernel for these inputs on this GPU.

    The documented limits first; then one tiny call of the kernel itself, since a torch build may lack it
    for an architecture (a new GPU generation) that the limits allow. Decided once per (GPU, dtype, head dim).
    """
    key = ("cuda_flash", device_index, dtype, head_dim)
    if key not in _DECIDED:
        _DECIDED[key] = _cuda_flash_kernel_runs(device_index=device_index, dtype=dtype, head_dim=head_dim)
    return _DECIDED[key]


def _cuda_flash_kernel_runs(*, device_index: int | None, dtype: torch.dtype, head_dim: int) -> bool:
    device = torch.device("cuda", torch.cuda.current_device() if device_index is None else device_index)
    capability = torch.cuda.get_device_capability(device)
    if not flash_kernel_shape_ok(capability=capability, dtype=dtype, head_dim=head_dim):
        return False
    try:
        _probe_flash_kernel(device=device, dtype=dtype, head_dim=head_dim)
    except RuntimeError as err:
        warnings.warn(
            f"torch's flash attention kernel does not run on {torch.cuda.get_device_name(device)} "
            f"(sm{capability[0]}{capability[1]}, {dtype}, head dim {head_dim}): {err}. Attention uses SDPA's "
            "other kernels and their own backward instead.",
            stacklevel=2,
        )
        return False
    return True


def _probe_flash_kernel(*, device: torch.device, dtype: torch.dtype, head_dim: int) -> None:
    """One forward of the CUDA flash kernel on a tiny input; raises RuntimeError where it cannot run."""
    probe = torch.zeros(1, 1, 8, head_dim, device=device, dtype=dtype)  # (B, H, T, D)
    flash_attention_forward(probe, probe, probe)


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


def _document_begins(documents: torch.Tensor) -> torch.Tensor:
    """(B, T) ids -> (B, T) bool: a document begins here (at each row's start, and where the id changes)."""
    begins = torch.ones_like(documents, dtype=torch.bool)
    begins[:, 1:] = documents[:, 1:] != documents[:, :-1]
    return begins


def document_positions(documents: torch.Tensor) -> torch.Tensor:
    """(B, T) document ids (constant along each packed document) -> (B, T) positions that restart at 0 where
    a document begins, the RoPE positions of documents packed into one sequence."""
    index = torch.arange(documents.shape[1], device=documents.device).expand_as(documents)
    return index - torch.where(_document_begins(documents), index, 0).cummax(dim=1).values


def document_mask(documents: torch.Tensor) -> torch.Tensor:
    """(B, T) document ids -> (B, 1, T, T) bool, True where query i may attend to key j: j <= i and both in the
    same document (block-diagonal causal; the diagonal is always allowed, so no row is empty)."""
    t = documents.shape[1]
    causal = torch.ones(t, t, dtype=torch.bool, device=documents.device).tril()
    return ((documents[:, :, None] == documents[:, None, :]) & causal)[:, None]


def document_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, documents: torch.Tensor,
                       backend: AttnBackend = AttnBackend.auto) -> torch.Tensor:  # fmt: skip
    """softmax(q k^T / sqrt(D) + document mask) v: causal attention that never crosses from one packed
    document to another (Llama 3's document masking; finetuning's packed examples).

    Kernels: flash-attn's variable-length kernel where ``flash`` is chosen (``auto`` on a CUDA device with
    flash-attn installed and bf16/fp16): every document a sequence of its own, no mask materialised;
    otherwise SDPA with the boolean (B, 1, T, T) mask (its memory-efficient or math kernel, with their own
    backward; the hand-written flash core takes no mask); ``math``: the plain-ops reference.

    Args:
        q: (B, T, H, D); k, v: (B, T, Hkv, D); documents: (B, T) ids.
    Returns:
        (B, T, H, D).
    """
    if backend != AttnBackend.math and resolve_backend(backend, q=q) == AttnBackend.flash:
        return _flash_varlen(q, k, v, documents=documents)
    mask = document_mask(documents)
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, T, D)
    if backend == AttnBackend.math:
        out = _math_attention(q, k, v, allowed=mask)
    else:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=k.shape[1] != q.shape[1])
    return out.transpose(1, 2)


def document_boundaries(documents: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(B, T) ids -> (cu_seqlens, max_len) of the B * T positions as one stream of documents: int32 offsets
    (N + 1,) where each of the N documents begins (a row's start always begins one), flash-attn's layout."""
    b, t = documents.shape
    starts = _document_begins(documents).flatten().nonzero().squeeze(1)
    cu_seqlens = torch.cat([starts, starts.new_tensor([b * t])]).to(torch.int32)
    return cu_seqlens, int((cu_seqlens[1:] - cu_seqlens[:-1]).max())  # one host sync per call


def _flash_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, documents: torch.Tensor) -> torch.Tensor:
    """flash-attn over packed documents: (B, T, H, D), (B, T, Hkv, D) x2 -> (B, T, H, D), causal within each."""
    from flash_attn import flash_attn_varlen_func

    cu_seqlens, max_len = document_boundaries(documents)
    out = flash_attn_varlen_func(q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1), cu_seqlens, cu_seqlens,
                                 max_len, max_len, causal=True)  # fmt: skip
    return out.view_as(q)


def _math_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    allowed: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    """The definition, in plain ops: a reference for the fused kernels. Takes and returns (B, H, T, D);
    ``allowed`` (B, 1, T, T): where attention may look (default: causal)."""
    groups = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(groups, dim=1)
    v = v.repeat_interleave(groups, dim=1)
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])  # (B, H, T, T)
    if allowed is None:
        t = q.shape[2]
        allowed = torch.ones(t, t, dtype=torch.bool, device=q.device).tril()
    scores = scores.masked_fill(~allowed, float("-inf"))
    # Softmax in at least fp32: exp of bf16 scores loses the small probabilities.
    probs = torch.softmax(scores.to(torch.promote_types(scores.dtype, torch.float32)), dim=-1)
    return probs.to(q.dtype) @ v
