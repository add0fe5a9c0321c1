"""Activation-checkpointing policies (trainer/parallel/activation_checkpointing.py): they change what is kept and
recomputed, never the arithmetic; and each one's per-layer bytes, counted, equal its formula, with and
without tensor parallelism.

Per-layer bytes are counted as the difference between a 2-layer and a 1-layer model built by the trainer's
own path (``build_model`` -> ``parallelize_llama``), so the embedding, the head and anything else outside
the layers cancels; parameters and buffers (the RoPE table) are not activations.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from conf.schema import to_config
from launch.harness import LAYOUTS, final_weights, losses, run_layout
from launch.train import train
from model.config import ModelArgs
from model.ops.memory import saved_bytes
from tests.conftest import PINNED_SCHEDULE, REFERENCE_STEPS, compose_config
from tests.distributed import run_workers
from trainer.parallel.activation_checkpointing import POLICIES, EveryK, policy
from trainer.parallel.build import build_model
from trainer.parallel.config import ACConfig, ACMode, ParallelConfig
from trainer.parallel.dims import ParallelDims

MODES = tuple(mode.value for mode in ACMode)
# GQA (kv width half the model width) and a SwiGLU hidden size that is not a simple multiple of dim, so
# that a formula which confused h, kv and F could not match by accident.
ARGS = ModelArgs(dim=64, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=256, max_seq_len=64, multiple_of=16)
BATCH, SEQ = 2, 64


def test_every_mode_has_a_policy():
    assert set(POLICIES) == set(ACMode)
    assert policy(ACConfig(mode=ACMode.every_k, every_k=3)) == EveryK(k=3)
    assert [policy(ACConfig(mode=ACMode.full)).recomputes_block(i) for i in range(3)] == [True, True, True]
    assert [policy(ACConfig(mode=ACMode.every_k, every_k=2)).recomputes_block(i) for i in range(3)] == [True, False, True]


@pytest.mark.parametrize("mode", MODES)
def test_the_policy_decides_what_every_module_keeps_when_the_model_is_built(mode):
    """One owner, one decision: the modules are born with the policy's ``Keep`` (nothing sets it later), the
    final norm with ``keep_final_norm``, and exactly the blocks the policy recomputes are wrapped."""
    ac = policy(ACConfig(mode=mode, every_k=2))
    args = dataclasses.replace(ARGS, n_layers=4)
    model = build_model(args, device=torch.device("cpu"), seed=0, parallel=ParallelConfig(ac=ACConfig(mode=mode)))
    for name, block in model.layers.items():
        wrapped = hasattr(block, "_checkpoint_wrapped_module")
        assert wrapped == ac.recomputes_block(int(name)), (mode, name)
        assert {m.keep for m in block.modules() if hasattr(m, "keep")} == {ac.keep}
    assert model.norm.keep == ac.keep_final_norm


def test_policies_give_bitwise_identical_losses(tiny_overrides, tmp_path):
    """Every policy runs the same hand-written backward; they differ only in what is kept or recomputed."""
    results = {}
    for mode in MODES:
        cfg = to_config(compose_config([*tiny_overrides, "trainer.max_steps=10", "optim.warmup_steps=2",
                                        "trainer.eval_every=0", "logging.wandb_mode=disabled", "model.n_layers=4",
                                        f"parallel.ac.mode={mode}", "parallel.ac.every_k=2"]))  # fmt: skip
        results[mode] = train(cfg, run_dir=tmp_path / mode).losses
    assert len(results["none"]) == 10 and results["none"][0] != results["none"][-1]
    for mode in MODES[1:]:
        assert results[mode] == results["none"], mode


def activation_bytes(mode: str) -> int:
    """Bytes autograd keeps for backward after one forward + loss of a 4-layer model under ``mode``."""
    args = ModelArgs(dim=64, n_layers=4, n_heads=4, vocab_size=256, max_seq_len=64)
    parallel = ParallelConfig(ac=ACConfig(mode=mode, every_k=2))
    model = build_model(args, device=torch.device("cpu"), seed=0, parallel=parallel)
    tokens = torch.randint(0, 256, (2, 64), generator=torch.Generator().manual_seed(0))

    def step():
        return F.cross_entropy(model(tokens).flatten(0, 1), tokens.flatten())

    return saved_bytes(step, params=[*model.parameters(), *model.buffers()]).activations


def test_recomputation_keeps_fewer_activations():
    """Whole-model ordering; the exact per-layer bytes are checked below."""
    kept = {mode: activation_bytes(mode) for mode in MODES}
    assert kept["full"] < kept["every_k"] < kept["none"]
    assert kept["full"] < kept["selective_ffn"] < kept["selective"] < kept["none"]


def test_fsdp_with_full_recomputation_matches_fsdp_without(reference_run):
    run = run_layout(LAYOUTS["fsdp2"], workdir=reference_run.workdir, steps=REFERENCE_STEPS, run_name="fsdp2_ac_full",
                     extra=(*PINNED_SCHEDULE, "parallel.ac.mode=full"))  # fmt: skip
    reference = reference_run("fsdp2")
    assert losses(run) == losses(reference)
    ours = final_weights(run)
    for key, value in final_weights(reference).items():
        assert torch.equal(ours[key], value), key  # and parameter names are unchanged by the wrapper


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["selective", "full"])
def test_compiled_blocks_train_like_eager(tiny_overrides, tmp_path, mode):
    """torch.compile traces the hand-written Functions (and the checkpoint wrapper) with their backward.

    Inductor fuses element-wise work, so the sums may round differently: compared within 1e-5, the
    loss-compare tolerance, not bitwise. ~30 s of compilation per run, hence slow.
    """
    losses = {}
    for compiled in (False, True):
        cfg = to_config(compose_config([*tiny_overrides, "trainer.max_steps=4", "optim.warmup_steps=2",
                                        "trainer.eval_every=0", "logging.wandb_mode=disabled",
                                        f"parallel.ac.mode={mode}", f"parallel.compile={compiled}"]))  # fmt: skip
        losses[compiled] = train(cfg, run_dir=tmp_path / str(compiled)).losses
    assert losses[True] == pytest.approx(losses[False], rel=1e-5)
    assert losses[True][-1] < losses[True][0]


LAYER_MODES = ("none", "selective", "selective_ffn", "full")  # every_k mixes them: layer by layer, checked in test_every_k_mixes


def counted_layer_bytes(mode: str, *, tp: int, world_size: int) -> int:
    totals = []
    for n_layers in (1, 2):
        parallel = ParallelConfig(tp=tp, ac=ACConfig(mode=mode))
        dims = ParallelDims.from_config(parallel, world_size=world_size).with_meshes(device_type="cpu")
        model = build_model(dataclasses.replace(ARGS, n_layers=n_layers), device=torch.device("cpu"), seed=0,
                            dims=dims, parallel=parallel)  # fmt: skip
        tokens = torch.randint(0, ARGS.vocab_size, (BATCH, SEQ), generator=torch.Generator().manual_seed(0))
        counted = saved_bytes(lambda: model(tokens), params=[*model.parameters(), *model.buffers()])
        totals.append(counted.activations)
    return totals[1] - totals[0]


def formula(mode: str, *, tp: int, layer: int = 0) -> int:
    return policy(ACConfig(mode=mode)).layer_bytes(ARGS, layer=layer, batch=BATCH, seq_len=SEQ, tp=tp)


@pytest.mark.parametrize("mode", LAYER_MODES)
def test_one_process_layer_bytes_equal_the_formula(mode):
    assert counted_layer_bytes(mode, tp=1, world_size=1) == formula(mode, tp=1)


def _tp_worker(rank: int, world_size: int) -> None:
    for mode in LAYER_MODES:
        expected = formula(mode, tp=world_size)
        counted = counted_layer_bytes(mode, tp=world_size, world_size=world_size)
        assert counted == expected, (mode, counted, expected)


def test_tensor_and_sequence_parallel_layer_bytes_equal_the_formula():
    run_workers(_tp_worker, world_size=2)


def test_the_policies_order_and_tp_splits_every_term():
    none, selective, selective_ffn, full = (formula(mode, tp=1) for mode in LAYER_MODES)
    assert full < selective_ffn < selective < none
    for mode in LAYER_MODES:  # sequence parallelism: every saved tensor is split, nothing is replicated
        assert formula(mode, tp=2) * 2 == formula(mode, tp=1)


def test_every_k_mixes_full_and_none_layer_by_layer():
    every_2 = policy(ACConfig(mode=ACMode.every_k, every_k=2))
    layers = [every_2.layer_bytes(ARGS, layer=i, batch=BATCH, seq_len=SEQ, tp=1) for i in range(4)]
    assert layers == [formula("full", tp=1), formula("none", tp=1)] * 2
    deep = dataclasses.replace(ARGS, n_layers=4)
    assert every_2.model_bytes(deep, batch=BATCH, seq_len=SEQ, tp=1) == sum(layers)
