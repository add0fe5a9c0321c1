"""Hand-written backward ops (model.ops) against autograd of decomposed references and the model's modules.

Checks: fp64 gradcheck; fp32 parity with the references at random, debug-model and LLaMA-7B shapes; every
``Keep`` level bitwise equal; the exact bytes each op saves for backward, per level.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import pytest
import torch
from torch import nn

import model.ops.attention as ops_attention
from model.attention import causal_attention
from model.config import AttnBackend, ModelArgs
from model.llama import FeedForward, RMSNorm
from model.ops import Keep, attention_core, linear, rms_norm, saved_activation_bytes, saved_bytes, swiglu
from model.ops.reference import attention_core_reference, linear_reference, rms_norm_reference, swiglu_reference

EPS = 1e-6

# Tolerances of an op's hand-written backward against autograd of its reference: same math, other order.
TOLERANCES = {
    # Rounding is ~1e-16 relative; 1e-10 leaves six orders of magnitude for sums over up to 1e4 terms.
    torch.float64: dict(rtol=1e-10, atol=1e-10),
    # eps 1.2e-7 times sqrt(1e4) for the longest reductions (F = 11008) is ~1e-5; 7B shapes show < 6e-6.
    torch.float32: dict(rtol=1e-5, atol=1e-5),
}
# Every compared tensor must reach 100 x atol somewhere, or a test could pass on near-zero gradients.
GUARD_FACTOR = 100
# bf16 under autocast is judged against the fp32 result, next to the reference op under the same autocast
# (xformers' habit: a low-precision and an fp32 reference). Each matmul output rounded to bf16 has a
# relative error of up to 2^-9; the ops chain two to four such roundings, measured at 2e-3..6e-3 of the
# fp32 result's norm for ops and references alike. Bounds: no more than 1.5 x the reference's own error
# (+1e-4 for the exact ops, whose error is ~0), and never more than 1.6e-2 (four bf16 steps).
AUTOCAST_VS_REFERENCE = 1.5
AUTOCAST_FLOOR = 1e-4
AUTOCAST_MAX_REL = 1.6e-2


@dataclass(frozen=True)
class Shape:
    """Sizes of one test case; legend as in model/llama.py (D = head dim of the attention core)."""

    name: str
    batch: int
    seq: int
    dim: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int


TINY = Shape("tiny", batch=1, seq=3, dim=8, hidden=10, heads=4, kv_heads=2, head_dim=4)
RANDOM = Shape("random", batch=2, seq=7, dim=24, hidden=40, heads=6, kv_heads=2, head_dim=8)
_DEBUG_ARGS = ModelArgs(n_kv_heads=2)  # the debug preset's widths (d=64, 4 heads), with GQA
DEBUG = Shape(
    "debug", batch=2, seq=16, dim=_DEBUG_ARGS.dim, hidden=_DEBUG_ARGS.ffn_hidden_dim,
    heads=_DEBUG_ARGS.n_heads, kv_heads=_DEBUG_ARGS.n_kv_heads, head_dim=_DEBUG_ARGS.head_dim,
)  # fmt: skip
# LLaMA-7B widths with a handful of tokens: the matmuls' reduction lengths are the real ones.
LLAMA_7B = Shape("llama7b", batch=1, seq=4, dim=4096, hidden=11008, heads=32, kv_heads=32, head_dim=128)


@dataclass(frozen=True)
class Op:
    """An op under test: its argument names (keys of ``make_tensors``), the op, and its reference."""

    args: tuple[str, ...]
    op: object  # op(*tensors, keep=Keep)
    reference: object  # reference(*tensors)

    def at(self, keep: Keep = Keep.matmul_outputs):
        """The op with ``keep`` fixed (the selective level by default)."""
        return functools.partial(self.op, keep=keep)

    @property
    def fn(self):
        return self.at()


def _linear(x, w, *, keep: Keep):
    del keep  # linear keeps x and W at every level
    return linear(x, w)


OPS = {
    "rms_norm": Op(("x", "g"), functools.partial(rms_norm, eps=EPS), functools.partial(rms_norm_reference, eps=EPS)),
    "linear": Op(("x", "w1"), _linear, linear_reference),
    "swiglu": Op(("x", "w1", "w3", "w2"), swiglu, swiglu_reference),
    "attention_core": Op(("q", "k", "v"), attention_core, attention_core_reference),
}


@functools.cache
def make_tensors(shape: Shape, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Inputs for every op at ``shape``, scaled so outputs and gradients are O(1). Cached: 7B weights take
    a second to draw and ~0.6 GB, reused by every 7B test."""
    gen = torch.Generator().manual_seed(0)
    b, t, d, f = shape.batch, shape.seq, shape.dim, shape.hidden

    def randn(*size: int, std: float = 1.0) -> torch.Tensor:
        return (torch.randn(*size, generator=gen, dtype=dtype) * std).to(dtype)

    qkv = (b, t, shape.heads, shape.head_dim), (b, t, shape.kv_heads, shape.head_dim)
    return {
        "x": randn(b, t, d),
        "g": 1 + randn(d, std=0.1),
        "w1": randn(f, d, std=d**-0.5),  # fan-in scaling keeps a = x W1^T at unit variance
        "w3": randn(f, d, std=d**-0.5),
        "w2": randn(d, f, std=f**-0.5),
        "q": randn(*qkv[0]),
        "k": randn(*qkv[1]),
        "v": randn(*qkv[1]),
    }


