"""The planner's pipeline model: each schedule's bubble and activations in flight, the stages the rehearsal
builds, point-to-point traffic, the search over pp, and the published pipelined runs."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch

from model.config import ModelArgs
from model.flops import param_counts
from planner.config import ClusterConfig
from planner.estimate import Workload, estimate_stages
from planner.pipeline import (PipelineSchedule, bubble_fraction, critical_transfers, in_flight, p2p_sends, placed,
                              rank_layers)
from planner.rehearsal import rehearse_stages
from planner.search import candidates, plan_one, search
from trainer.parallel.config import ACConfig, ACMode, ParallelConfig

REPO = Path(__file__).resolve().parents[2]
ONE_F_ONE_B, GPIPE = PipelineSchedule("1f1b"), PipelineSchedule("gpipe")
INTERLEAVED, ZB = PipelineSchedule("interleaved_1f1b", virtual=2), PipelineSchedule("zero_bubble")
ZBV = PipelineSchedule("zbv", virtual=2)
# A model whose weights dominate its memory: short sequences, no vocabulary to speak of, 5 blocks (uneven
# over 2 stages: the first stage takes one more).
SMALL = ModelArgs(dim=128, n_layers=5, n_heads=4, vocab_size=256, multiple_of=32, max_seq_len=64)


def test_bubble_of_each_schedule():
    """p = 4 stages, m = 8 micro-batches: GPipe and 1F1B idle 3 of 11 slots; interleaved with v = 2 halves
    the bubble time (3 of 19); ZB-H1 a third of 1F1B's bubble time (3 of 27); ZB-V none; one stage none."""
    p, m = 4, 8
    assert bubble_fraction(GPIPE, stages=p, microbatches=m) == pytest.approx(3 / 11)
    assert bubble_fraction(ONE_F_ONE_B, stages=p, microbatches=m) == pytest.approx(3 / 11)
    assert bubble_fraction(INTERLEAVED, stages=p, microbatches=m) == pytest.approx(3 / 19)
    assert bubble_fraction(ZB, stages=p, microbatches=m) == pytest.approx(3 / 27)
    assert bubble_fraction(ZBV, stages=p, microbatches=m) == 0.0
    assert bubble_fraction(ONE_F_ONE_B, stages=1, microbatches=1) == 0.0

    def idle_over_ideal(schedule: PipelineSchedule) -> float:  # the papers' measure: bubble time / ideal time
        b = bubble_fraction(schedule, stages=p, microbatches=m)
        return b / (1 - b)

    assert idle_over_ideal(ONE_F_ONE_B) == pytest.approx((p - 1) / m)  # Narayanan et al. 2021, section 2.2.1
    assert idle_over_ideal(INTERLEAVED) == pytest.approx(idle_over_ideal(ONE_F_ONE_B) / 2)  # section 2.2.2, v = 2
    assert idle_over_ideal(ZB) == pytest.approx(idle_over_ideal(ONE_F_ONE_B) / 3)  # Qi et al. 2024, ZB-H1


def test_activations_in_flight_per_schedule():
    """Per stage of p = 4 with m = 8: GPipe holds all 8; 1F1B and ZB-H1 hold p - s (4, 3, 2, 1); interleaved
    (v = 2) holds p (1 + (p - 1) / (p v)) = 5.5 on stage 0 (Korthikanti et al. 2022); ZB-V p on every rank.
    Fewer micro-batches than stages cap them."""
    p, m = 4, 8
    assert [in_flight(GPIPE, stages=p, stage=s, microbatches=m) for s in range(p)] == [8, 8, 8, 8]
    assert [in_flight(ONE_F_ONE_B, stages=p, stage=s, microbatches=m) for s in range(p)] == [4, 3, 2, 1]
    assert [in_flight(ZB, stages=p, stage=s, microbatches=m) for s in range(p)] == [4, 3, 2, 1]
    assert in_flight(INTERLEAVED, stages=p, stage=0, microbatches=m) == pytest.approx(p * (1 + (p - 1) / (p * 2)))
    assert [in_flight(INTERLEAVED, stages=p, stage=s, microbatches=m) for s in range(p)] == [5.5, 4.5, 3.5, 2.5]
    assert [in_flight(ZBV, stages=p, stage=s, microbatches=m) for s in range(p)] == [4, 4, 4, 4]
    assert in_flight(ONE_F_ONE_B, stages=p, stage=0, microbatches=2) == 2
    assert in_flight(ONE_F_ONE_B, stages=1, stage=0, microbatches=1) == 1


