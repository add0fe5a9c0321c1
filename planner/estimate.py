"""Per-rank memory and per-step time for a rehearsed layout (docs/planner.md derives it all; a whole
run's cost: planner/budget.py).

Memory (bytes on one GPU at the peak of a step, the start of backward):
- parameters, gradients: the rank's padded shard storage in the master dtype (fp32), from the rehearsal;
- optimizer: AdamW's two moments, fp32, like the unpadded local shards;
- activations: the blocks' bytes from the activation-checkpointing policy (the formula the
  activation-memory tests check against counted bytes) plus what the model keeps outside the blocks;
- transient buffers: FSDP's all-gathered units (the root for the whole step; two blocks at a time with
  prefetch and ``reshard_after_forward``, every block without it), one block's unsharded gradients and
  their reduce-dtype copy, the unsharded gradients FSDP accumulates across micro-batches when their
  reduction is deferred, and the logits and their gradient;
- an allowance: a fixed reserve outside the allocator plus a fragmentation fraction of what changes.

Time (one optimizer step): compute FLOPs (model FLOPs plus recomputed forwards) at the calibrated
fraction of the data-sheet peak; every collective priced at bus bandwidth (NVLink inside a node, the
network across), with what our implementation overlaps: FSDP's all-gathers and reduce-scatters run under
the neighbouring block's compute (only the excess shows, plus the first gather and the last reduction);
TP's forward collectives and its row-parallel backward gathers wait, its other backward collectives run
under the layer's backward GEMMs; the optimizer step is memory-bound at HBM bandwidth.

Pipelining (``parallel.pp`` > 1, planner/pipeline.py): each stage is estimated on its own rehearsal, for
the micro-batches the schedule cuts each trainer micro-batch into; its activations are one micro-batch's
times the micro-batches the schedule keeps in flight on that stage; the step is the compute (and TP) of a
stage stretched by the schedule's bubble, plus the point-to-point transfers on the critical path and FSDP's
one reduction after the last backward. The layout's memory is its fullest stage's, its step its slowest's.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, fields
from typing import Optional, Sequence

import torch

from model.config import ModelArgs
from model.flops import attention_flops_per_token, flops_per_token, param_counts
from planner.config import ClusterConfig
from planner.pipeline import (PipelineSchedule, bubble_fraction, critical_transfers, in_flight, microbatches, p2p_bytes,
                              p2p_sends, placed)
from planner.rehearsal import Rehearsal
from trainer.parallel.activation_checkpointing import policy
from trainer.parallel.config import ACMode, ParallelConfig, ReduceDtype

ADAMW_STATES = 2
"""exp_avg and exp_avg_sq, each like the parameter's local shard."""
OPTIMIZER_BYTES_MOVED = 32
"""HBM bytes per local parameter in the optimizer step: AdamW reads p, g, m, v and writes p, m, v
(7 x 4 bytes, foreach kernels), and gradient clipping reads g once more."""
TOKEN_ID_BYTES = 8
"""int64 token ids (inputs and labels) kept by the embedding and the loss."""


def _bytes(dtype: torch.dtype) -> int:
    return torch.finfo(dtype).bits // 8


def _reduce_bytes(parallel: ParallelConfig) -> int:
    """Bytes per gradient element in FSDP's reduce-scatter / all-reduce (``parallel.fsdp.reduce_dtype``)."""
    return 4 if parallel.fsdp.reduce_dtype == ReduceDtype.fp32 else 2


@dataclass(frozen=True)
class Workload:
    """What one optimizer step processes on each data-parallel rank."""

    micro_batch: int
    grad_accum: int
    seq_len: int
    compute_dtype: torch.dtype = torch.bfloat16

    @property
    def micro_tokens(self) -> int:
        return self.micro_batch * self.seq_len


