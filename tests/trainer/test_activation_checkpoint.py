"""Activation checkpointing policies change what is kept and recomputed, never the arithmetic."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from conf.schema import to_config
from launch.loss_compare import LAYOUTS, run_layout
from model.config import ModelArgs
from model.ops.memory import saved_bytes
from tests.conftest import PINNED_SCHEDULE, REFERENCE_STEPS, compose_config
from trainer.config import ParallelConfig
from trainer.parallel_dims import ParallelDims
from trainer.train import build_model, train

MODES = ("none", "selective", "full", "every_k")


def test_policies_give_bitwise_identical_losses(tiny_overrides, tmp_path):
    """Every policy runs the same hand-written backward; they differ only in what is kept or recomputed."""
    results = {}
    for mode in MODES:
        cfg = to_config(compose_config([*tiny_overrides, "trainer.max_steps=10", "optim.warmup_steps=2",
                                        "trainer.eval_every=0", "logging.wandb_mode=disabled", "model.n_layers=4",
                                        f"parallel.activation_checkpoint={mode}", "parallel.ac_every_k=2"]))  # fmt: skip
        results[mode] = train(cfg, run_dir=tmp_path / mode).losses
    assert len(results["none"]) == 10 and results["none"][0] != results["none"][-1]
    for mode in MODES[1:]:
        assert results[mode] == results["none"], mode


def activation_bytes(mode: str) -> int:
    """Bytes autograd keeps for backward after one forward + loss of a 4-layer model under ``mode``."""
    args = ModelArgs(dim=64, n_layers=4, n_heads=4, vocab_size=256, max_seq_len=64)
    parallel = ParallelConfig(activation_checkpoint=mode, ac_every_k=2)
    model = build_model(args, device=torch.device("cpu"), seed=0, dims=ParallelDims.from_config(parallel, world_size=1),
                        parallel=parallel)  # fmt: skip
    tokens = torch.randint(0, 256, (2, 64), generator=torch.Generator().manual_seed(0))

    def step():
        return F.cross_entropy(model(tokens).flatten(0, 1), tokens.flatten())

    return saved_bytes(step, params=[*model.parameters(), *model.buffers()]).activations


def test_recomputation_keeps_fewer_activations():
    """Whole-model ordering; the exact per-layer bytes are in test_activation_memory.py."""
    none, selective, full, every_2 = (activation_bytes(m) for m in MODES)
    assert full < every_2 < none
    assert full < selective < none


def test_fsdp_with_full_recomputation_matches_fsdp_without(reference_run):
    run = run_layout(LAYOUTS["fsdp2"], workdir=reference_run.workdir, steps=REFERENCE_STEPS, run_name="fsdp2_ac_full",
                     extra=(*PINNED_SCHEDULE, "parallel.activation_checkpoint=full"))  # fmt: skip
    reference = reference_run("fsdp2")
    losses = [json.loads((d / "summary.json").read_text())["losses"] for d in (run, reference)]
    assert losses[0] == losses[1]
    ours = torch.load(run / "final_model.pt", weights_only=True)
    for key, value in torch.load(reference / "final_model.pt", weights_only=True).items():
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
                                        f"parallel.activation_checkpoint={mode}", f"parallel.compile={compiled}"]))  # fmt: skip
        losses[compiled] = train(cfg, run_dir=tmp_path / str(compiled)).losses
    assert losses[True] == pytest.approx(losses[False], rel=1e-5)
    assert losses[True][-1] < losses[True][0]
