"""Deferred weight gradients (model/ops/deferred.py), the split zero-bubble pipeline schedules use: input
gradients at once, weight gradients later, bitwise equal to one ordinary backward."""

from __future__ import annotations

import contextlib

import pytest
import torch

from compat import checkpoint_wrapper
from model.config import ModelArgs
from model.llama import Transformer
from model.ops import Keep
from model.ops.deferred import WeightGradStore, deferring

# The weights whose gradient the hand-written Functions compute: the blocks' projections and SwiGLU.
DEFERRED = ("attention.wq", "attention.wk", "attention.wv", "attention.wo", "feed_forward.w1", "feed_forward.w2",
            "feed_forward.w3")  # fmt: skip


def _model(keep: Keep, *, checkpointed: bool = False) -> Transformer:
    torch.manual_seed(0)
    model = Transformer(ModelArgs(n_layers=2), keep=keep)
    model.init_weights(seed=0)
    if checkpointed:  # block checkpoints, as parallel.ac.mode=full wraps them
        for name, block in model.layers.items():
            model.layers[name] = checkpoint_wrapper(block, preserve_rng_state=False)
    return model


def _grads(model: Transformer, *, micro_batches: int, store: WeightGradStore | None, dtype: torch.dtype) -> dict:
    """Forward and backward of ``micro_batches`` micro-batches; with ``store``, every micro-batch's weight
    gradients are queued by its backward and run after all of them (as a pipeline's cool-down would)."""
    model.zero_grad(set_to_none=True)
    generator = torch.Generator().manual_seed(1)
    runs, before = [], None
    for _ in range(micro_batches):
        tokens = torch.randint(0, model.args.vocab_size, (2, 16), generator=generator)
        amp = torch.autocast("cpu", dtype=dtype) if dtype != torch.float32 else contextlib.nullcontext()
        with amp, deferring(store):
            logits = model(tokens[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), tokens[:, 1:].flatten(), reduction="sum")
        loss.backward()
        # Nothing of the graph survives its backward (as in a pipeline, which drops each micro-batch's
        # outputs): then only the deferral itself can keep the parameters' gradient accumulators reachable.
        del logits, loss
        if store is not None:
            runs.append(store.flush())
    if store is not None:
        before = {n: p.grad for n, p in model.named_parameters()}
        for run in runs:
            run()
    return {n: p.grad.clone() for n, p in model.named_parameters()}, before


@pytest.mark.parametrize("keep,checkpointed", [(Keep.matmul_outputs, False), (Keep.all, False),
                                               (Keep.ffn_input, False), (Keep.matmul_outputs, True)])  # fmt: skip
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_deferred_weight_grads_are_bitwise_those_of_one_backward(keep, checkpointed, dtype):
    # Checkpointed blocks: backward unpacks recomputed, detached copies of the weights, and each micro-batch's
    # graph is freed before its queued closures run; the gradients must still reach the parameters.
    want, _ = _grads(_model(keep, checkpointed=checkpointed), micro_batches=3, store=None, dtype=dtype)
    got, before = _grads(_model(keep, checkpointed=checkpointed), micro_batches=3, store=WeightGradStore(), dtype=dtype)
    for name, grad in want.items():
        deferred = name.endswith(tuple(f"{d}.weight" for d in DEFERRED))
        # Deferred means absent until the queued closures ran; the rest came with the input gradients.
        assert (before[name] is None) == deferred, name
        assert grad.abs().max() > 0, name  # a test that cannot pass on zero gradients
        assert torch.equal(got[name], grad), (name, (got[name] - grad).abs().max())


def test_outside_deferring_nothing_is_queued():
    model, store = _model(Keep.matmul_outputs), WeightGradStore()
    with deferring(store):
        pass
    model(torch.zeros(1, 4, dtype=torch.long)).sum().backward()
    assert len(store) == 0 and model.layers["0"].attention.wq.weight.grad is not None
