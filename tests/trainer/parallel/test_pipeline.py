"""Pipeline parallelism (``parallel.pp``): the stage split, and training under pp = 2 on gloo (1F1B and GPipe)
against one process: the same losses and weights, in fp32 and bf16, and checkpoints that resume across pp
and non-pp layouts with the uninterrupted losses."""

from __future__ import annotations

import pytest
import torch

from launch.harness import LAYOUTS, final_weights, losses, run_layout
from model.config import ModelArgs
from tests.conftest import PINNED_SCHEDULE, REFERENCE_STEPS
from trainer.parallel.config import ParallelConfig
from trainer.parallel.dims import ParallelDims
from trainer.parallel.pipeline import stage_layers

CUT = 4
# As in the loss-compare test: the same arithmetic in another grouping (micro-batches, stages): fp32 rounding.
LOSS_RTOL, WEIGHT_RTOL = 1e-5, 1e-4


def test_blocks_split_into_balanced_consecutive_stages():
    assert stage_layers(8, 2) == [range(0, 4), range(4, 8)]
    assert stage_layers(10, 4) == [range(0, 3), range(3, 6), range(6, 8), range(8, 10)]  # the first stages one more
    assert stage_layers(2, 2) == [range(0, 1), range(1, 2)]


def test_pipeline_layouts_are_checked():
    assert ParallelDims.from_config(ParallelConfig(pp=2), world_size=4).dp == 2  # pp x FSDP
    assert ParallelDims.from_config(ParallelConfig(pp=2, tp=2), world_size=4).dp == 1  # pp x TP
    with pytest.raises(ValueError, match="cannot fill parallel.pp=4 stages"):
        ParallelDims.for_run(ParallelConfig(pp=4), world_size=4, model=ModelArgs(n_layers=2), seq_len=64)
    with pytest.raises(ValueError, match="parallel.pp=2 x parallel.dp_replicate=1 x parallel.dp_shard=1 x parallel.tp=1 = 2"):
        ParallelDims(dp_replicate=1, dp_shard=1, tp=1, world_size=3, pp=2)


def _close(got: list[float], want: list[float]) -> None:
    assert len(got) == len(want)
    for a, b in zip(got, want):
        assert abs(a - b) <= LOSS_RTOL * b, (got, want)


@pytest.mark.parametrize("layout", ["pp2", "pp2_tp2",  # the default suite (pp2 x FSDP2 also saves in the resume test)
                                    pytest.param("pp2_fsdp2", marks=pytest.mark.slow),
                                    pytest.param("pp2_gpipe_m4", marks=pytest.mark.slow),
                                    pytest.param("pp2_hsdp2", marks=pytest.mark.slow)])
def test_pipelined_training_equals_one_process(layout, reference_run):
    """pp = 2 with 1F1B over 2 micro-batches, GPipe over 4, and 1F1B with each stage sharded by FSDP over 2
    ranks (4 processes), replicated (HSDP), or split by TP 2 with sequence parallelism: ten steps, the
    single-process losses and final weights (gathered from every stage) to fp32 rounding."""
    reference = reference_run("single")
    run = run_layout(LAYOUTS[layout], workdir=reference_run.workdir, steps=REFERENCE_STEPS, extra=PINNED_SCHEDULE)
    _close(losses(run), losses(reference))
    ref_weights, weights = final_weights(reference), final_weights(run)
    assert set(weights) == set(ref_weights)
    for name, value in ref_weights.items():
        assert ((weights[name] - value).norm() / value.norm()).item() <= WEIGHT_RTOL, name


def test_pipelined_bf16_tracks_fp32(reference_run):
    """bf16 under pp = 2 (autocast) against the fp32 single process: test_bf16.py's loss bound."""
    run = run_layout(LAYOUTS["pp2"], workdir=reference_run.workdir, steps=REFERENCE_STEPS, run_name="pp2_bf16",
                     extra=(*PINNED_SCHEDULE, "trainer.precision=bf16"))  # fmt: skip
    got, want = losses(run), losses(reference_run("single"))
    assert got != want and all(abs(a - b) <= 3e-3 * b for a, b in zip(got, want)), (got, want)


def test_checkpoints_resume_across_pipelined_and_unpipelined_layouts(reference_run):
    """Saved by pp = 2 at step 4, resumed by one process; saved by one process, resumed by pp = 2; saved by
    pp 2 x FSDP 2, resumed by TP 2: the uninterrupted single-process losses from step 5 on (DCP reshards the
    stages' names like any layout)."""
    workdir, reference = reference_run.workdir, losses(reference_run("single"))
    for saver, resumer in (("pp2", "single"), ("single", "pp2"), ("pp2_fsdp2", "tp2")):
        saved = run_layout(LAYOUTS[saver], workdir=workdir, steps=CUT, run_name=f"pp_save_{saver}",
                           extra=PINNED_SCHEDULE) / "checkpoints" / f"step_{CUT:08d}"  # fmt: skip
        resumed = run_layout(LAYOUTS[resumer], workdir=workdir, steps=REFERENCE_STEPS, run_name=f"pp_resume_{resumer}",
                             extra=(*PINNED_SCHEDULE, f"checkpoint.resume={saved}"))  # fmt: skip
        _close(losses(resumed), reference[CUT:])