def stage_workload(work: Workload, *, microbatches: int) -> Workload:
    """What a pipeline stage processes: each micro-batch cut into ``microbatches`` smaller ones, all of whose
    gradients accumulate before the step (``work`` itself without pipelining)."""
    if microbatches == 1:
        return work
    return dataclasses.replace(work, micro_batch=work.micro_batch // microbatches,
                               grad_accum=work.grad_accum * microbatches)  # fmt: skip


@dataclass(frozen=True)
class Memory:
    """Bytes on one GPU at the step's peak."""

    parameters: int
    gradients: int
    optimizer: int
    activations: int
    gathered_parameters: int
    """FSDP all-gather outputs alive at the peak (root + blocks)."""
    gradient_buffers: int
    """Unsharded gradients: one block's and its reduce-dtype copy, or all of them while accumulating."""
    logits: int
    """Logits and their gradient (the log-probabilities are activations)."""
    reserve: int
    fragmentation: int

    @property
    def total(self) -> int:
        return sum(getattr(self, f.name) for f in fields(self))

    def items(self) -> list[tuple[str, int]]:
        return [(f.name, getattr(self, f.name)) for f in fields(self)]


@dataclass(frozen=True)
class Comm:
    """Bytes each GPU sends (bus bytes) per optimizer step on each mesh axis, by collective."""

    fsdp_all_gather: float
    fsdp_reduce_scatter: float
    hsdp_all_reduce: float
    tp: float
    """All-gathers and reduce-scatters of the sequence-parallel activations."""
    pp: float = 0.0
    """Point-to-point: the stage's activations sent forward and their gradients sent back."""


@dataclass(frozen=True)
class StepTime:
    """Seconds per optimizer step, split by what they are spent on."""

    compute: float
    tp_exposed: float
    fsdp_exposed: float
    optimizer: float
    pp_bubble: float = 0.0
    """The stage idle in the pipeline's fill and drain: (compute + TP) x bubble / (1 - bubble)."""
    pp_exposed: float = 0.0
    """Point-to-point transfers on the schedule's critical path."""

    @property
    def total(self) -> float:
        return self.compute + self.tp_exposed + self.fsdp_exposed + self.optimizer + self.pp_bubble + self.pp_exposed


@dataclass(frozen=True)
class Estimate:
    memory: Memory
    comm: Comm
    time: StepTime
    model_flops_per_gpu: float
    """Model FLOPs of one step on one GPU (``model.flops``: recomputation not counted, as for MFU)."""
    global_batch_tokens: int
    world_size: int
    peak_flops: float
    memory_capacity: float
    bubble: float = 0.0
    """Share of each schedule run the stage idles (0 without pipelining)."""
    stage: int = 0
    """The pipeline stage the time and communication are of (the slowest)."""
    memory_stage: int = 0
    """The pipeline stage the memory is of (the fullest)."""
    in_flight: float = 1.0
    """Micro-batches whose activations ``memory_stage`` holds at its peak."""

    @property
    def fits(self) -> bool:
        return self.memory.total <= self.memory_capacity

    @property
    def tokens_per_sec_per_gpu(self) -> float:
        return self.global_batch_tokens / self.time.total / self.world_size

    @property
    def mfu(self) -> float:
        return self.model_flops_per_gpu / (self.time.total * self.peak_flops)


def outside_block_activation_bytes(args: ModelArgs, *, tokens: int, tp: int, dtype: torch.dtype, mode: ACMode,
                                   embedding: bool = True, head: bool = True) -> int:  # fmt: skip
    """Bytes kept for backward outside the transformer blocks for ``tokens`` tokens of one micro-batch.

    With the embedding, its token ids. With the head (the last pipeline stage): the labels the loss keeps;
    the final RMSNorm on the sequence shard (its input in the compute dtype and 1/rms, or with ``none``
    its normalised input in fp32-or-wider, as the blocks' norms); the output head's input, gathered over
    the sequence under TP (B*T*d on every TP rank); and the fp32 log-probabilities of the rank's
    vocabulary shard. Without the head (an earlier pipeline stage): the stage's output, which the
    schedule keeps until its gradient comes back (on the sequence shard).
    """
    e, c = _bytes(dtype), max(_bytes(dtype), 4)
    ids = TOKEN_ID_BYTES * tokens * embedding
    if not head:
        return ids + e * args.dim * tokens // tp
    norm_input = c if mode == ACMode.none else e
    norm = tokens * (norm_input * args.dim + c) // tp
    loss_weight = 4  # the loss's fp32 scalar total weight
    labels, head_input, log_probs = TOKEN_ID_BYTES * tokens, e * args.dim * tokens, 4 * tokens * args.vocab_size // tp
    return ids + labels + norm + head_input + log_probs + loss_weight


