"""Plan one layout, or enumerate layouts and rank those that fit by predicted throughput.

A candidate is a parallel config plus the micro-batch that, with the accumulation it implies, keeps the
global batch fixed. Shard sizes depend only on (tp, dp_replicate) at a given world size, so each of those
is rehearsed once and the activation-checkpointing, micro-batch and resharding choices are priced on it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Iterator, Optional

import torch

from model.config import ModelArgs
from planner.config import ClusterConfig
from planner.estimate import Estimate, Workload, estimate
from planner.rehearsal import Rehearsal, rehearse
from trainer.parallel.config import ACConfig, ACMode, ParallelConfig
from trainer.parallel.dims import ParallelDims


@dataclass(frozen=True)
class Candidate:
    parallel: ParallelConfig
    work: Workload
    estimate: Estimate

    def overrides(self) -> str:
        """The layout as command-line overrides for ``python -m launch.train`` / ``launch.local``."""
        p = self.parallel
        items = [f"parallel.tp={p.tp}", f"parallel.dp_replicate={p.dp_replicate}", "parallel.dp_shard=-1",
                 f"parallel.ac.mode={p.ac.mode.value}"]  # fmt: skip
        if p.ac.mode == ACMode.every_k:
            items.append(f"parallel.ac.every_k={p.ac.every_k}")
        if p.fsdp.one_rank:
            items.append("parallel.fsdp.one_rank=true")
        items += [f"parallel.fsdp.reshard_after_forward={str(p.fsdp.reshard_after_forward).lower()}",
                  f"trainer.micro_batch_size={self.work.micro_batch}", f"trainer.grad_accum_steps={self.work.grad_accum}",
                  f"data.seq_len={self.work.seq_len}"]  # fmt: skip
        return " ".join(items)

    def label(self) -> str:
        p = self.parallel
        ac = p.ac.mode.value + (f"{p.ac.every_k}" if p.ac.mode == ACMode.every_k else "")
        return (f"tp{p.tp} rep{p.dp_replicate} {ac} mb{self.work.micro_batch}"
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
             rehearsal: Optional[Rehearsal] = None) -> Candidate:  # fmt: skip
    """Rehearse ``parallel`` on ``cluster.gpus`` ranks (unless given) and estimate it."""
    parallel = planned_parallel(parallel, world_size=cluster.gpus, compute_dtype=compute_dtype)
    if rehearsal is None:
        rehearsal = rehearse(args, parallel=parallel, world_size=cluster.gpus, seq_len=seq_len,
                             compute_dtype=compute_dtype)  # fmt: skip
    work = workload(global_batch_tokens=global_batch_tokens, seq_len=seq_len, dp=rehearsal.dims.dp,
                    micro_batch=micro_batch, compute_dtype=compute_dtype)  # fmt: skip
    est = estimate(args, rehearsal=rehearsal, parallel=parallel, work=work, cluster=cluster)
    return Candidate(parallel=parallel, work=work, estimate=est)


def _tp_degrees(args: ModelArgs, *, cluster: ClusterConfig, seq_len: int) -> list[int]:
    """Tensor-parallel degrees within one node that divide what TP splits."""
    return [t for t in (1, 2, 4, 8, 16) if t <= min(cluster.gpus_per_node, cluster.gpus)
            and not (args.n_heads % t or args.n_kv_heads % t or args.vocab_size % t or seq_len % t)]  # fmt: skip


def _replicate_degrees(*, tp: int, cluster: ClusterConfig) -> list[int]:
    """1 (FSDP over everything) and HSDP with each replica sharded over 1, 2, 4, ... whole nodes."""
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


def candidates(args: ModelArgs, *, base: ParallelConfig, cluster: ClusterConfig, seq_len: int,
               global_batch_tokens: int, compute_dtype: torch.dtype = torch.bfloat16,
               rehearsals: Optional[dict] = None) -> Iterator[Candidate]:  # fmt: skip
    """Every layout of the search space that builds (fits or not), sharing one rehearsal per (tp, dp_replicate)
    (kept in ``rehearsals``, if given, for another search: keyed by model, layout, world and dtype)."""
    rehearsals = {} if rehearsals is None else rehearsals
    sequences = global_batch_tokens // seq_len
    for tp in _tp_degrees(args, cluster=cluster, seq_len=seq_len):
        for replicate in _replicate_degrees(tp=tp, cluster=cluster):
            layout = planned_parallel(dataclasses.replace(base, tp=tp, dp_replicate=replicate, dp_shard=-1),
                                      world_size=cluster.gpus, compute_dtype=compute_dtype)  # fmt: skip
            dp = cluster.gpus // tp
            if sequences % dp or global_batch_tokens % seq_len:
                continue
            key = (repr(args), tp, replicate, cluster.gpus, seq_len, compute_dtype)
            if key not in rehearsals:
                rehearsals[key] = rehearse(args, parallel=layout, world_size=cluster.gpus, seq_len=seq_len,
                                           compute_dtype=compute_dtype)  # fmt: skip
            rehearsal = rehearsals[key]
            per_rank = sequences // dp
            for mode, k in AC_CHOICES:
                for reshard in (True, False):
                    parallel = dataclasses.replace(layout, ac=ACConfig(mode=mode, every_k=k),
                                                   fsdp=dataclasses.replace(layout.fsdp, reshard_after_forward=reshard))  # fmt: skip
                    for micro in (m for m in range(1, per_rank + 1) if per_rank % m == 0):
                        yield plan_one(args, parallel=parallel, cluster=cluster, seq_len=seq_len,
                                       global_batch_tokens=global_batch_tokens, micro_batch=micro,
                                       compute_dtype=compute_dtype, rehearsal=rehearsal)  # fmt: skip


def search(args: ModelArgs, *, base: ParallelConfig, cluster: ClusterConfig, seq_len: int,
           global_batch_tokens: int, compute_dtype: torch.dtype = torch.bfloat16,
           rehearsals: Optional[dict] = None) -> list[Candidate]:  # fmt: skip
    """The layouts that fit, fastest first (ties: less memory first)."""
    fitting = [c for c in candidates(args, base=base, cluster=cluster, seq_len=seq_len,
                                     global_batch_tokens=global_batch_tokens, compute_dtype=compute_dtype,
                                     rehearsals=rehearsals)
               if c.estimate.fits]  # fmt: skip
    return sorted(fitting, key=lambda c: (-c.estimate.tokens_per_sec_per_gpu, c.estimate.memory.total))
