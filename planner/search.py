"""Plan one layout, or enumerate layouts and rank those that fit by predicted throughput.

A candidate is a parallel config plus the micro-batch that, with the accumulation it implies, keeps the
global batch fixed. Shard sizes depend only on (tp, dp_replicate, pp) at a given world size, so each of
those is rehearsed once (a pipeline: its first and last stage) and the activation-checkpointing,
micro-batch, resharding and pipeline-schedule choices are priced on it.

Pipelines: pp in 1, 2, 4, 8, ... (dividing the world with tp, at least one block per stage), FSDP over
each stage's data-parallel ranks; the whole local batch runs as one schedule run (more runs would only add
bubbles) cut into m micro-batches, m >= pp and dividing it; schedules: 1F1B and the others the trainer
offers (interleaved 1F1B with 2 stages per rank where the blocks allow, the zero-bubble ones), each where
the trainer accepts it for the layout (``ParallelDims.for_run``). GPipe is left out: its bubble is 1F1B's
and it keeps every micro-batch in flight.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence

import torch

from model.config import ModelArgs
from planner.config import ClusterConfig
from planner.estimate import Estimate, Workload, estimate_stages
from planner.pipeline import SCHEDULES, PipelineSchedule, check_microbatches, microbatches
from planner.rehearsal import Rehearsal, rehearse_stages
from trainer.parallel.config import ACConfig, ACMode, ParallelConfig, PPSchedule
from trainer.parallel.dims import ParallelDims


@dataclass(frozen=True)
class Candidate:
    parallel: ParallelConfig
    work: Workload
    estimate: Estimate
    schedule: PipelineSchedule = PipelineSchedule()
    """The pipeline schedule priced (``parallel.pp_schedule`` unless the planner was given another)."""

    def overrides(self) -> str:
        """The layout as command-line overrides for ``python -m launch.train`` / ``launch.local``."""
        p = self.parallel
        items = [f"parallel.tp={p.tp}", f"parallel.dp_replicate={p.dp_replicate}", "parallel.dp_shard=-1",
                 f"parallel.ac.mode={p.ac.mode.value}"]  # fmt: skip
        if p.ac.mode == ACMode.every_k:
            items.append(f"parallel.ac.every_k={p.ac.every_k}")
        if p.fsdp.one_rank:
            items.append("parallel.fsdp.one_rank=true")
        if p.pp > 1:
            items += [f"parallel.pp={p.pp}", f"parallel.pp_schedule={self.schedule.name}",
                      f"parallel.pp_microbatches={microbatches(p)}"]  # fmt: skip
            if self.schedule.virtual > 1:
                items.append(f"parallel.pp_virtual_stages={self.schedule.virtual}")
        items += [f"parallel.fsdp.reshard_after_forward={str(p.fsdp.reshard_after_forward).lower()}",
                  f"trainer.micro_batch_size={self.work.micro_batch}", f"trainer.grad_accum_steps={self.work.grad_accum}",
                  f"data.seq_len={self.work.seq_len}"]  # fmt: skip
        return " ".join(items)

    def label(self) -> str:
        p = self.parallel
        ac = p.ac.mode.value + (f"{p.ac.every_k}" if p.ac.mode == ACMode.every_k else "")
        pipe = f" pp{p.pp} {self.schedule.label()} m{microbatches(p)}" if p.pp > 1 else ""
        return (f"tp{p.tp} rep{p.dp_replicate}{pipe} {ac} mb{self.work.micro_batch}"
                f"{'' if p.fsdp.reshard_after_forward else ' keep'}")  # fmt: skip


def workload(*, global_batch_tokens: int, seq_len: int, dp: int, micro_batch: int,
             compute_dtype: torch.dtype) -> Workload:  # fmt: skip
    """The workload of one data-parallel rank; a clear error where the batch does not split."""
    sequences, rest = divmod(global_batch_tokens, seq_len)
    if rest:
        raise ValueError(f"plan.global_batch_tokens={global_batch_tokens} is not a multiple of data.seq_len={seq_len}")
    per_rank, rest = divmod(sequences, dp)
    if rest or per_rank == 0:
        raise ValueError(
            f"the global batch of {sequences} sequences does not split over {dp} data-parallel ranks: make "
            f"plan.global_batch_tokens a multiple of {dp * seq_len} (dp x seq_len), or raise parallel.tp"
        )
    if per_rank % micro_batch:
        divisors = [m for m in range(1, per_rank + 1) if per_rank % m == 0]
        raise ValueError(
            f"each data-parallel rank gets {per_rank} sequences per step; trainer.micro_batch_size={micro_batch} "
            f"must divide it: choose one of {divisors} (or run --search)"
        )
    return Workload(micro_batch=micro_batch, grad_accum=per_rank // micro_batch, seq_len=seq_len,
                    compute_dtype=compute_dtype)  # fmt: skip


def planned_parallel(parallel: ParallelConfig, *, world_size: int, compute_dtype: torch.dtype) -> ParallelConfig:
    """The layout as planned: bf16 always through FSDP's mixed precision (bf16 parameters, residual stream
    and saved activations), the multi-GPU path. Where the data-parallel degree is 1 (TP only) that means
    ``parallel.fsdp.one_rank=true``; without it training would use autocast, which keeps an fp32 residual
    stream and bf16 copies of the weights, and the planner does not model that path."""
    if compute_dtype != torch.float32 and not ParallelDims.from_config(parallel, world_size=world_size).fsdp_enabled:
        return dataclasses.replace(parallel, fsdp=dataclasses.replace(parallel.fsdp, one_rank=True))
    return parallel


def plan_one(args: ModelArgs, *, parallel: ParallelConfig, cluster: ClusterConfig, seq_len: int,
             global_batch_tokens: int, micro_batch: int, compute_dtype: torch.dtype = torch.bfloat16,
             rehearsals: Optional[Sequence[Rehearsal]] = None,
             schedule: Optional[PipelineSchedule] = None) -> Candidate:  # fmt: skip
    """Rehearse ``parallel`` on ``cluster.gpus`` ranks (unless given: ``rehearse_stages``' answer) and
    estimate it. ``schedule``: the pipeline schedule to price, default ``parallel.pp_schedule`` (lets the
    planner price a schedule before the trainer's config offers it)."""
    parallel = planned_parallel(parallel, world_size=cluster.gpus, compute_dtype=compute_dtype)
    if rehearsals is None:
        rehearsals = rehearse_stages(args, parallel=parallel, world_size=cluster.gpus, seq_len=seq_len,
                                     compute_dtype=compute_dtype)  # fmt: skip
    work = workload(global_batch_tokens=global_batch_tokens, seq_len=seq_len, dp=rehearsals[0].dims.dp,
                    micro_batch=micro_batch, compute_dtype=compute_dtype)  # fmt: skip
    check_microbatches(microbatches=microbatches(parallel), stages=parallel.pp, micro_batch=micro_batch)
    schedule = schedule or PipelineSchedule.of(parallel)
    est = estimate_stages(args, rehearsals=rehearsals, parallel=parallel, work=work, cluster=cluster, schedule=schedule)
    return Candidate(parallel=parallel, work=work, estimate=est, schedule=schedule)


def _tp_degrees(args: ModelArgs, *, cluster: ClusterConfig, seq_len: int) -> list[int]:
    """Tensor-parallel degrees within one node that divide what TP splits."""
    return [t for t in (1, 2, 4, 8, 16) if t <= min(cluster.gpus_per_node, cluster.gpus)
            and not (args.n_heads % t or args.n_kv_heads % t or args.vocab_size % t or seq_len % t)]  # fmt: skip


def _pp_degrees(args: ModelArgs, *, tp: int, cluster: ClusterConfig) -> list[int]:
    """1 and pipelines of 2, 4, 8, ... stages that divide the world with ``tp`` and give every stage a block."""
    degrees, pp = [], 1
    while pp <= args.n_layers and tp * pp <= cluster.gpus:
        if cluster.gpus % (tp * pp) == 0:
            degrees.append(pp)
        pp *= 2
    return degrees


def trainer_schedules(args: ModelArgs, *, pp: int) -> list[PipelineSchedule]:
    """The schedules a search of ``pp`` ranks tries: those the trainer offers (``PPSchedule``) and the planner
    prices, GPipe aside; 2 stages per rank for interleaved 1F1B and ZB-V where the blocks fill them."""
    found = []
    for value in (s.value for s in PPSchedule):
        if value not in SCHEDULES or value == "gpipe":
            continue
        virtual = 2 if value in ("interleaved_1f1b", "zbv") else 1
        if args.n_layers >= pp * virtual:
            found.append(PipelineSchedule(value, virtual=virtual))
    return found


def _microbatch_counts(schedule: PipelineSchedule, *, pp: int, sequences: int) -> list[int]:
    """Schedule runs' micro-batch counts m: dividing the local batch, at least ``pp`` (torch's schedules),
    a multiple of ``pp`` with several stages per rank (whole rounds)."""
    return [m for m in range(pp, sequences + 1) if sequences % m == 0
            and (schedule.virtual == 1 or m % pp == 0)]  # fmt: skip


def _replicate_degrees(*, tp: int, cluster: ClusterConfig, pp: int = 1) -> list[int]:
    """1 (FSDP over everything) and, without pipelining, HSDP with each replica sharded over 1, 2, 4, ...
    whole nodes (a pipeline's stages shard over their data-parallel ranks: the search keeps it to FSDP)."""
    if pp > 1:
        return [1]
    world = cluster.gpus
    degrees = [1]
    nodes = 1
    while nodes * cluster.gpus_per_node < world:
        shard_gpus = nodes * cluster.gpus_per_node
        if world % shard_gpus == 0 and shard_gpus % tp == 0:
            degrees.append(world // shard_gpus)
        nodes *= 2
    return degrees


AC_CHOICES = ((ACMode.none, 2), (ACMode.selective, 2), (ACMode.selective_ffn, 2), (ACMode.every_k, 2),
              (ACMode.full, 2))  # fmt: skip


FIXABLE = ("tp", "pp", "dp_replicate", "dp_shard", "ac")
"""What a search can take from its base config instead of searching it (``candidates``' ``fixed``). A fixed
``dp_shard`` (e.g. 1: replicated data parallelism, as Megatron-LM's) leaves the rest of the world to
``dp_replicate``."""


def _degrees(args: ModelArgs, *, base: ParallelConfig, cluster: ClusterConfig, seq_len: int,
             fixed: Sequence[str]) -> Iterator[tuple[int, int, int, int]]:  # fmt: skip
    """(tp, pp, dp_replicate, dp_shard) of every layout searched, ``base``'s where ``fixed`` names them
    (dp_shard -1: the rest of the world)."""
    tps = [base.tp] if "tp" in fixed else _tp_degrees(args, cluster=cluster, seq_len=seq_len)
    for tp in tps:
        for pp in [base.pp] if "pp" in fixed else _pp_degrees(args, tp=tp, cluster=cluster):
            if "dp_shard" in fixed and "dp_replicate" not in fixed:
                replicas, rest = divmod(cluster.gpus, tp * pp * base.dp_shard)
                if not rest and replicas:
                    yield tp, pp, replicas, base.dp_shard
                continue
            shard = base.dp_shard if "dp_shard" in fixed else -1
            replicates = [base.dp_replicate] if "dp_replicate" in fixed else _replicate_degrees(tp=tp, cluster=cluster, pp=pp)
            for replicate in replicates:
                yield tp, pp, replicate, shard


def _with_schedule(parallel: ParallelConfig, schedule: PipelineSchedule) -> ParallelConfig:
    """``parallel`` running ``schedule``, as far as the trainer's config can say it (a schedule it does not
    offer is carried by the candidate, ``Candidate.schedule``, and priced on the one-stage-per-rank build)."""
    if parallel.pp == 1 or schedule.name not in {s.value for s in PPSchedule}:
        return parallel
    return dataclasses.replace(parallel, pp_schedule=PPSchedule(schedule.name), pp_virtual_stages=schedule.virtual)


def _builds(parallel: ParallelConfig, *, args: ModelArgs, world_size: int, seq_len: int) -> bool:
    """Whether the trainer accepts the layout (its own checks, ``ParallelDims.for_run``)."""
    try:
        ParallelDims.for_run(parallel, world_size=world_size, model=args, seq_len=seq_len)
    except ValueError:
        return False
    return True


def _choices(layout: ParallelConfig, *, per_rank: int, schedule: PipelineSchedule,
             keep_ac: bool) -> Iterator[tuple[ParallelConfig, int]]:  # fmt: skip
    """(parallel config, micro-batch) of each activation-checkpointing (``layout``'s with ``keep_ac``),
    resharding and micro-batch choice and, for a pipeline, micro-batch count. A pipeline runs the whole
    local batch as one micro-batch (one schedule run), cut into m."""
    for ac in [layout.ac] if keep_ac else [ACConfig(mode=mode, every_k=k) for mode, k in AC_CHOICES]:
        for reshard in (True, False):
            parallel = dataclasses.replace(layout, ac=ac,
                                           fsdp=dataclasses.replace(layout.fsdp, reshard_after_forward=reshard))  # fmt: skip
            if layout.pp == 1:
                for micro in (m for m in range(1, per_rank + 1) if per_rank % m == 0):
                    yield parallel, micro
                continue
            for m in _microbatch_counts(schedule, pp=layout.pp, sequences=per_rank):
                yield dataclasses.replace(parallel, pp_microbatches=m), per_rank


def candidates(args: ModelArgs, *, base: ParallelConfig, cluster: ClusterConfig, seq_len: int,
               global_batch_tokens: int, compute_dtype: torch.dtype = torch.bfloat16,
               rehearsals: Optional[dict] = None, fixed: Sequence[str] = (),
               schedules: Optional[Sequence[PipelineSchedule]] = None) -> Iterator[Candidate]:  # fmt: skip
    """Every layout of the search space that builds (fits or not), sharing the rehearsals of each (tp, pp,
    dp_replicate, placement of stages on ranks) (kept in ``rehearsals``, if given, for another search:
    keyed by model, layout, world and dtype).

    Args:
        fixed: what to take from ``base`` instead of searching it, of ``FIXABLE`` (a published layout whose
            micro-batches or schedule were not published).
        schedules: the pipeline schedules priced where pp > 1, whether or not the trainer builds them for the
            layout yet (then on its one-stage-per-rank build: ``pipeline.placed``); default
            ``trainer_schedules``, each where the trainer accepts it.
    """
    if set(fixed) - set(FIXABLE):
        raise ValueError(f"a search can fix {', '.join(FIXABLE)}, not {', '.join(sorted(set(fixed) - set(FIXABLE)))}")
    rehearsals = {} if rehearsals is None else rehearsals
    sequences = global_batch_tokens // seq_len
    for tp, pp, replicate, shard in _degrees(args, base=base, cluster=cluster, seq_len=seq_len, fixed=fixed):
        layout = planned_parallel(dataclasses.replace(base, tp=tp, pp=pp, dp_replicate=replicate, dp_shard=shard),
                                  world_size=cluster.gpus, compute_dtype=compute_dtype)  # fmt: skip
        dp = cluster.gpus // (tp * pp)
        if sequences % dp or global_batch_tokens % seq_len:
            continue
        tried = schedules if schedules is not None else trainer_schedules(args, pp=pp)
        tried = [PipelineSchedule()] if pp == 1 else tried
        for schedule in tried:
            built = _with_schedule(layout, schedule)
            if not _builds(built, args=args, world_size=cluster.gpus, seq_len=seq_len):
                if schedules is None:
                    continue  # the search offers only what the trainer runs
                built = dataclasses.replace(layout, pp_schedule=PPSchedule.one_f_one_b, pp_virtual_stages=1)
            runs = PipelineSchedule.of(built)
            placement = (runs.virtual, runs.name == "zbv")  # what the ranks are built with (looped, or a V)
            key = (repr(args), tp, pp, replicate, shard, placement, cluster.gpus, seq_len, compute_dtype)
            if key not in rehearsals:
                rehearsals[key] = rehearse_stages(args, parallel=built, world_size=cluster.gpus, seq_len=seq_len,
                                                  compute_dtype=compute_dtype)  # fmt: skip
            for parallel, micro in _choices(built, per_rank=sequences // dp, schedule=schedule, keep_ac="ac" in fixed):
                yield plan_one(args, parallel=parallel, cluster=cluster, seq_len=seq_len,
                               global_batch_tokens=global_batch_tokens, micro_batch=micro, compute_dtype=compute_dtype,
                               rehearsals=rehearsals[key], schedule=schedule)  # fmt: skip


def search(args: ModelArgs, *, base: ParallelConfig, cluster: ClusterConfig, seq_len: int,
           global_batch_tokens: int, compute_dtype: torch.dtype = torch.bfloat16,
           rehearsals: Optional[dict] = None, fixed: Sequence[str] = (),
           schedules: Optional[Sequence[PipelineSchedule]] = None) -> list[Candidate]:  # fmt: skip
    """The layouts that fit, fastest first (ties: less memory first); the arguments as ``candidates``'."""
    fitting = [c for c in candidates(args, base=base, cluster=cluster, seq_len=seq_len,
                                     global_batch_tokens=global_batch_tokens, compute_dtype=compute_dtype,
                                     rehearsals=rehearsals, fixed=fixed, schedules=schedules)
               if c.estimate.fits]  # fmt: skip
    return sorted(fitting, key=lambda c: (-c.estimate.tokens_per_sec_per_gpu, c.estimate.memory.total))