def activation_bytes(args: ModelArgs, *, parallel: ParallelConfig, work: Workload, tp: int,
                     layers: Optional[Sequence[int]] = None, embedding: bool = True,
                     head: bool = True) -> int:  # fmt: skip
    """Everything one micro-batch keeps for backward on one rank: the blocks (the policy's formula) and
    the rest. ``layers``, ``embedding``, ``head``: what the rank holds (a pipeline stage); default all."""
    ac = policy(parallel.ac)
    layers = range(args.n_layers) if layers is None else layers
    blocks = sum(ac.layer_bytes(args, layer=i, batch=work.micro_batch, seq_len=work.seq_len, tp=tp,
                                dtype=work.compute_dtype) for i in layers)  # fmt: skip
    rest = outside_block_activation_bytes(args, tokens=work.micro_tokens, tp=tp, dtype=work.compute_dtype,
                                          mode=parallel.ac.mode, embedding=embedding, head=head)  # fmt: skip
    return blocks + rest


def memory(args: ModelArgs, *, rehearsal: Rehearsal, parallel: ParallelConfig, work: Workload,
           cluster: ClusterConfig, schedule: Optional[PipelineSchedule] = None) -> Memory:  # fmt: skip
    """Bytes on the GPU of ``rehearsal``'s rank (its pipeline stage, if pipelined) at the step's peak."""
    dims = rehearsal.dims
    schedule = schedule or PipelineSchedule.of(parallel)
    m = microbatches(parallel)
    stage_work = stage_workload(work, microbatches=m)
    master = _bytes(rehearsal.param_dtype)
    e = _bytes(work.compute_dtype)
    reduce = _reduce_bytes(parallel)
    if dims.fsdp_enabled:
        largest = max(b.gathered_numel for b in rehearsal.blocks)
        every_block = sum(b.gathered_numel for b in rehearsal.blocks)
        # torch.distributed.pipelining turns FSDP's resharding after backward off for every micro-batch but
        # the last (PipelineStage.backward_maybe_with_nosync), so a stage's blocks stay gathered as if
        # reshard_after_forward were off, and its unsharded gradients accumulate until the step's reduction.
        keep_all = not parallel.fsdp.reshard_after_forward or dims.pp_enabled
        held = every_block + largest if keep_all else 2 * largest
        gathered = (rehearsal.root.gathered_numel + held) * e
        accumulating = dims.pp_enabled or (work.grad_accum > 1 and parallel.fsdp.defer_grad_sync)
        # One block's unsharded gradient in the compute dtype and its reduce-dtype copy for the
        # reduce-scatter; while accumulating, FSDP keeps every unsharded gradient in the reduce dtype.
        grads = largest * (e + reduce) + (every_block + rehearsal.root.gathered_numel) * reduce * accumulating
    else:
        gathered, grads = 0, 0
    one = activation_bytes(args, parallel=parallel, work=stage_work, tp=dims.tp, layers=rehearsal.layers,
                           embedding=rehearsal.embedding, head=rehearsal.head)  # fmt: skip
    acts = int(one * in_flight(schedule, stages=dims.pp, stage=rehearsal.stage, microbatches=m))
    # Only the stage with the head has logits, one micro-batch's at a time (its loss is backpropagated at once).
    logits = stage_work.micro_tokens * args.vocab_size // dims.tp * (e + 4 + 4) * rehearsal.head
    changing = acts + gathered + grads + logits
    return Memory(
        parameters=rehearsal.padded_numel * master,
        gradients=rehearsal.padded_numel * master,
        optimizer=ADAMW_STATES * rehearsal.local_numel * master,
        activations=acts,
        gathered_parameters=gathered,
        gradient_buffers=grads,
        logits=logits,
        reserve=int(cluster.memory_reserve_gib * 2**30),
        fragmentation=int(cluster.fragmentation * changing),
    )