def op_inputs(name: str, shape: Shape, dtype: torch.dtype) -> list[torch.Tensor]:
    tensors = make_tensors(shape, dtype)
    return [tensors[arg] for arg in OPS[name].args]


def forward_backward(fn, inputs, dy=None) -> tuple[torch.Tensor, tuple[torch.Tensor, ...], torch.Tensor]:
    """fn on fresh leaves sharing ``inputs``' memory -> (output, input gradients, dy used)."""
    leaves = [t.detach().requires_grad_() for t in inputs]
    out = fn(*leaves)
    if dy is None:
        dy = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=out.dtype).to(out.device)
    grads = torch.autograd.grad(out, leaves, dy)
    return out.detach(), grads, dy


def assert_all_equal(actual, expected) -> None:
    for i, (a, e) in enumerate(zip(actual, expected, strict=True)):
        assert torch.equal(a, e), f"tensor {i} differs, max abs diff {(a - e).abs().max().item()}"


@pytest.mark.parametrize("keep", list(Keep), ids=lambda k: k.value)
@pytest.mark.parametrize("name", OPS)
def test_gradcheck_fp64(name, keep):
    op = OPS[name]
    inputs = [t.clone().requires_grad_() for t in op_inputs(name, TINY, torch.float64)]
    assert torch.autograd.gradcheck(op.at(keep), inputs)


