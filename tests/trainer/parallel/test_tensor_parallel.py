"""Tensor + sequence parallel layers (trainer/parallel/tensor_parallel.py) against the unsharded model, on gloo."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.distributed.device_mesh import init_device_mesh

from model.config import ModelArgs
from model.llama import Transformer
from tests.distributed import run_workers
from trainer.parallel.activation_checkpointing import policy
from trainer.parallel.config import ACConfig, ACMode
from trainer.parallel.tensor_parallel import apply_tensor_parallel

# GQA with one kv head per rank at tp=2, and a hidden size that is not a multiple of the width.
ARGS = ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=64, max_seq_len=16, multiple_of=8)


def _tp_model_worker(rank: int, world_size: int, mode: ACMode) -> None:
    """The whole TP model in fp64 against the unsharded one: logits, and every parameter's gradient."""
    torch.manual_seed(0)
    ac = policy(ACConfig(mode=mode))
    reference = Transformer(ARGS, keep=ac.keep, keep_final_norm=ac.keep_final_norm)
    reference.init_weights()
    reference.double()
    sharded = copy.deepcopy(reference)  # the same weights on every rank (same seed)
    apply_tensor_parallel(sharded, tp_mesh=init_device_mesh("cpu", (world_size,)))
    # The TP forms are born with what the plain modules were built to keep: nothing has to set it later.
    kept = {type(m).__name__: m.keep for m in sharded.modules() if hasattr(m, "keep")}
    assert set(kept) == {"SequenceParallelRMSNorm", "TensorParallelAttention", "TensorParallelFeedForward"}
    assert kept["TensorParallelFeedForward"] == kept["TensorParallelAttention"] == ac.keep
    tokens = torch.randint(0, ARGS.vocab_size, (2, 8))
    probe = torch.randn(2, 8, ARGS.vocab_size, dtype=torch.float64)  # a loss that weighs every logit

    logits_ref = reference(tokens)
    logits_tp = sharded(tokens).full_tensor()
    # fp64: only the summation order differs (partial sums over ranks), far below 1e-12 relative.
    torch.testing.assert_close(logits_tp, logits_ref, rtol=1e-12, atol=1e-12)
    (logits_ref * probe).sum().backward()
    (logits_tp * probe).sum().backward()
    grads_ref = {name: p.grad for name, p in reference.named_parameters()}
    for name, param in sharded.named_parameters():
        assert grads_ref[name].abs().max() > 1e-2, name  # a real gradient, not one that passes by being ~0
        torch.testing.assert_close(param.grad.full_tensor(), grads_ref[name], rtol=1e-10, atol=1e-12, msg=name)


@pytest.mark.parametrize("mode", [ACMode.selective, ACMode.none, ACMode.selective_ffn], ids=str)
def test_tp_model_matches_unsharded_model(mode):
    run_workers(_tp_model_worker, world_size=2, args=(mode,))