def _bandwidth(cluster: ClusterConfig, *, stride: int, size: int) -> float:
    """Bytes/s per GPU of a collective over ``size`` ranks ``stride`` apart (ranks fill nodes in order):
    NVLink if the group lies within one node, the network if it spans nodes."""
    within_node = stride * size <= cluster.gpus_per_node
    return (cluster.intra_node_gbps if within_node else cluster.inter_node_gbps) * 1e9


def _ring(size: int) -> float:
    """Fraction of a buffer each rank sends in a ring all-gather or reduce-scatter over ``size`` ranks."""
    return (size - 1) / size


def recomputed_blocks(parallel: ParallelConfig, *, layers: Sequence[int]) -> int:
    """Blocks among ``layers`` (the model's indices) whose forward the policy reruns in backward."""
    ac = policy(parallel.ac)
    return sum(ac.recomputes_block(i) for i in layers)


def recomputed_matmul_flops_per_token(args: ModelArgs, *, parallel: ParallelConfig,
                                      layers: Optional[Sequence[int]] = None) -> int:  # fmt: skip
    """Matmul FLOPs per token (``layers``, default the whole model, unsharded) that the policy reruns outside
    whole-block recomputation: ``selective_ffn``'s two up projections in every layer."""
    ac = policy(parallel.ac)
    layers = range(args.n_layers) if layers is None else layers
    return sum(ac.recomputed_matmul_flops(args, layer=i) for i in layers)


def elementwise_recompute_bytes(args: ModelArgs, *, parallel: ParallelConfig, tokens: int, tp: int, e: int,
                                n_layers: Optional[int] = None) -> int:  # fmt: skip
    """HBM bytes per micro-batch of the element-wise work that selective checkpointing redoes in backward:
    both RMSNorms (read x, write x/rms) and the SwiGLU gate (read a and b, write silu(a) and the product),
    for every layer (``n_layers``: a pipeline stage's; default the model's). Memory-bound work, priced at
    HBM bandwidth rather than in FLOPs."""
    if parallel.ac.mode not in (ACMode.selective, ACMode.selective_ffn):
        return 0
    n_layers = args.n_layers if n_layers is None else n_layers
    return n_layers * tokens * (2 * 2 * e * args.dim + 4 * e * args.ffn_hidden_dim) // tp


@dataclass(frozen=True)
class _BlockTimes:
    """Seconds of one micro-batch through one block of the stage, and through the head."""

    forward: float
    backward: float
    head: float


def _block_times(args: ModelArgs, *, rehearsal: Rehearsal, parallel: ParallelConfig, work: Workload,
                 rate: float, cluster: ClusterConfig) -> _BlockTimes:  # fmt: skip
    """Compute of one micro-batch (``work``'s) per block of the rehearsed rank, at ``rate`` FLOP/s: this GPU's
    share of the model FLOPs (TP splits every matmul t ways) plus the forwards that full / every-k
    checkpointing reruns, averaged over the rank's blocks; the head only on the rank that has it."""
    tp, n_model, n = rehearsal.dims.tp, args.n_layers, len(rehearsal.layers)
    micro_flops = flops_per_token(args, seq_len=work.seq_len) * work.micro_tokens / tp
    head_flops = 6 * args.vocab_size * args.dim * work.micro_tokens / tp
    block_flops = (micro_flops - head_flops) / n_model
    block_forward = (2 * (param_counts(args).matmul - args.vocab_size * args.dim) / n_model
                     + attention_flops_per_token(args, seq_len=work.seq_len) / 3 / n_model) * work.micro_tokens / tp  # fmt: skip
    recompute = (recomputed_blocks(parallel, layers=rehearsal.layers) * block_forward
                 + recomputed_matmul_flops_per_token(args, parallel=parallel, layers=rehearsal.layers)
                 * work.micro_tokens / tp)  # fmt: skip
    t_elementwise = elementwise_recompute_bytes(args, parallel=parallel, tokens=work.micro_tokens, tp=tp,
                                                e=_bytes(work.compute_dtype), n_layers=n) / (cluster.hbm_gbps * 1e9)  # fmt: skip
    return _BlockTimes(forward=block_flops / 3 / rate,
                       backward=(2 * block_flops / 3 + recompute / n) / rate + t_elementwise / n,
                       head=head_flops / rate if rehearsal.head else 0.0)  # fmt: skip


