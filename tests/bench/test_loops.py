"""The benchmark's reference loops compute the same model as the trainer (else its ratios compare apples
with pears), and its child-process runner reports failures."""

from __future__ import annotations

import sys

import pytest
import torch
import torch.nn.functional as F

from bench.common import run_children
from bench.loops import build_loop_model, loop_loss
from model.config import ModelArgs
from model.llama import Attention, FeedForward, RMSNorm
from trainer.parallel.build import build_model
from trainer.parallel.config import ACConfig, ParallelConfig
from trainer.parallel.dims import ParallelDims

ARGS = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=128, max_seq_len=32)


def _ours() -> torch.nn.Module:
    parallel = ParallelConfig(ac=ACConfig(mode="none"))
    return build_model(ARGS, device=torch.device("cpu"), seed=0, dims=ParallelDims.from_config(parallel, world_size=1),
                       parallel=parallel)  # fmt: skip


def _loss_and_grads(model: torch.nn.Module, tokens: torch.Tensor) -> tuple[float, list[torch.Tensor]]:
    loss = loop_loss(model, tokens, dtype=torch.float32)
    loss.backward()
    return loss.item(), [p.grad for p in model.parameters()]


@pytest.mark.parametrize("loop", ["bare", "hf", "hf_ckpt"])
def test_reference_loops_compute_our_model(loop):
    """Same weights, same batch: loss and every gradient agree with the trainer's model.

    fp32 with different operation orders (hand-written backward vs autograd; HF's rotate-half RoPE on
    permuted weights): 1e-5 relative is ~100x the observed differences.
    """
    tokens = torch.randint(0, ARGS.vocab_size, (2, 17), generator=torch.Generator().manual_seed(0))
    ref_loss, ref_grads = _loss_and_grads(_ours(), tokens)
    model = build_loop_model(loop, ARGS, device=torch.device("cpu"), seed=0)
    if loop == "bare":  # every op swapped: none of the hand-written modules is left
        assert not any(type(m) in (RMSNorm, Attention, FeedForward) for m in model.modules())
    loss, grads = _loss_and_grads(model, tokens)
    assert loss == pytest.approx(ref_loss, rel=1e-6)
    assert len(grads) == len(ref_grads)
    if loop == "bare":  # same parameter order; HF's differs and permutes q/k rows, so the loss must do
        for g, ref in zip(grads, ref_grads):
            assert ref.norm() > 1e-3  # a gradient that vanished would agree with anything
            assert torch.allclose(g, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())
    else:
        norms = sorted(g.norm().item() for g in grads)
        assert norms == pytest.approx(sorted(g.norm().item() for g in ref_grads), rel=1e-4)


def test_plain_loss_is_plain_cross_entropy():
    model = build_loop_model("bare", ARGS, device=torch.device("cpu"), seed=0)
    tokens = torch.randint(0, ARGS.vocab_size, (2, 9), generator=torch.Generator().manual_seed(1))
    expected = F.cross_entropy(model(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten())
    assert loop_loss(model, tokens, dtype=torch.float32).item() == pytest.approx(expected.item(), rel=1e-7)


def test_a_failing_child_raises_with_its_output(tmp_path):
    ok = [sys.executable, "-c", "print('fine')"]
    bad = [sys.executable, "-c", "import sys; print('boom: bad input'); sys.exit(3)"]
    run_children([ok], logs=[tmp_path / "ok.log"])
    assert (tmp_path / "ok.log").read_text().strip() == "fine"
    with pytest.raises(RuntimeError, match=r"exit 3(.|\n)*boom: bad input"):
        run_children([ok, bad], logs=[tmp_path / "a.log", tmp_path / "b.log"])


def test_the_benchmark_models_compose_at_their_stated_sizes():
    """``make bench``'s model overrides stay valid config (the GPU one cannot run here, so check it composes)."""
    from bench.common import compose_config
    from bench.train_speed import CPU_MODEL, GPU_MODEL
    from model.flops import param_counts

    cpu, gpu = compose_config(CPU_MODEL), compose_config(GPU_MODEL)
    assert 50e6 <= param_counts(cpu.model).total <= 150e6 and cpu.data.seq_len == 512
    assert 0.9e9 <= param_counts(gpu.model).total <= 1.3e9 and gpu.model.vocab_size == gpu.data.tokenizer.vocab_size
