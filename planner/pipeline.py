"""The planner's model of a pipeline schedule: its bubble, the micro-batches whose activations a rank holds
at once, the blocks of each rank, and the point-to-point traffic between stages (docs/planner.md, "Pipeline
parallelism", derives and cites every formula).

p = pipeline ranks (``parallel.pp``), m = micro-batches per schedule run (``parallel.pp_microbatches``,
0 = p), v = stages per rank (``parallel.pp_virtual_stages``), s = the rank (0-based).

Bubble: the share of a schedule run a rank spends idle, every micro-batch's forward + backward on a stage
taking the same time. With r the bubble time over the ideal time m (T_F + T_B + T_W), the share is
r / (1 + r):
- ``gpipe`` (Huang et al. 2019) and ``1f1b`` (PipeDream-Flush; Narayanan et al. 2021, arXiv 2104.04473,
  section 2.2.1): r = (p - 1) / m, so (p - 1) / (m + p - 1);
- ``interleaved_1f1b`` (Narayanan et al. 2021, section 2.2.2): r = (1/v) (p - 1) / m, so
  (p - 1) / (v m + p - 1);
- ``zero_bubble`` with v = 1 is ZB-H1 (Qi et al. 2024, arXiv 2401.10241, section 2.1: the bubble is
  (p - 1)(T_F + T_B - T_W) against 1F1B's (p - 1)(T_F + T_B + T_W), a third of it when T_F = T_B = T_W,
  the paper's own assumption and ours: a backward is twice a forward, split evenly between the input
  and the weight gradient): r = (p - 1) / (3 m), so (p - 1) / (3 m + p - 1). With v > 1 (torch's looped
  ZB1P) we combine the two reductions, (p - 1) / (3 v m + p - 1): our extrapolation, not a published figure;
- ``zbv`` (ZB-V, Qi et al. 2024b, arXiv 2405.15362; the authors' comparison table with T_F = T_B = T_W):
  r = 0.

Schedules are named by ``parallel.pp_schedule``'s string value, so the trainer can add schedules without
the planner importing them; a name the planner has no formula for is an error naming the key.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Sequence

from model.config import ModelArgs
from planner.rehearsal import Rehearsal, UnitShards
from trainer.parallel.config import ParallelConfig
from trainer.parallel.pipeline import local_stages, stage_layers, stage_owners

SINGLE = ("gpipe", "1f1b")
"""Schedules of one stage per rank."""
SCHEDULES = (*SINGLE, "interleaved_1f1b", "zero_bubble", "zbv")
"""The schedules the planner has formulas for (``parallel.pp_schedule`` values)."""


@dataclass(frozen=True)
class PipelineSchedule:
    """A pipeline schedule as the planner prices it: its name and the stages each rank runs."""

    name: str = "1f1b"
    """``parallel.pp_schedule``'s value."""
    virtual: int = 1
    """Stages per rank (``parallel.pp_virtual_stages`` resolved): 1 for gpipe and 1f1b, 2 for zbv."""

    def __post_init__(self) -> None:
        if self.name not in SCHEDULES:
            raise ValueError(f"parallel.pp_schedule={self.name!r} has no planner model: the planner prices "
                             f"{', '.join(SCHEDULES)} (planner/pipeline.py)")  # fmt: skip
        if self.virtual < 1:
            raise ValueError(f"parallel.pp_virtual_stages={self.virtual}: a rank holds at least one stage")
        ParallelConfig(pp_schedule=self.name, pp_virtual_stages=self.virtual)  # the trainer's rule, and its error

    @classmethod
    def of(cls, parallel: ParallelConfig) -> PipelineSchedule:
        """The schedule ``parallel`` asks for, with the stages per rank as the trainer resolves them."""
        name = getattr(parallel.pp_schedule, "value", parallel.pp_schedule)
        return cls(name=name, virtual=getattr(parallel, "pp_stages_per_rank", 1))

    def label(self) -> str:
        return self.name + (f"v{self.virtual}" if self.virtual > 1 and self.name != "zbv" else "")


def microbatches(parallel: ParallelConfig) -> int:
    """Micro-batches each schedule run cuts a trainer micro-batch into (``parallel.pp_microbatches``,
    0 = ``pp``, as trainer/parallel/pipeline.py); 1 without pipelining."""
    if parallel.pp == 1:
        return 1
    return parallel.pp_microbatches or parallel.pp


def bubble_fraction(schedule: PipelineSchedule, *, stages: int, microbatches: int) -> float:
    """Share of a schedule run that a rank is idle (see the module docstring for each formula)."""
    p, m, v = stages, microbatches, schedule.virtual
    if p == 1 or schedule.name == "zbv":
        return 0.0
    slots = {"gpipe": m, "1f1b": m, "interleaved_1f1b": v * m, "zero_bubble": 3 * v * m}[schedule.name]
    return (p - 1) / (slots + p - 1)


def in_flight(schedule: PipelineSchedule, *, stages: int, stage: int, microbatches: int) -> float:
    """Micro-batches whose activations rank ``stage`` holds at its peak, in units of one micro-batch through
    all of the rank's blocks.

    - GPipe runs every forward before any backward: all m.
    - 1F1B warms up with p - s - 1 forwards, then one more forward precedes each backward: p - s
      (stage 0 the most, p; Narayanan et al. 2021, section 2.2.1). ZB-H1 keeps 1F1B's peak (Qi et al.
      2024, section 2.1); ZB-V holds 1F1B's p on every rank (Qi et al. 2024b).
    - Looped schedules of v stages per rank (interleaved 1F1B, Megatron's and torch's warm-up; ZB1P alike):
      (v - 1) r + 2 (p - s - 1) chunk forwards, r = the micro-batches of a round (p when p divides m),
      plus the steady state's one, each chunk 1/v of the rank's blocks; for rank 0 that is
      p (1 + (p - 1) / (p v)) micro-batches, the factor of Korthikanti et al. 2022 (arXiv 2205.05198),
      section 4.2.3.
    Never more than the micro-batches the run has.
    """
    p, s, m, v = stages, stage, microbatches, schedule.virtual
    if p == 1:
        return 1.0
    if schedule.name == "gpipe":
        return float(m)
    if schedule.name == "zbv":
        return float(min(p, m))
    if v == 1:
        return float(min(p - s, m))
    per_round = m // max(1, m // p)
    chunks = min((v - 1) * per_round + 2 * (p - s - 1) + 1, v * m)
    return chunks / v