def _tp_time(args: ModelArgs, *, rehearsal: Rehearsal, parallel: ParallelConfig, work: Workload,
             cluster: ClusterConfig, blocks: _BlockTimes) -> tuple[float, float]:  # fmt: skip
    """(exposed seconds, bus bytes) of TP's collectives per micro-batch. Per layer 4 collectives in forward
    (wait), 6 in backward: the two row-parallel gathers of dy wait, the other four run under the layer's
    backward GEMMs; a recomputed layer repeats its forward's 4. Embedding and head: 2 in forward, 2 in
    backward each, all waited on (a pipeline stage has those it holds)."""
    dims = rehearsal.dims
    if not dims.tp_enabled:
        return 0.0, 0.0
    n = len(rehearsal.layers)
    one = work.micro_tokens * args.dim * _bytes(work.compute_dtype) * _ring(dims.tp)
    t_one = one / _bandwidth(cluster, stride=1, size=dims.tp)
    recomputed_share = recomputed_blocks(parallel, layers=rehearsal.layers) / n
    per_layer_fwd = 4 * t_one
    per_layer_bwd = (2 + 4 * recomputed_share) * t_one + max(0.0, 4 * t_one - blocks.backward)
    ends = 2 * rehearsal.embedding + 2 * rehearsal.head
    return n * (per_layer_fwd + per_layer_bwd) + ends * t_one, one * (n * (10 + 4 * recomputed_share) + ends)


@dataclass(frozen=True)
class _FSDPTraffic:
    """FSDP's exposed seconds and bus bytes per optimizer step."""

    exposed: float
    all_gather: float
    reduce_scatter: float
    all_reduce: float


