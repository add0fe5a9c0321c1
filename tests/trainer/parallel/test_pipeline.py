"""Pipeline parallelism (``parallel.pp``): the stage split, and training under pp = 2 on gloo (1F1B, GPipe,
interleaved 1F1B, the zero-bubble ZB1P and ZBV) against one process: the same losses and weights, in fp32
and bf16, and checkpoints that resume across pp and non-pp layouts with the uninterrupted losses."""

from __future__ import annotations

import pytest
import torch

from launch.harness import LAYOUTS, final_weights, losses, run_layout
from model.config import ModelArgs
from model.kv_cache import KVCache
from tests.conftest import PINNED_SCHEDULE, REFERENCE_STEPS
from tests.distributed import run_workers
from trainer.parallel.build import build_stages
from trainer.parallel.config import ParallelConfig, PPSchedule
from trainer.parallel.dims import ParallelDims
from trainer.parallel.pipeline import Pipeline, local_stages, stage_layers
from trainer.run.step import cross_entropy_sum

def _decoding_worker(rank: int, world_size: int, schedule: str) -> None:
    """Full-sequence logits through the stages, then the same positions decoded with each rank's cache."""
    args = ModelArgs(n_layers=4, vocab_size=128, max_seq_len=32)
    cfg = ParallelConfig(pp=2, pp_schedule=schedule)
    dims = ParallelDims.from_config(cfg, world_size=world_size).with_meshes(device_type="cpu")
    model, stages = build_stages(args, device=torch.device("cpu"), seed=0, dims=dims, parallel=cfg)
    pipeline = Pipeline(stages, dims, cfg=cfg, device=torch.device("cpu"), loss=cross_entropy_sum)
    tokens = torch.randint(0, args.vocab_size, (3, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = pipeline.logits(tokens, vocab_size=args.vocab_size)
        mine = [int(name) for name in model.layers]
        cache = KVCache(args, batch=3, max_len=12, layers=mine)
        steps = [pipeline.logits(tokens[:, :5], vocab_size=args.vocab_size, cache=cache)]  # the prefill
        steps += [pipeline.logits(tokens[:, t:t + 1], vocab_size=args.vocab_size, cache=cache) for t in range(5, 12)]
    assert cache.pos == 12 and sorted(cache.keys) == mine != list(range(4)), (cache.pos, mine)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-5, atol=1e-5)
    assert full.abs().max() > 1e-2


@pytest.mark.parametrize("schedule", ["1f1b", "interleaved_1f1b", "zbv"])
def test_decoding_with_each_stage_caching_its_own_layers_gives_the_full_logits(schedule):
    """Evaluation's generation under pp: each rank's key/value cache holds only its blocks' layers and moves
    on once per forward (after the rank's later stage: looped, or the V's second); prefill and one token at a time
    give the full forward's logits on every rank."""
    run_workers(_decoding_worker, world_size=2, args=(schedule,))


CUT = 4
# As in the loss-compare test: the same arithmetic in another grouping (micro-batches, stages): fp32 rounding.
LOSS_RTOL, WEIGHT_RTOL = 1e-5, 1e-4


def test_blocks_split_into_balanced_consecutive_stages():
    assert stage_layers(8, 2) == [range(0, 4), range(4, 8)]
    assert stage_layers(10, 4) == [range(0, 3), range(3, 6), range(6, 8), range(8, 10)]  # the first stages one more
    assert stage_layers(2, 2) == [range(0, 1), range(1, 2)]


def test_each_rank_holds_its_stages_looped_or_in_a_v():
    assert local_stages(rank=1, pp=2, virtual=1, schedule=PPSchedule.one_f_one_b) == [1]
    assert local_stages(rank=1, pp=4, virtual=2, schedule=PPSchedule.interleaved_1f1b) == [1, 5]
    assert local_stages(rank=0, pp=4, virtual=2, schedule=PPSchedule.zbv) == [0, 7]  # rank 0: first and last
    assert local_stages(rank=3, pp=4, virtual=2, schedule=PPSchedule.zbv) == [3, 4]
    assert ParallelConfig(pp_schedule="interleaved_1f1b").pp_stages_per_rank == 2  # the schedule's own
    assert ParallelConfig(pp_schedule="zero_bubble").pp_stages_per_rank == 1
    assert ParallelConfig(pp_schedule="zero_bubble", pp_virtual_stages=3).pp_stages_per_rank == 3


def test_pipeline_layouts_are_checked():
    assert ParallelDims.from_config(ParallelConfig(pp=2), world_size=4).dp == 2  # pp x FSDP
    assert ParallelDims.from_config(ParallelConfig(pp=2, tp=2), world_size=4).dp == 1  # pp x TP
    with pytest.raises(ValueError, match="cannot fill parallel.pp=4 x 1 stages per rank"):
        ParallelDims.for_run(ParallelConfig(pp=4), world_size=4, model=ModelArgs(n_layers=2), seq_len=64)
    with pytest.raises(ValueError, match="parallel.pp=2 x parallel.dp_replicate=1 x parallel.dp_shard=1 x parallel.tp=1 = 2"):
        ParallelDims(dp_replicate=1, dp_shard=1, tp=1, world_size=3, pp=2)
    with pytest.raises(ValueError, match="parallel.pp_schedule=1f1b runs one stage per rank"):
        ParallelConfig(pp_virtual_stages=2)
    with pytest.raises(ValueError, match="zbv holds exactly 2 stages per rank"):
        ParallelConfig(pp_schedule="zbv", pp_virtual_stages=3)
    with pytest.raises(ValueError, match="cannot fill parallel.pp=2 x 2 stages per rank"):
        ParallelDims.for_run(ParallelConfig(pp=2, pp_schedule="interleaved_1f1b"), world_size=2, model=ModelArgs(n_layers=3),
                             seq_len=64)  # fmt: skip


def _close(got: list[float], want: list[float]) -> None:
    assert len(got) == len(want)
    for a, b in zip(got, want):
        assert abs(a - b) <= LOSS_RTOL * b, (got, want)


@pytest.mark.parametrize("layout", ["pp2", "pp2_tp2", "pp2_zb", "pp2_interleaved",  # the default suite (pp2 x FSDP2
                                    pytest.param("pp2_fsdp2", marks=pytest.mark.slow),  # also saves in the resume test)
                                    pytest.param("pp2_gpipe_m4", marks=pytest.mark.slow),
                                    pytest.param("pp2_hsdp2", marks=pytest.mark.slow),
                                    pytest.param("pp2_zb_fsdp2", marks=pytest.mark.slow),
                                    pytest.param("pp2_zb_tp2", marks=pytest.mark.slow),
                                    pytest.param("pp2_zb_compiled", marks=pytest.mark.slow),
                                    pytest.param("pp2_zbv", marks=pytest.mark.slow),
                                    pytest.param("pp2_interleaved_fsdp2", marks=pytest.mark.slow),
                                    pytest.param("pp2_interleaved_tp2", marks=pytest.mark.slow),
                                    pytest.param("pp2_zbv_hsdp2", marks=pytest.mark.slow)])
def test_pipelined_training_equals_one_process(layout, reference_run):
    """pp = 2 with 1F1B over 2 micro-batches, GPipe over 4, and 1F1B with each stage sharded by FSDP over 2
    ranks (4 processes), replicated (HSDP), or split by TP 2 with sequence parallelism; the zero-bubble ZB1P
    (weight gradients deferred, model/ops/deferred.py) alone, compiled, with FSDP 2 and with TP 2; two stages per rank
    (interleaved 1F1B, ZBV) on the four-block model, alone, with FSDP 2 / HSDP 2 (each stage's view its own
    FSDP root) and with TP 2: ten steps, the single-process losses and final weights
    (gathered from every stage) to fp32 rounding."""
    reference = reference_run(LAYOUTS[layout].reference)
    run = run_layout(LAYOUTS[layout], workdir=reference_run.workdir, steps=REFERENCE_STEPS, extra=PINNED_SCHEDULE)
    _close(losses(run), losses(reference))
    ref_weights, weights = final_weights(reference), final_weights(run)
    assert set(weights) == set(ref_weights)
    for name, value in ref_weights.items():
        assert ((weights[name] - value).norm() / value.norm()).item() <= WEIGHT_RTOL, name


@pytest.mark.parametrize("layout", ["pp2", pytest.param("pp2_zb", marks=pytest.mark.slow),
                                    pytest.param("pp2_interleaved", marks=pytest.mark.slow)])
def test_pipelined_bf16_tracks_fp32(layout, reference_run):
    """bf16 under pp = 2 (autocast) against the fp32 single process: test_bf16.py's loss bound."""
    run = run_layout(LAYOUTS[layout], workdir=reference_run.workdir, steps=REFERENCE_STEPS, run_name=f"{layout}_bf16",
                     extra=(*PINNED_SCHEDULE, "trainer.precision=bf16"))  # fmt: skip
    got, want = losses(run), losses(reference_run(LAYOUTS[layout].reference))
    assert got != want and all(abs(a - b) <= 3e-3 * b for a, b in zip(got, want)), (got, want)


def test_checkpoints_resume_across_pipelined_and_unpipelined_layouts(reference_run):
    """Saved by pp = 2 at step 4, resumed by one process and by pp = 2 again; saved by one process, resumed by
    pp = 2; saved by pp 2 x FSDP 2, resumed by TP 2: the uninterrupted single-process losses from step 5 on
    (DCP reshards the stages' names like any layout; the optimizer's hyperparameters are keyed per parameter,
    so each stage finds its own, trainer/checkpoint/dcp.py)."""
    _resume_each(reference_run, (("pp2", "single"), ("pp2", "pp2"), ("single", "pp2"), ("pp2_fsdp2", "tp2")))


def _resume_each(reference_run, pairs) -> None:
    """Each (saver, resumer): saved by the one at step ``CUT``, resumed by the other: the saver's reference's
    uninterrupted losses from there on."""
    workdir = reference_run.workdir
    for saver, resumer in pairs:
        reference = losses(reference_run(LAYOUTS[saver].reference))
        saved = run_layout(LAYOUTS[saver], workdir=workdir, steps=CUT, run_name=f"pp_save_{saver}",
                           extra=PINNED_SCHEDULE) / "checkpoints" / f"step_{CUT:08d}"  # fmt: skip
        resumed = run_layout(LAYOUTS[resumer], workdir=workdir, steps=REFERENCE_STEPS,
                             run_name=f"pp_resume_{saver}_to_{resumer}",
                             extra=(*PINNED_SCHEDULE, f"checkpoint.resume={saved}"))  # fmt: skip
        _close(losses(resumed), reference[CUT:])


@pytest.mark.slow
def test_other_schedules_resume_across_layouts(reference_run):
    """Saved under the zero-bubble schedule, resumed by pp 2 x TP 2 (the debug model); saved by interleaved
    1F1B (two stages per rank, views over one model per rank), resumed by one process, and back into ZBV
    (the four-block model); saved by interleaved 1F1B x FSDP 2 (each view an FSDP root), resumed by ZBV x
    HSDP 2: the uninterrupted losses."""
    _resume_each(reference_run, (("pp2_zb", "pp2_tp2"), ("pp2_interleaved", "single_l4"), ("single_l4", "pp2_zbv"),
                                 ("pp2_interleaved_fsdp2", "pp2_zbv_hsdp2")))  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["none", "full", "every_k", "selective_ffn"])
def test_pipelines_compose_with_every_activation_checkpointing_policy(mode, reference_run):
    """1F1B, the zero-bubble schedule and ZBV (two stages per rank: views over checkpointed blocks) under
    the AC policies besides the default selective one: the one-process losses. Under block checkpoints
    (full, every_k) the deferred weight gradients go to the parameters through edges noted at forward, not
    through the recomputed weights backward unpacks."""
    for layout in ("pp2", "pp2_zb", "pp2_zbv"):
        run = run_layout(LAYOUTS[layout], workdir=reference_run.workdir, steps=REFERENCE_STEPS, run_name=f"{layout}_ac_{mode}",
                         extra=(*PINNED_SCHEDULE, f"parallel.ac.mode={mode}"))  # fmt: skip
        _close(losses(run), losses(reference_run(LAYOUTS[layout].reference)))
