"""Autocast for the hand-written autograd Functions: what ``torch.amp.custom_fwd``/``custom_bwd`` do, with the
device type read from the tensors instead of fixed when the class is defined (the same ops run on CPU and CUDA).

Autocast only rewrites the built-in ops it has listed; inside a hand-written Function it would cast the
matmuls of forward but not the saved tensors, and backward runs with autocast off (CUDA's backward even
runs on another thread), so a bf16 gradient would meet an fp32 weight saved by forward
(``expected m1 and m2 to have the same dtype``). The rule here is autocast's own rule for a matmul:

- ``matmul_inputs``: under autocast, cast the floating-point inputs of a matmul op (activations and
  weights) to autocast's dtype *before* the Function, so forward computes, and saves, what autocast would
  have: bf16 copies. The cast is an ordinary differentiable ``.to``, so the fp32 weights still receive
  fp32 gradients.
- ``autocast_off``: run the Function's forward with autocast disabled, so the dtypes inside are exactly
  the inputs' (RMSNorm keeps its explicit fp32 statistics, and nothing is cast twice).
- ``no_autocast_backward``: backward likewise runs with autocast disabled, whatever the caller's state.

Outside autocast (fp32, or FSDP's bf16 parameters) all three are no-ops.
"""

from __future__ import annotations

import contextlib
import functools

import torch


def _autocast_dtype(device_type: str) -> torch.dtype | None:
    """Autocast's lower-precision dtype for ``device_type`` if autocast is on there, else None."""
    if device_type not in ("cpu", "cuda") or not torch.is_autocast_enabled(device_type):
        return None
    return torch.get_autocast_dtype(device_type)


def matmul_inputs(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """``tensors`` as autocast would feed them to a matmul: floating ones cast to its dtype, if it is on."""
    dtype = _autocast_dtype(tensors[0].device.type)
    if dtype is None:
        return tensors
    return tuple(t.to(dtype) if t.is_floating_point() else t for t in tensors)


def autocast_off(device_type: str):
    """A context with autocast disabled on ``device_type`` (a no-op context where autocast is already off)."""
    if _autocast_dtype(device_type) is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device_type, enabled=False)


def no_autocast_backward(backward):
    """Decorate a Function's ``backward(ctx, *grads)`` to run with autocast off on the gradients' device."""

    @functools.wraps(backward)
    def wrapped(ctx, *grads):
        device_type = next((g.device.type for g in grads if isinstance(g, torch.Tensor)), "cpu")
        with autocast_off(device_type):
            return backward(ctx, *grads)

    return wrapped