def _fsdp_traffic(*, rehearsal: Rehearsal, parallel: ParallelConfig, work: Workload, cluster: ClusterConfig,
                  block_fwd_time: float, block_bwd_time: float) -> _FSDPTraffic:  # fmt: skip
    """Each block's all-gather overlaps the previous block's compute, its reduce-scatter (and the HSDP
    all-reduce) the next block's backward; only what exceeds the compute shows, plus the root's gather, the
    first block's gather and the last reduction. Under a pipeline schedule the blocks are gathered in the
    first forward, again in each backward where they are resharded after forward (the forward that follows
    a backward finds them gathered and frees them), and everything is reduced once, after the last
    backward, with no compute left to hide it (PipelineStage.perform_reduce_grad)."""
    dims = rehearsal.dims
    if not dims.fsdp_enabled:
        return _FSDPTraffic(0.0, 0.0, 0.0, 0.0)
    e, reduce, n = _bytes(work.compute_dtype), _reduce_bytes(parallel), len(rehearsal.blocks)
    bw_shard = _bandwidth(cluster, stride=dims.tp, size=dims.dp_shard)
    bw_rep = _bandwidth(cluster, stride=dims.tp * dims.dp_shard, size=dims.dp_replicate)
    block = max(b.gathered_numel for b in rehearsal.blocks)
    shard_padded = max(b.padded_numel for b in rehearsal.blocks)
    root = rehearsal.root.gathered_numel
    ag_block = block * e * _ring(dims.dp_shard)
    rs_block = block * reduce * _ring(dims.dp_shard)
    ar_block = 2 * shard_padded * reduce * _ring(dims.dp_replicate) if dims.dp_replicate > 1 else 0.0
    t_ag, t_rs = ag_block / bw_shard, rs_block / bw_shard
    t_ar = ar_block / bw_rep if dims.dp_replicate > 1 else 0.0
    t_root_ag = root * e * _ring(dims.dp_shard) / bw_shard
    t_root_reduce = root * reduce * _ring(dims.dp_shard) / bw_shard + (
        2 * rehearsal.root.padded_numel * reduce * _ring(dims.dp_replicate) / bw_rep if dims.dp_replicate > 1 else 0.0)  # fmt: skip
    reshard = parallel.fsdp.reshard_after_forward
    if dims.pp_enabled:
        regathers = work.grad_accum * n if reshard else 0
        exposed = (t_root_ag + t_ag + (n - 1) * max(0.0, t_ag - block_fwd_time)
                   + regathers * max(0.0, t_ag - block_bwd_time) + n * (t_rs + t_ar) + t_root_reduce)  # fmt: skip
        passes, gathers, syncs = 1, n + regathers, 1
    else:
        exposed = 0.0
        syncs = 1 if parallel.fsdp.defer_grad_sync else work.grad_accum
        for micro in range(work.grad_accum):
            sync = micro == work.grad_accum - 1 or not parallel.fsdp.defer_grad_sync
            exposed += t_root_ag + t_ag + (n - 1) * max(0.0, t_ag - block_fwd_time)
            bwd_comm = (t_ag if reshard else 0.0) + (t_rs + t_ar if sync else 0.0)
            exposed += n * max(0.0, bwd_comm - block_bwd_time)
            if sync:
                exposed += t_rs + t_ar + t_root_reduce
        passes, gathers = work.grad_accum, n + ((n - 1) if reshard else 0)
    ag = (root * e * _ring(dims.dp_shard) + ag_block * gathers) * passes
    rs = (root * reduce * _ring(dims.dp_shard) + rs_block * n) * syncs
    ar = (2 * rehearsal.root.padded_numel * reduce * _ring(dims.dp_replicate) + ar_block * n) * syncs \
        if dims.dp_replicate > 1 else 0.0  # fmt: skip
    return _FSDPTraffic(exposed=exposed, all_gather=ag, reduce_scatter=rs, all_reduce=ar)


