"""Bytes kept for backward per transformer layer, counted, equal the derived formula for each policy and TP.

One layer's bytes are counted as the difference between a 2-layer and a 1-layer model built by the
trainer's own path (``build_model`` -> ``parallelize_llama``), so the embedding, the head and anything
else outside the layers cancels; parameters and buffers (the RoPE table) are not activations.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from model.config import ModelArgs
from model.ops.memory import saved_bytes
from tests.distributed import run_workers
from trainer.activation_memory import layer_activation_bytes
from trainer.config import ParallelConfig
from trainer.parallel_dims import ParallelDims
from trainer.train import build_model

# GQA (kv width half the model width) and a SwiGLU hidden size that is not a simple multiple of dim, so
# that a formula which confused h, kv and F could not match by accident.
ARGS = ModelArgs(dim=64, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=256, max_seq_len=64, multiple_of=16)
BATCH, SEQ = 2, 64
POLICIES = ("none", "selective", "full")


def counted_layer_bytes(policy: str, *, tp: int, world_size: int) -> int:
    totals = []
    for n_layers in (1, 2):
        parallel = ParallelConfig(tp=tp, activation_checkpoint=policy)
        dims = ParallelDims.from_config(parallel, world_size=world_size)
        model = build_model(dataclasses.replace(ARGS, n_layers=n_layers), device=torch.device("cpu"), seed=0,
                            meshes=dims.build_meshes(device_type="cpu"), dims=dims, parallel=parallel)  # fmt: skip
        tokens = torch.randint(0, ARGS.vocab_size, (BATCH, SEQ), generator=torch.Generator().manual_seed(0))
        counted = saved_bytes(lambda: model(tokens), params=[*model.parameters(), *model.buffers()])
        totals.append(counted.activations)
    return totals[1] - totals[0]


@pytest.mark.parametrize("policy", POLICIES)
def test_one_process_layer_bytes_equal_the_formula(policy):
    expected = layer_activation_bytes(ARGS, batch=BATCH, seq_len=SEQ, tp=1, policy=policy)
    assert counted_layer_bytes(policy, tp=1, world_size=1) == expected


def _tp_worker(rank: int, world_size: int) -> None:
    for policy in POLICIES:
        expected = layer_activation_bytes(ARGS, batch=BATCH, seq_len=SEQ, tp=world_size, policy=policy)
        counted = counted_layer_bytes(policy, tp=world_size, world_size=world_size)
        assert counted == expected, (policy, counted, expected)


def test_tensor_and_sequence_parallel_layer_bytes_equal_the_formula():
    run_workers(_tp_worker, world_size=2)


def test_the_policies_order_and_tp_splits_every_term():
    none, selective, full = (layer_activation_bytes(ARGS, batch=BATCH, seq_len=SEQ, tp=1, policy=p) for p in POLICIES)
    assert full < selective < none
    for policy in POLICIES:  # sequence parallelism: every saved tensor is split, nothing is replicated
        one = layer_activation_bytes(ARGS, batch=BATCH, seq_len=SEQ, tp=1, policy=policy)
        assert layer_activation_bytes(ARGS, batch=BATCH, seq_len=SEQ, tp=2, policy=policy) * 2 == one
