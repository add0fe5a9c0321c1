"""The hand-written backward ops on CUDA in bf16 (``make test-gpu``): the attention core's CUDA kernels
against SDPA, every op against autograd of its reference, and the fallback where the flash kernel cannot run.

Tolerances: bf16 results are judged against an fp32 result of the reference, next to the reference's own
bf16 result (tests/model/test_ops.py: no further than 1.5x its error, never beyond 1.6e-2 relative). On
CUDA nothing here is compared bitwise: the flash backward accumulates dq with atomic adds.
"""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F

from model.attention import core_supports, cuda_flash_kernel_runs
from model.config import AttnBackend, ModelArgs
from model.llama import Attention, rope_table
from model.ops import Keep, attention_core
from tests.gpu.conftest import GPU
from tests.model.test_ops import (
    DEBUG,
    OPS,
    RANDOM,
    Shape,
    assert_as_close_as_reference,
    autocast_forward_backward,
    forward_backward,
    op_inputs,
)

pytestmark = GPU


def _cuda_inputs(name: str, shape: Shape, dtype: torch.dtype) -> list[torch.Tensor]:
    return [t.cuda() for t in op_inputs(name, shape, dtype)]


def _sdpa(q, k, v):
    """SDPA in the (B, T, H, D) layout, grouped-query heads by enable_gqa."""
    out = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v)), is_causal=True,
                                         enable_gqa=k.shape[2] != q.shape[2])  # fmt: skip
    return out.transpose(1, 2)


@pytest.mark.parametrize("recompute", [True, False])
@pytest.mark.parametrize("kv_heads", [8, 2, 1], ids=["H", "H/4", "1"])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_attention_core_matches_sdpa_bf16(kv_heads, head_dim, recompute, exact_fp32):
    shape = Shape("cuda", batch=2, seq=256, dim=8, hidden=8, heads=8, kv_heads=kv_heads, head_dim=head_dim)
    q, k, v = _cuda_inputs("attention_core", shape, torch.bfloat16)
    assert core_supports(AttnBackend.sdpa, q=q), "the CUDA flash kernel should serve bf16 at this head dim"
    out, grads, dy = forward_backward(functools.partial(attention_core, keep=Keep.matmul_outputs if recompute else Keep.all),
                                      [q, k, v])  # fmt: skip
    ref_out, ref_grads, _ = forward_backward(_sdpa, [q, k, v], dy)
    exact_out, exact_grads, _ = forward_backward(_sdpa, [t.float() for t in (q, k, v)], dy.float())
    assert_as_close_as_reference(names=("out", "q", "k", "v"), actual=(out, *grads), reference=(ref_out, *ref_grads),
                                 exact=(exact_out, *exact_grads), label="attention_core")  # fmt: skip


@pytest.mark.parametrize("precision", ["bf16", "autocast"])
@pytest.mark.parametrize("shape", [RANDOM, DEBUG], ids=lambda s: s.name)
@pytest.mark.parametrize("name", OPS)
def test_op_matches_reference(name, shape, precision, exact_fp32):
    """bf16: bf16 inputs and weights (FSDP's bf16 parameters); autocast: fp32 leaves under CUDA autocast (the
    single-GPU path). The hand-written backward against autograd of the reference, both against fp32."""
    op = OPS[name]
    inputs = _cuda_inputs(name, shape, torch.bfloat16 if precision == "bf16" else torch.float32)
    run = forward_backward if precision == "bf16" else autocast_forward_backward
    out, grads, dy = run(op.fn, inputs)
    ref_out, ref_grads, _ = run(op.reference, inputs, dy)
    exact_out, exact_grads, _ = forward_backward(op.reference, [t.float() for t in inputs], dy.float())
    assert_as_close_as_reference(names=("output", *op.args), actual=(out, *grads), reference=(ref_out, *ref_grads),
                                 exact=(exact_out, *exact_grads), label=name)  # fmt: skip


def test_head_dim_over_256_falls_back_to_sdpa(cuda):
    """Past the flash kernel's head-dim limit the model attends through SDPA (its other kernels), not an error."""
    args = ModelArgs(dim=1024, n_heads=2, vocab_size=64, max_seq_len=64)  # head dim 512
    q = torch.zeros(1, 8, 2, 512, device=cuda, dtype=torch.bfloat16)
    assert not core_supports(AttnBackend.sdpa, q=q)
    assert not cuda_flash_kernel_runs(device_index=cuda.index, dtype=torch.bfloat16, head_dim=512)
    attn = Attention(args, keep=Keep.matmul_outputs).to(cuda)
    x = torch.randn(2, 16, 1024, device=cuda, requires_grad=True)
    rope = rope_table(head_dim=512, max_seq_len=64, theta=10000.0, device=cuda)[:16]
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = attn(x, rope)
    out.float().sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().max() > 0


def test_flash_varlen_document_attention_matches_sdpa_with_the_mask(cuda):
    """Packed documents on the GPU: flash-attn's variable-length kernel against SDPA with the document mask
    (bf16, forward and backward)."""
    from model.attention import document_attention, flash_attn_available
    from model.config import AttnBackend

    if not flash_attn_available():
        pytest.skip("needs flash-attn (pip install -e '.[gpu]')")
    docs = torch.tensor([[0] * 40 + [1] * 60 + [2] * 28, [0] * 100 + [1] * 28], device=cuda)
    gen = torch.Generator(device=cuda).manual_seed(0)
    q, k, v = (torch.randn(2, 128, h, 64, device=cuda, dtype=torch.bfloat16, generator=gen).requires_grad_()
               for h in (8, 4, 4))
    flash = document_attention(q, k, v, documents=docs, backend=AttnBackend.flash)
    grads = torch.autograd.grad(flash.float().square().sum(), (q, k, v))
    sdpa = document_attention(q, k, v, documents=docs, backend=AttnBackend.sdpa)
    ref_grads = torch.autograd.grad(sdpa.float().square().sum(), (q, k, v))
    torch.testing.assert_close(flash, sdpa, rtol=2e-2, atol=2e-2)  # bf16 outputs of two kernels
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=5e-2, atol=5e-2)