def estimate(args: ModelArgs, *, rehearsal: Rehearsal, parallel: ParallelConfig, work: Workload,
             cluster: ClusterConfig, schedule: Optional[PipelineSchedule] = None) -> Estimate:  # fmt: skip
    """Memory, communication, step time and throughput of the rehearsed rank (one pipeline stage, if
    pipelined; ``estimate_stages`` combines the stages). ``schedule``: default ``parallel``'s."""
    dims = rehearsal.dims
    schedule = schedule or PipelineSchedule.of(parallel)
    m = microbatches(parallel)
    stage_work = stage_workload(work, microbatches=m)  # one pipeline micro-batch, m of them per micro-batch
    peak = cluster.bf16_peak if work.compute_dtype != torch.float32 else cluster.bf16_peak / 2
    rate = peak * cluster.gemm_efficiency
    n = len(rehearsal.layers)
    # Model FLOPs: the whole model's share of this GPU (for MFU), not its stage's.
    model_flops = flops_per_token(args, seq_len=work.seq_len) * work.micro_tokens / dims.tp * work.grad_accum / dims.pp
    blocks = _block_times(args, rehearsal=rehearsal, parallel=parallel, work=stage_work, rate=rate, cluster=cluster)
    t_tp, tp_bytes = _tp_time(args, rehearsal=rehearsal, parallel=parallel, work=stage_work, cluster=cluster,
                              blocks=blocks)  # fmt: skip
    per_block_tp = t_tp / max(n, 1) / 2
    fsdp = _fsdp_traffic(rehearsal=rehearsal, parallel=parallel, work=stage_work, cluster=cluster,
                         block_fwd_time=blocks.forward + per_block_tp,
                         block_bwd_time=blocks.backward + per_block_tp)  # fmt: skip
    compute = (n * (blocks.forward + blocks.backward) + blocks.head) * stage_work.grad_accum
    t_tp_step = t_tp * stage_work.grad_accum
    # The pipeline: every schedule run (one per trainer micro-batch) idles for its bubble, at the pace of a
    # micro-batch's compute and TP on this stage, and waits for each transfer on its critical path, at the
    # network's bandwidth (pp is the outermost axis: stages on different nodes unless the world is one node).
    bubble = bubble_fraction(schedule, stages=dims.pp, microbatches=m)
    one_p2p = p2p_bytes(tokens=stage_work.micro_tokens, dim=args.dim, tp=dims.tp,
                        element_bytes=_bytes(work.compute_dtype))  # fmt: skip
    t_p2p = (critical_transfers(schedule, stages=dims.pp, microbatches=m) * work.grad_accum * one_p2p
             / _bandwidth(cluster, stride=dims.world_size // dims.pp, size=dims.pp))  # fmt: skip
    pp_bytes = float(p2p_sends(schedule, stages=dims.pp, stage=rehearsal.stage) * one_p2p * stage_work.grad_accum)
    optimizer = rehearsal.local_numel * OPTIMIZER_BYTES_MOVED / (cluster.hbm_gbps * 1e9)
    mem = memory(args, rehearsal=rehearsal, parallel=parallel, work=work, cluster=cluster, schedule=schedule)
    return Estimate(
        memory=mem,
        comm=Comm(fsdp_all_gather=fsdp.all_gather, fsdp_reduce_scatter=fsdp.reduce_scatter,
                  hsdp_all_reduce=fsdp.all_reduce, tp=tp_bytes * stage_work.grad_accum, pp=pp_bytes),  # fmt: skip
        time=StepTime(compute=compute, tp_exposed=t_tp_step, fsdp_exposed=fsdp.exposed, optimizer=optimizer,
                      pp_bubble=(compute + t_tp_step) * bubble / (1 - bubble), pp_exposed=t_p2p),  # fmt: skip
        model_flops_per_gpu=model_flops,
        global_batch_tokens=work.micro_tokens * work.grad_accum * dims.dp,
        world_size=dims.world_size,
        peak_flops=peak,
        memory_capacity=cluster.memory_bytes,
        bubble=bubble,
        stage=rehearsal.stage,
        memory_stage=rehearsal.stage,
        in_flight=in_flight(schedule, stages=dims.pp, stage=rehearsal.stage, microbatches=m),
    )


def estimate_stages(args: ModelArgs, *, rehearsals: Sequence[Rehearsal], parallel: ParallelConfig, work: Workload,
                    cluster: ClusterConfig, schedule: Optional[PipelineSchedule] = None) -> Estimate:  # fmt: skip
    """The layout from its rehearsed stages (``rehearsal.rehearse_stages``): the memory of the fullest, the
    time and communication of the slowest (a pipeline runs at the pace of its slowest stage); one
    rehearsal without pipelining. Each rank runs the stages ``schedule`` places on it (``pipeline.placed``)."""
    schedule = schedule or PipelineSchedule.of(parallel)
    per_stage = [estimate(args, rehearsal=r, parallel=parallel, work=work, cluster=cluster, schedule=schedule)
                 for r in placed(rehearsals, args=args, schedule=schedule)]  # fmt: skip
    slowest = max(per_stage, key=lambda e: e.time.total)
    fullest = max(per_stage, key=lambda e: e.memory.total)
    return dataclasses.replace(slowest, memory=fullest.memory, memory_stage=fullest.memory_stage,
                               in_flight=fullest.in_flight)  # fmt: skip
