"""Where a training step's time goes: matrix multiplies, the attention kernels, the optimizer, the rest.

One profiled step (after a warm-up step) of a model with its optimizer, read back from torch.profiler:

- ``gemm_s``: self time of the matmul kernels (``aten::mm``/``addmm``/``bmm``), forward and backward;
  with the model's matmul FLOPs this gives the rate they ran at, next to the measured peak.
- ``attention_s``: the fused attention kernels, forward and backward (SDPA's CPU flash kernel, which
  both our hand-written core and SDPA call).
- ``optimizer_s``: ``optimizer.step()`` (AdamW) as a whole.
- ``other_s``: the rest of the step: element-wise work, norms, RoPE, the loss, autograd's bookkeeping.

The point of it: every implementation of the same model does the same GEMMs, so GEMM time bounds how
much faster one training loop can be than another.
"""

from __future__ import annotations

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from bench.common import MATMUL_OPS
from bench.loops import loop_loss


def _is_attention_kernel(name: str) -> bool:
    return name.startswith("aten::_scaled_dot_product_flash_attention") or name.startswith("aten::_efficient_attention")


def _step(model, optimizer, tokens, *, dtype) -> None:
    with record_function("bench.forward_backward"):
        loop_loss(model, tokens, dtype=dtype).backward()
    with record_function("bench.optimizer"):
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def step_breakdown(model: torch.nn.Module, optimizer: torch.optim.Optimizer, tokens: torch.Tensor, *,
                   dtype: torch.dtype = torch.float32) -> dict[str, float]:  # fmt: skip
    """Seconds of one step by category (see the module docstring); CPU only."""
    _step(model, optimizer, tokens, dtype=dtype)  # warm-up: allocator, thread pools, optimizer state
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        _step(model, optimizer, tokens, dtype=dtype)
    events = prof.key_averages()
    total = {e.key: e.cpu_time_total / 1e6 for e in events}
    gemm = sum(e.self_cpu_time_total for e in events if e.key in MATMUL_OPS) / 1e6
    attention = sum(e.self_cpu_time_total for e in events if _is_attention_kernel(e.key)) / 1e6
    step = total["bench.forward_backward"] + total["bench.optimizer"]
    optimizer_s = total["bench.optimizer"]
    return {"step_s": step, "gemm_s": gemm, "attention_s": attention, "optimizer_s": optimizer_s,
            "other_s": step - gemm - attention - optimizer_s}  # fmt: skip
