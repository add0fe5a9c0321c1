"""RMSNorm, RoPE, SwiGLU and attention against straightforward reference formulas."""

import math

import pytest
import torch

from model.attention import causal_attention, flash_attn_available
from model.config import AttnBackend, ModelArgs
from model.llama import FeedForward, RMSNorm, Transformer, apply_rope, rope_table
from model.ops import Keep


def test_rmsnorm_matches_formula():
    torch.manual_seed(0)
    norm = RMSNorm(16, eps=1e-5, keep=Keep.all).double()
    with torch.no_grad():
        norm.weight.copy_(torch.randn(16))
    x = torch.randn(3, 5, 16, dtype=torch.float64)
    expected = x / torch.sqrt((x**2).mean(-1, keepdim=True) + 1e-5) * norm.weight
    torch.testing.assert_close(norm(x), expected, rtol=1e-12, atol=1e-12)


def reference_rope(x, *, theta):
    """Meta's reference: pairs as complex numbers multiplied by exp(i * t * theta^(-2j/D))."""
    b, t, h, d = x.shape
    freqs = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    angles = torch.outer(torch.arange(t, dtype=torch.float64), freqs)
    rot = torch.polar(torch.ones_like(angles), angles)  # (T, D/2)
    xc = torch.view_as_complex(x.double().reshape(b, t, h, d // 2, 2))
    return torch.view_as_real(xc * rot[None, :, None, :]).flatten(-2)


def test_rope_matches_complex_reference():
    torch.manual_seed(0)
    x = torch.randn(2, 7, 3, 8, dtype=torch.float64)
    table = rope_table(head_dim=8, max_seq_len=16, theta=500.0)[:7]
    # The table is stored in fp32, hence the fp32-level tolerance.
    torch.testing.assert_close(apply_rope(x, table), reference_rope(x, theta=500.0), rtol=1e-6, atol=1e-6)


def test_rope_scores_depend_on_relative_position_only():
    torch.manual_seed(0)
    d = 16
    table = rope_table(head_dim=d, max_seq_len=32, theta=10000.0)
    q, k = torch.randn(d), torch.randn(d)

    def score(m, n):
        qm = apply_rope(q.expand(1, 32, 1, d).clone(), table)[0, m, 0]
        kn = apply_rope(k.expand(1, 32, 1, d).clone(), table)[0, n, 0]
        return (qm @ kn).item()

    assert score(5, 2) == pytest.approx(score(20, 17), rel=1e-4)
    assert score(5, 2) != pytest.approx(score(5, 4), rel=1e-2)


def test_swiglu_matches_formula():
    torch.manual_seed(0)
    args = ModelArgs(dim=32, multiple_of=16)
    ffn = FeedForward(args, keep=Keep.all).double()
    x = torch.randn(4, 32, dtype=torch.float64)
    a = x @ ffn.w1.weight.T
    silu = a * torch.sigmoid(a)
    expected = (silu * (x @ ffn.w3.weight.T)) @ ffn.w2.weight.T
    torch.testing.assert_close(ffn(x), expected)
    assert ffn.w1.weight.shape == (args.ffn_hidden_dim, 32)
    assert args.ffn_hidden_dim == 16 * math.ceil(2 / 3 * 4 * 32 / 16)


@pytest.mark.parametrize("n_kv_heads", [4, 2, 1])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_sdpa_backend_matches_math(n_kv_heads, dtype):
    torch.manual_seed(0)
    q = torch.randn(2, 9, 4, 8, dtype=dtype)
    k = torch.randn(2, 9, n_kv_heads, 8, dtype=dtype)
    v = torch.randn(2, 9, n_kv_heads, 8, dtype=dtype)
    out_sdpa = causal_attention(q, k, v, backend=AttnBackend.sdpa)
    out_math = causal_attention(q, k, v, backend=AttnBackend.math)
    # fp32: the fused kernel sums in another order; 1e-5 covers a few ulps of O(1) outputs.
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(out_sdpa, out_math, rtol=tol, atol=tol)
    assert out_sdpa.shape == q.shape
    # Causality: the first position attends only to itself.
    torch.testing.assert_close(out_sdpa[:, 0], v[:, 0].repeat_interleave(4 // n_kv_heads, dim=1), rtol=tol, atol=tol)


def test_flash_backend_refused_where_it_cannot_run():
    q = torch.randn(1, 4, 2, 8)
    if flash_attn_available() and torch.cuda.is_available():
        pytest.skip("flash-attn can run here; covered by test_flash_matches_sdpa")
    with pytest.raises(ValueError, match="model.attn_backend=flash"):
        causal_attention(q, q, q, backend=AttnBackend.flash)
    # auto falls back to SDPA on this device and agrees with it exactly.
    torch.testing.assert_close(
        causal_attention(q, q, q, backend=AttnBackend.auto), causal_attention(q, q, q, backend=AttnBackend.sdpa)
    )


@pytest.mark.gpu
@pytest.mark.skipif(not (torch.cuda.is_available() and flash_attn_available()), reason="needs CUDA and flash-attn")
def test_flash_matches_sdpa():
    torch.manual_seed(0)
    q = torch.randn(2, 128, 8, 64, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(2, 128, 2, 64, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(2, 128, 2, 64, device="cuda", dtype=torch.bfloat16)
    out_flash = causal_attention(q, k, v, backend=AttnBackend.flash)
    out_ref = causal_attention(q.double(), k.double(), v.double(), backend=AttnBackend.math)
    torch.testing.assert_close(out_flash.double(), out_ref, rtol=2e-2, atol=2e-2)  # bf16 has 8 mantissa bits


def test_model_backends_agree_end_to_end():
    torch.manual_seed(0)
    tokens = torch.randint(0, 64, (2, 12))
    outs = {}
    for backend in (AttnBackend.sdpa, AttnBackend.math):
        args = ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=64, max_seq_len=16,
                         attn_backend=backend)  # fmt: skip
        model = Transformer(args)
        torch.manual_seed(1)
        model.init_weights()
        outs[backend] = model(tokens)
    torch.testing.assert_close(outs[AttnBackend.sdpa], outs[AttnBackend.math], rtol=1e-5, atol=1e-5)


def test_causal_model_ignores_future_tokens():
    torch.manual_seed(0)
    model = Transformer(ModelArgs(vocab_size=64, max_seq_len=16))
    model.init_weights()
    a = torch.randint(0, 64, (1, 10))
    b = a.clone()
    b[0, 6:] = (b[0, 6:] + 1) % 64
    torch.testing.assert_close(model(a)[:, :6], model(b)[:, :6])
    assert not torch.allclose(model(a)[:, 6:], model(b)[:, 6:])


def test_sequence_longer_than_context_is_refused():
    model = Transformer(ModelArgs(vocab_size=64, max_seq_len=8))
    with pytest.raises(ValueError, match="max_seq_len"):
        model(torch.zeros(1, 9, dtype=torch.long))


# --- where the hand-written attention core may use torch's CUDA flash kernel ------------------------------


@pytest.mark.parametrize(
    "capability, dtype, head_dim, ok",
    [
        ((8, 0), torch.bfloat16, 128, True),  # A100
        ((9, 0), torch.float16, 256, True),  # H100, the largest head dim
        ((7, 5), torch.bfloat16, 128, False),  # T4: pre-Ampere
        ((9, 0), torch.bfloat16, 512, False),  # head dim > 256
        ((9, 0), torch.bfloat16, 100, False),  # not a multiple of 8
        ((9, 0), torch.float32, 128, False),  # fp32: SDPA's other kernels
    ],
)
def test_flash_kernel_limits(capability, dtype, head_dim, ok):
    from model.attention import flash_kernel_shape_ok

    assert flash_kernel_shape_ok(capability=capability, dtype=dtype, head_dim=head_dim) is ok


@pytest.fixture
def fake_gpu(monkeypatch):
    """A CUDA device of a chosen compute capability, as far as ``cuda_flash_kernel_runs`` looks."""
    import model.attention as attention

    attention._DECIDED.clear()
    state = {"capability": (9, 0), "probes": 0, "probe_error": None}

    def probe(**kwargs):
        state["probes"] += 1
        if state["probe_error"]:
            raise RuntimeError(state["probe_error"])

    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: state["capability"])
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Fake GPU")
    monkeypatch.setattr(attention, "_probe_flash_kernel", probe)
    yield state
    attention._DECIDED.clear()


def test_cuda_core_falls_back_where_the_kernel_cannot_run(fake_gpu):
    from model.attention import cuda_flash_kernel_runs

    assert cuda_flash_kernel_runs(device_index=0, dtype=torch.bfloat16, head_dim=128)
    assert fake_gpu["probes"] == 1
    assert cuda_flash_kernel_runs(device_index=0, dtype=torch.bfloat16, head_dim=128)
    assert fake_gpu["probes"] == 1  # decided once per (GPU, dtype, head dim)
    assert not cuda_flash_kernel_runs(device_index=0, dtype=torch.bfloat16, head_dim=512)
    assert fake_gpu["probes"] == 1  # outside the documented limits: no probe
    fake_gpu["probe_error"] = "no kernel image is available for execution on the device"
    with pytest.warns(UserWarning, match="does not run on Fake GPU .* Attention uses SDPA"):
        assert not cuda_flash_kernel_runs(device_index=0, dtype=torch.float16, head_dim=64)


def test_pre_ampere_gpu_never_calls_the_flash_kernel(fake_gpu):
    from model.attention import cuda_flash_kernel_runs

    fake_gpu["capability"] = (7, 0)  # V100
    assert not cuda_flash_kernel_runs(device_index=0, dtype=torch.bfloat16, head_dim=128)
    assert fake_gpu["probes"] == 0


def test_flash_decisions_are_constants_under_compile(fake_gpu):
    """torch.compile evaluates the decisions once, eagerly (no graph break, no probe inside the graph)."""
    from model.attention import cuda_flash_kernel_runs, flash_attn_available

    def f(x):
        if flash_attn_available() or not cuda_flash_kernel_runs(device_index=0, dtype=x.dtype, head_dim=64):
            return x + 10
        return x * 2

    compiled = torch.compile(f, fullgraph=True, backend="eager")
    for batch in (2, 3, 5):  # new shapes recompile; the decision is not made again
        assert torch.equal(compiled(torch.ones(batch, 64, dtype=torch.bfloat16)), torch.full((batch, 64), 2.0,
                                                                                          dtype=torch.bfloat16))  # fmt: skip
    assert fake_gpu["probes"] == 1


def test_pipeline_stages_compose_to_the_whole_model():
    """The seam pipeline parallelism would use (docs/pipeline.md): a stage is the model with the parts it
    does not own removed; two stages in a row give the whole model's logits, and keep its parameter names."""
    import copy

    args = ModelArgs(dim=32, n_layers=4, n_heads=4, vocab_size=64, max_seq_len=16)
    whole = Transformer(args)
    whole.init_weights(seed=0)
    first, last = copy.deepcopy(whole), copy.deepcopy(whole)
    for name in ("2", "3"):
        del first.layers[name]
    first.norm = first.output = None
    for name in ("0", "1"):
        del last.layers[name]
    last.tok_embeddings = None
    tokens = torch.randint(0, 64, (2, 12))
    torch.testing.assert_close(last(first(tokens)), whole(tokens), rtol=0, atol=0)
    names = [*first.state_dict(), *last.state_dict()]
    assert sorted(names) == sorted(whole.state_dict()) and len(names) == len(set(names))