def test_interleaved_warm_up_is_torchs():
    """The interleaved count is torch's own warm-up (``_get_warmup_ops``) plus the steady state's forward."""
    schedules = pytest.importorskip("torch.distributed.pipelining.schedules")
    warmup = getattr(schedules, "_get_warmup_ops", None)
    if warmup is None:
        pytest.skip("this torch has no _get_warmup_ops")
    for p, v, m in ((4, 2, 8), (4, 3, 4), (8, 2, 16), (2, 4, 6)):
        per_round = m // max(1, m // p)
        for s in range(p):
            chunks = warmup(s, v, per_round, p, m) + 1
            assert in_flight(PipelineSchedule("interleaved_1f1b", virtual=v), stages=p, stage=s, microbatches=m) \
                == pytest.approx(min(chunks, v * m) / v), (p, v, m, s)  # fmt: skip


def test_unknown_schedule_names_its_key():
    with pytest.raises(ValueError, match="parallel.pp_schedule='looped_bfs' has no planner model"):
        PipelineSchedule("looped_bfs")
    with pytest.raises(ValueError, match="parallel.pp_virtual_stages=2"):
        PipelineSchedule("1f1b", virtual=2)


def test_rehearsal_gives_each_stage_its_own_parameters():
    """pp = 2 over 4 ranks: the first stage built blocks 0-2 and the embedding, the last blocks 3-4, the
    final norm and the head, and together they hold the model's parameters (model/flops.py's count)."""
    first, last = rehearse_stages(SMALL, parallel=ParallelConfig(pp=2), world_size=4, seq_len=64)
    counts = param_counts(SMALL)
    per_block = (counts.total - 2 * SMALL.vocab_size * SMALL.dim - SMALL.dim) // SMALL.n_layers
    assert (first.stage, first.layers, first.embedding, first.head) == (0, (0, 1, 2), True, False)
    assert (last.stage, last.layers, last.embedding, last.head) == (1, (3, 4), False, True)
    assert first.param_count == counts.embedding + 3 * per_block
    assert last.param_count == 2 * per_block + SMALL.dim + SMALL.vocab_size * SMALL.dim
    assert first.param_count + last.param_count == counts.total
    assert first.dims.dp_shard == 2  # each stage is sharded over its own 2 data-parallel ranks


def test_pipeline_splits_replicated_weights_but_not_fsdp_shards():
    """Where data parallelism replicates the weights (dp_shard = 1), pp = 2 halves what a GPU holds (the
    fullest stage: 3 of 5 blocks and the embedding); with FSDP over every rank, pp = 1 already spreads
    them as thinly, so the sharded states stay (to padding) the same."""
    work = Workload(micro_batch=4, grad_accum=1, seq_len=64, compute_dtype=torch.float32)
    cluster = ClusterConfig(gpus=4, gpus_per_node=4)

    def planned(**layout):
        parallel = ParallelConfig(ac=ACConfig(mode=ACMode.full), **layout)
        rehearsals = rehearse_stages(SMALL, parallel=parallel, world_size=4, seq_len=64, compute_dtype=torch.float32)
        return estimate_stages(SMALL, rehearsals=rehearsals, parallel=parallel, work=work, cluster=cluster).memory

    replicated_1, replicated_2 = planned(dp_replicate=4, dp_shard=1), planned(pp=2, dp_replicate=2, dp_shard=1)
    assert replicated_1.parameters == 4 * param_counts(SMALL).total  # a whole fp32 replica per GPU
    assert replicated_2.parameters < 0.65 * replicated_1.parameters  # 3 of 5 blocks + the embedding
    assert replicated_2.total < replicated_1.total
    sharded_1, sharded_2 = planned(), planned(pp=2)
    assert sharded_2.optimizer == pytest.approx(sharded_1.optimizer, rel=0.35)  # stage 0 has 3/5 of the blocks