@pytest.mark.parametrize("shape", [RANDOM, DEBUG, LLAMA_7B], ids=lambda s: s.name)
@pytest.mark.parametrize("name", OPS)
def test_matches_reference_fp32(name, shape):
    op, dtype = OPS[name], torch.float32
    inputs = op_inputs(name, shape, dtype)
    out, grads, dy = forward_backward(op.fn, inputs)
    ref_out, ref_grads, _ = forward_backward(op.reference, inputs, dy)
    tol = TOLERANCES[dtype]
    for what, actual, expected in zip(("output", *op.args), (out, *grads), (ref_out, *ref_grads)):
        assert expected.abs().max() > GUARD_FACTOR * tol["atol"], f"{what} too close to zero to test"
        torch.testing.assert_close(actual, expected, **tol, msg=lambda m: f"{name} {what}: {m}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [RANDOM, DEBUG], ids=lambda s: s.name)
@pytest.mark.parametrize("name", OPS)
def test_keep_levels_bitwise_equal(name, shape, dtype):
    """Every level does the same arithmetic in the same order; for swiglu that includes rerunning
    a = x W1^T, b = x W3^T in backward (``Keep.ffn_input``), which gives the bits forward computed."""
    op = OPS[name]
    inputs = op_inputs(name, shape, dtype)
    out, grads, dy = forward_backward(op.at(Keep.all), inputs)
    for keep in (Keep.matmul_outputs, Keep.ffn_input):
        kept_out, kept_grads, _ = forward_backward(op.at(keep), inputs, dy)
        assert_all_equal((out, *grads), (kept_out, *kept_grads))


@pytest.mark.parametrize("name", OPS)
def test_gradients_only_for_inputs_that_need_them(name):
    """Backward skips the gradients autograd does not ask for and leaves the others unchanged."""
    op = OPS[name]
    inputs = op_inputs(name, RANDOM, torch.float32)
    _, all_grads, dy = forward_backward(op.fn, inputs)
    for wanted in ({0}, set(range(1, len(inputs)))):  # the first input alone, then the others
        leaves = [t.detach().requires_grad_(i in wanted) for i, t in enumerate(inputs)]
        grads = torch.autograd.grad(op.fn(*leaves), [leaves[i] for i in sorted(wanted)], dy)
        assert_all_equal(grads, [all_grads[i] for i in sorted(wanted)])


# --- autocast (the single-process and TP-only bf16 path) -----------------------------------------------------


def autocast_forward_backward(fn, inputs, dy=None):
    """Forward under bf16 autocast (on the inputs' device) on fp32 leaves, backward outside it, as the trainer."""
    leaves = [t.detach().requires_grad_() for t in inputs]
    with torch.autocast(inputs[0].device.type, dtype=torch.bfloat16):
        out = fn(*leaves)
    if dy is None:
        dy = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out.dtype).to(out.device)
    grads = torch.autograd.grad(out, leaves, dy)
    return out.detach(), grads, dy


def rel_error(actual: torch.Tensor, exact: torch.Tensor) -> float:
    return ((actual.double() - exact.double()).norm() / exact.double().norm()).item()


@pytest.mark.parametrize("keep", list(Keep), ids=lambda k: k.value)
@pytest.mark.parametrize("shape", [RANDOM, DEBUG], ids=lambda s: s.name)
@pytest.mark.parametrize("name", OPS)
def test_autocast_bf16_matches_reference(name, shape, keep):
    """Under autocast each op gives what autocast gives its reference: the same output dtype (bf16 after a
    matmul), fp32 gradients for the fp32 leaves, and values no further from fp32 than the reference's.
    Before the ops followed autocast's rule, backward crashed here (a bf16 gradient times the fp32 weight
    saved by forward)."""
    op = OPS[name]
    inputs = op_inputs(name, shape, torch.float32)
    out, grads, dy = autocast_forward_backward(op.at(keep), inputs)
    ref_out, ref_grads, _ = autocast_forward_backward(op.reference, inputs, dy)
    exact_out, exact_grads, _ = forward_backward(op.reference, inputs, dy.float())
    assert_as_close_as_reference(names=("output", *op.args), actual=(out, *grads), reference=(ref_out, *ref_grads),
                                 exact=(exact_out, *exact_grads), label=name)  # fmt: skip


def assert_as_close_as_reference(*, names, actual, reference, exact, label: str,
                                 max_rel: float = AUTOCAST_MAX_REL) -> None:  # fmt: skip
    """Low-precision results no further from ``exact`` than the reference op's, in the same dtypes."""
    for what, a, r, e in zip(names, actual, reference, exact, strict=True):
        assert a.dtype == r.dtype, (label, what, a.dtype, r.dtype)
        assert e.abs().max() > GUARD_FACTOR * AUTOCAST_FLOOR, f"{label} {what} too close to zero to test"
        error, ref_error = rel_error(a, e), rel_error(r, e)
        assert error <= AUTOCAST_VS_REFERENCE * ref_error + AUTOCAST_FLOOR, (label, what, error, ref_error)
        assert error <= max_rel, (label, what, error)


def test_autocast_bf16_backward_runs_without_the_callers_autocast():
    """A backward called inside an autocast region (allowed on CPU) gives the same gradients as outside."""
    inputs = op_inputs("swiglu", RANDOM, torch.float32)
    selective = OPS["swiglu"].fn
    _, outside, dy = autocast_forward_backward(selective, inputs)
    leaves = [t.detach().requires_grad_() for t in inputs]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = torch.autograd.grad(selective(*leaves), leaves, dy)
    assert_all_equal(inside, outside)