def rank_stages(schedule: PipelineSchedule, *, stages: int, stage: int) -> list[int]:
    """The pipeline stages (of ``stages x virtual``) rank ``stage`` runs: the trainer's placement
    (``trainer.parallel.pipeline.local_stages``: looped, or a V for zbv)."""
    return local_stages(rank=stage, pp=stages, virtual=schedule.virtual, schedule=schedule.name)


def rank_layers(n_layers: int, schedule: PipelineSchedule, *, stages: int, stage: int) -> tuple[int, ...]:
    """The blocks rank ``stage`` runs: the trainer's split (``stage_layers``) of its stages."""
    split = stage_layers(n_layers, stages * schedule.virtual)
    return tuple(layer for k in sorted(rank_stages(schedule, stages=stages, stage=stage)) for layer in split[k])


def p2p_sends(schedule: PipelineSchedule, *, stages: int, stage: int) -> int:
    """Activations (forward) and their gradients (backward) rank ``stage`` sends per micro-batch: one each way
    per stage boundary that leaves the rank (a V's turn, stage p - 1 to p, stays on one rank)."""
    if stages == 1:
        return 0
    owner = stage_owners(pp=stages, virtual=schedule.virtual, schedule=schedule.name)
    total = stages * schedule.virtual
    mine = rank_stages(schedule, stages=stages, stage=stage)
    forward = sum(1 for k in mine if k + 1 < total and owner[k + 1] != stage)
    backward = sum(1 for k in mine if k > 0 and owner[k - 1] != stage)
    return forward + backward


def p2p_bytes(*, tokens: int, dim: int, tp: int, element_bytes: int) -> int:
    """One micro-batch's activation (or its gradient) crossing a stage boundary: (B, T, d) in the compute
    dtype, sequence-sharded over the TP ranks (sequence parallelism: a later stage receives its shard)."""
    return tokens * dim * element_bytes // tp


def critical_transfers(schedule: PipelineSchedule, *, stages: int, microbatches: int) -> int:
    """Point-to-point transfers on a schedule run's critical path: one forward and one backward per slot of
    the v m + p - 1 that a rank's timeline has (torch's schedules wait on each batched send/receive before
    the next compute, so none overlaps)."""
    if stages == 1:
        return 0
    return 2 * (schedule.virtual * microbatches + stages - 1)


def check_microbatches(*, microbatches: int, stages: int, micro_batch: int) -> None:
    """The trainer's (and torch's) conditions on a schedule run's micro-batches, as a planner error."""
    if stages > 1 and micro_batch % microbatches:
        raise ValueError(f"parallel.pp_microbatches={microbatches} does not divide the {micro_batch} sequences of a "
                         "micro-batch (trainer.micro_batch_size): choose a divisor")  # fmt: skip
    if stages > 1 and microbatches < stages:
        raise ValueError(f"parallel.pp_microbatches={microbatches} is fewer than the {stages} stages "
                         "(parallel.pp): torch's schedules need at least one micro-batch per stage")  # fmt: skip


def _sum(units: Sequence[UnitShards]) -> UnitShards:
    return UnitShards(local_numel=sum(u.local_numel for u in units), padded_numel=sum(u.padded_numel for u in units),
                      gathered_numel=sum(u.gathered_numel for u in units))  # fmt: skip


def placed(rehearsals: Sequence[Rehearsal], *, args: ModelArgs, schedule: PipelineSchedule) -> tuple[Rehearsal, ...]:
    """``rehearsals`` (``rehearse_stages``: the first and the last pipeline rank) as ranks running
    ``schedule``: as rehearsed where the trainer built the schedule's stages; otherwise (a schedule priced on
    a rehearsal of another placement, e.g. one the trainer's config does not offer) assembled from the
    rehearsed shards: every block has the same shapes, so the same shards, and the embedding's and the
    head's shards are those rehearsed on the first and the last rank, moved to the rank that runs stage 0
    and the last stage (an assembled rank's ``param_count`` stays the rehearsed one's)."""
    if len(rehearsals) == 1:
        return tuple(rehearsals)
    first, last = rehearsals[0], rehearsals[-1]
    stages = first.dims.pp
    out = []
    for r in rehearsals:
        ids = rank_stages(schedule, stages=stages, stage=r.stage)
        layers = rank_layers(args.n_layers, schedule, stages=stages, stage=r.stage)
        embedding, head = 0 in ids, stages * schedule.virtual - 1 in ids
        if layers == r.layers and (embedding, head) == (r.embedding, r.head):
            out.append(r)
            continue
        block = r.blocks[0]
        assert all(b == block for b in r.blocks), "blocks of one model shard alike"
        root = _sum([first.root] * embedding + [last.root] * head)
        out.append(dataclasses.replace(r, layers=layers, blocks=(block,) * len(layers), root=root, embedding=embedding,
                                       head=head))  # fmt: skip
    return tuple(out)