def test_memory_follows_the_schedule():
    """Same layout, 8 micro-batches of one sequence: GPipe keeps 8 micro-batches' activations on stage 0,
    1F1B 2 (its stage count); only the last stage has logits; the step is the slowest stage's."""
    cluster = ClusterConfig(gpus=2, gpus_per_node=2)
    one = plan_one(SMALL, parallel=ParallelConfig(pp=2, pp_microbatches=8, pp_schedule="1f1b"), cluster=cluster,
                   seq_len=64, global_batch_tokens=8 * 64, micro_batch=8)  # fmt: skip
    gpipe = plan_one(SMALL, parallel=ParallelConfig(pp=2, pp_microbatches=8, pp_schedule="gpipe"), cluster=cluster,
                     seq_len=64, global_batch_tokens=8 * 64, micro_batch=8)  # fmt: skip
    assert (one.estimate.memory_stage, one.estimate.in_flight) == (0, 2)
    assert (gpipe.estimate.memory_stage, gpipe.estimate.in_flight) == (0, 8)
    assert gpipe.estimate.memory.activations == pytest.approx(4 * one.estimate.memory.activations, rel=1e-9)
    assert one.estimate.memory.logits == 0  # stage 0 is the fullest, and it has no head
    assert one.estimate.time.total == gpipe.estimate.time.total  # the same bubble, (p - 1) / (m + p - 1)
    t = one.estimate.time
    b = 1 / 9
    assert t.pp_bubble == pytest.approx((t.compute + t.tp_exposed) * b / (1 - b))


def test_more_microbatches_shrink_the_bubble_and_interleaving_more():
    cluster = ClusterConfig(gpus=4, gpus_per_node=4)
    args = dataclasses.replace(SMALL, n_layers=8)

    def step(m: int, schedule: PipelineSchedule) -> float:
        parallel = ParallelConfig(pp=4, pp_microbatches=m)
        return plan_one(args, parallel=parallel, cluster=cluster, seq_len=64, global_batch_tokens=16 * 64,
                        micro_batch=16, schedule=schedule).estimate.time.pp_bubble  # fmt: skip

    assert step(4, ONE_F_ONE_B) > step(8, ONE_F_ONE_B) > step(16, ONE_F_ONE_B) > 0
    assert step(8, INTERLEAVED) < step(8, ONE_F_ONE_B)


def test_p2p_volume_and_its_time():
    """pp = 2, TP 2: each of the 4 micro-batches of 2 sequences of 64 tokens sends (2, 64, 128) bf16 over its
    sequence shard, 2 x 64 x 128 x 2 / 2 bytes, once per stage (forward from stage 0, backward from 1);
    2 (m + p - 1) transfers wait on the critical path, at the network's bandwidth (one GPU per node)."""
    cluster = ClusterConfig(gpus=4, gpus_per_node=1, inter_node_gbps=10.0)
    c = plan_one(SMALL, parallel=ParallelConfig(pp=2, tp=2, pp_microbatches=4), cluster=cluster, seq_len=64,
                 global_batch_tokens=8 * 64, micro_batch=8)  # fmt: skip
    one = 2 * 64 * 128 * 2 / 2
    assert c.estimate.comm.pp == 4 * one
    assert c.estimate.time.pp_exposed == pytest.approx(2 * (4 + 2 - 1) * one / 10e9)
    assert critical_transfers(INTERLEAVED, stages=4, microbatches=8) == 2 * (16 + 3)
    # Sends per micro-batch: a looped rank sends forward and back for each of its stages, bar the ends;
    # a V's turn (stage p - 1 to p) stays on the last rank, and rank 0 holds both ends.
    assert [p2p_sends(ONE_F_ONE_B, stages=4, stage=s) for s in range(4)] == [1, 2, 2, 1]
    assert [p2p_sends(INTERLEAVED, stages=4, stage=s) for s in range(4)] == [3, 4, 4, 3]
    assert [p2p_sends(ZBV, stages=4, stage=s) for s in range(4)] == [2, 4, 4, 2]