# --- the ops against the model's current modules --------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_rms_norm_forward_equals_module(dtype):
    x, g = op_inputs("rms_norm", DEBUG, dtype)
    module = RMSNorm(DEBUG.dim, eps=EPS, keep=Keep.matmul_outputs).to(dtype)
    with torch.no_grad():
        module.weight.copy_(g)
        assert torch.equal(rms_norm(x, module.weight, eps=EPS, keep=module.keep), module(x))


def test_linear_forward_equals_module():
    x, w = op_inputs("linear", DEBUG, torch.float32)
    module = nn.Linear(DEBUG.dim, DEBUG.hidden, bias=False)
    with torch.no_grad():
        module.weight.copy_(w)
        assert torch.equal(linear(x, module.weight), module(x))


def test_swiglu_equals_feed_forward():
    ffn = FeedForward(ModelArgs(dim=DEBUG.dim), keep=Keep.matmul_outputs)
    x, w1, w3, w2 = op_inputs("swiglu", DEBUG, torch.float32)
    with torch.no_grad():
        for lin, w in ((ffn.w1, w1), (ffn.w3, w3), (ffn.w2, w2)):
            lin.weight.copy_(w)
    leaves = (x.detach().requires_grad_(), ffn.w1.weight, ffn.w3.weight, ffn.w2.weight)
    out, ref_out = swiglu(*leaves, keep=ffn.keep), ffn(leaves[0])
    assert torch.equal(out, ref_out)  # the same ops in the same order
    dy = torch.randn_like(out)
    tol = TOLERANCES[torch.float32]
    for actual, expected in zip(torch.autograd.grad(out, leaves, dy), torch.autograd.grad(ref_out, leaves, dy)):
        assert expected.abs().max() > GUARD_FACTOR * tol["atol"]
        torch.testing.assert_close(actual, expected, **tol)


@pytest.mark.parametrize("kv_heads", [4, 2, 1])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_attention_core_equals_sdpa_backend(dtype, kv_heads):
    """SDPA on CPU dispatches to the same flash kernel, which takes GQA natively: equal to the bit."""
    shape = Shape("sdpa", batch=2, seq=9, dim=8, hidden=8, heads=4, kv_heads=kv_heads, head_dim=8)
    inputs = op_inputs("attention_core", shape, dtype)
    sdpa = functools.partial(causal_attention, backend=AttnBackend.sdpa)
    out, grads, dy = forward_backward(OPS["attention_core"].fn, inputs)
    ref_out, ref_grads, _ = forward_backward(sdpa, inputs, dy)
    assert_all_equal((out, *grads), (ref_out, *ref_grads))


@pytest.mark.parametrize("keep", [Keep.matmul_outputs, Keep.all], ids=lambda k: k.value)
def test_attention_core_expanded_gqa_path(monkeypatch, keep):
    """The expand-then-reduce path that the CUDA kernel takes, run through the CPU kernel."""
    shape = RANDOM
    inputs = op_inputs("attention_core", shape, torch.float32)
    selective = OPS["attention_core"].fn
    native_out, native_grads, dy = forward_backward(selective, inputs)
    monkeypatch.setattr(ops_attention, "_kernel_takes_gqa", lambda q: False)
    op = OPS["attention_core"].at(keep)
    out, grads, _ = forward_backward(op, inputs, dy)
    torch.testing.assert_close((out, *grads), (native_out, *native_grads), **TOLERANCES[torch.float32])
    selective_out, selective_grads, _ = forward_backward(selective, inputs, dy)
    assert_all_equal((out, *grads), (selective_out, *selective_grads))
    fp64 = [t.clone().requires_grad_() for t in op_inputs("attention_core", TINY, torch.float64)]
    assert torch.autograd.gradcheck(op, fp64)
    b, t, h, hkv, d = shape.batch, shape.seq, shape.heads, shape.kv_heads, shape.head_dim
    kv_heads_saved = h if keep == Keep.all else hkv  # Keep.all keeps the expanded k', v'
    expected = (2 * b * t * h * d + 2 * b * t * kv_heads_saved * d) * 4 + b * h * t * 4
    assert saved_activation_bytes(lambda: op(*[x.detach().requires_grad_() for x in inputs])) == expected