def test_virtual_stages_assembled_as_the_trainer_builds_them():
    """Where the trainer builds several stages per rank (no FSDP: fp32, one rank per stage), its build equals
    the planner's assembly from the one-stage-per-rank rehearsal: the same blocks, and the embedding and the
    head on the ranks that run stage 0 and the last stage (both on rank 0 in a V)."""
    args = dataclasses.replace(SMALL, n_layers=8)
    single = rehearse_stages(args, parallel=ParallelConfig(pp=2), world_size=2, seq_len=64, compute_dtype=torch.float32)
    for schedule in (INTERLEAVED, ZBV):
        built = rehearse_stages(args, parallel=ParallelConfig(pp=2, pp_schedule=schedule.name, pp_virtual_stages=2),
                                world_size=2, seq_len=64, compute_dtype=torch.float32)  # fmt: skip
        assembled = placed(single, args=args, schedule=schedule)
        for b, a in zip(built, assembled):
            fields = ("layers", "embedding", "head", "blocks", "root")
            assert [getattr(b, f) for f in fields] == [getattr(a, f) for f in fields], (schedule, b.stage)
    assert rank_layers(8, ZBV, stages=2, stage=0) == (0, 1, 6, 7)
    assert rank_layers(8, INTERLEAVED, stages=2, stage=0) == (0, 1, 4, 5)


def test_search_takes_pp_where_replicated_weights_do_not_fit():
    """Replicated data parallelism (dp_shard fixed at 1, as Megatron-LM's) on GPUs one per node (so no TP): a
    whole replica does not fit, so every layout that fits is pipelined."""
    args = dataclasses.replace(SMALL, n_layers=8)
    roomy = ClusterConfig(gpus=4, gpus_per_node=1, memory_reserve_gib=0.0, fragmentation=0.0, memory_gib=1.0)
    base, batch = ParallelConfig(dp_shard=1), 16 * 64
    every = list(candidates(args, base=base, cluster=roomy, seq_len=64, global_batch_tokens=batch, fixed=("dp_shard",)))
    smallest = {pp: min(c.estimate.memory.total for c in every if c.parallel.pp == pp) for pp in (1, 2, 4)}
    assert smallest[4] < smallest[2] < smallest[1]  # pp splits what replication holds whole
    tiny = dataclasses.replace(roomy, memory_gib=(smallest[1] + smallest[2]) / 2 / 2**30)
    found = search(args, base=base, cluster=tiny, seq_len=64, global_batch_tokens=batch, fixed=("dp_shard",))
    assert found and {c.parallel.pp for c in found} <= {2, 4} and found[0].parallel.dp_shard == 1


def test_search_takes_pp_where_the_batch_does_not_split_over_data_parallelism():
    """12 sequences per step on 16 GPUs, TP at most 2 (nodes of 2): without a pipeline 8 or 16 data-parallel
    ranks would share them, and neither divides 12; pipelines leave 4, 2 or 1. (Llama 3's reason for pp:
    the global batch bounds data parallelism.)"""
    cluster = ClusterConfig(gpus=16, gpus_per_node=2)
    found = search(dataclasses.replace(SMALL, n_layers=8), base=ParallelConfig(), cluster=cluster, seq_len=64,
                   global_batch_tokens=12 * 64)  # fmt: skip
    assert found and all(c.parallel.pp > 1 for c in found)
    assert all(12 % (16 // (c.parallel.tp * c.parallel.pp)) == 0 for c in found)
    assert "parallel.pp=" in found[0].overrides() and f"pp{found[0].parallel.pp}" in found[0].label()


def test_published_pipelined_runs_are_predicted():
    """The pipelined rows of the validation table: cited, pipelined, and two of them predicted here (at the
    presets' efficiencies) to fit, with a finite error; the committed table has every one with its error."""
    from planner.validate import pipelined_runs, predict

    runs = pipelined_runs()
    assert len(runs) >= 5 and all(r.source and r.layout is not None and r.layout.pp > 1 for r in runs)
    titan = next(r for r in runs if r.name.endswith("512 GPUs, 1F1B"))
    assert titan.tokens_per_sec_per_gpu == 100 and titan.layout.pp == 8 and titan.layout.tp == 8
    for run in (titan, runs[-1]):  # torchtitan's 405B, Megatron-LM's 1T
        got = predict(run)
        assert got is not None and got.parallel.pp == run.layout.pp and got.estimate.fits
        error = got.estimate.tokens_per_sec_per_gpu / run.tokens_per_sec_per_gpu - 1
        assert math.isfinite(error) and abs(error) < 0.6, (run.name, error)
    rows = json.loads((REPO / "bench" / "results" / "planner_validation.json").read_text())
    names = {r.name for r in runs}
    committed = [r for r in rows if r["run"] in names]
    assert len(committed) == len(runs) and all(math.isfinite(r["error"]) for r in committed)