# --- bytes saved for backward ----------------------------------------------------------------------------


def expected_saved_bytes(name: str, shape: Shape, *, keep: Keep, dtype: torch.dtype) -> tuple[int, int]:
    """(activation bytes, parameter bytes) an op saves for backward, written out per tensor.

    N = B*T tokens; s = bytes per element of the inputs (activations and weights share a dtype here);
    c = bytes per element of the compute dtype promote_types(dtype, fp32), in which RMSNorm keeps rrms
    and x_hat and the attention kernel keeps the log-sum-exp.
    """
    b, t, d, f = shape.batch, shape.seq, shape.dim, shape.hidden
    h, hkv, hd = shape.heads, shape.kv_heads, shape.head_dim
    n = b * t
    s = torch.finfo(dtype).bits // 8
    c = torch.finfo(torch.promote_types(dtype, torch.float32)).bits // 8
    if name == "rms_norm":
        # Keep.all: x_hat (N d, c) + rrms (N, c); the other levels: x (N d, s) + rrms. Parameter: g (d).
        return (n * d * c if keep == Keep.all else n * d * s) + n * c, d * s
    if name == "linear":
        return n * d * s, f * d * s  # x (N d); W (F d)
    if name == "swiglu":
        # Keep.matmul_outputs: x (N d) + a, b (N F each); Keep.all: + s, h (N F each); Keep.ffn_input: x
        # alone. Parameters: W1, W3, W2 (F d each).
        kept_hidden = {Keep.all: 4, Keep.matmul_outputs: 2, Keep.ffn_input: 0}[keep]
        return (n * d + kept_hidden * n * f) * s, 3 * f * d * s
    if name == "attention_core":
        # Every level (CPU kernel, no GQA expansion): q, o (B T H D) + k, v (B T Hkv D) + lse (B H T, c).
        return (2 * b * t * h * hd + 2 * b * t * hkv * hd) * s + b * h * t * c, 0
    raise AssertionError(name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("keep", list(Keep), ids=lambda k: k.value)
@pytest.mark.parametrize("name", OPS)
def test_saved_bytes_match_formula(name, keep, dtype):
    op = OPS[name]
    args = [
        nn.Parameter(t.clone()) if arg in ("g", "w1", "w3", "w2") else t.clone().requires_grad_()
        for arg, t in zip(op.args, op_inputs(name, DEBUG, dtype))
    ]
    counted = saved_bytes(lambda: op.at(keep)(*args))
    activations, parameters = expected_saved_bytes(name, DEBUG, keep=keep, dtype=dtype)
    assert (counted.activations, counted.parameters) == (activations, parameters)


def test_saved_activation_bytes_excludes_parameters_and_their_views():
    torch.manual_seed(0)
    lin = nn.Linear(8, 5, bias=False)
    x = torch.randn(3, 8, requires_grad=True)
    # F.linear saves x and W.t(), a view that is no longer an nn.Parameter: recognised by its storage.
    counted = saved_bytes(lambda: lin(x), params=lin.parameters())
    assert (counted.activations, counted.parameters) == (3 * 8 * 4, 5 * 8 * 4)
    assert saved_activation_bytes(lambda: lin(x), params=lin.parameters()) == 3 * 8 * 4
    assert saved_activation_bytes(lambda: lin(x)) == (3 * 8 + 5 * 8) * 4  # the view is missed unlisted
    # A hand-written Function saves the Parameter object itself: recognised without a list.
    assert saved_activation_bytes(lambda: linear(x, lin.weight)) == 3 * 8 * 4
    # Plain tensors count as parameters only when listed.
    w = torch.randn(5, 8, requires_grad=True)
    assert saved_activation_bytes(lambda: linear(x, w), params=[w]) == 3 * 8 * 4
    assert saved_activation_bytes(lambda: linear(x, w)) == (3 * 8 + 5 * 8) * 4
