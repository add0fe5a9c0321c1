"""Per-rank memory, per-step time and a run's cost for a rehearsed layout (docs/planner.md derives it all).

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
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch

from model.config import ModelArgs
from model.flops import attention_flops_per_token, flops_per_token, param_counts
from planner.config import ClusterConfig
from planner.rehearsal import Rehearsal
from trainer.parallel.activation_checkpointing import policy
from trainer.parallel.config import ACMode, ParallelConfig, ReduceDtype
from trainer.run.goodput import expected_goodput, job_mtbf_s, young_daly_interval_s

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


@dataclass(frozen=True)
class StepTime:
    """Seconds per optimizer step, split by what they are spent on."""

    compute: float
    tp_exposed: float
    fsdp_exposed: float
    optimizer: float

    @property
    def total(self) -> float:
        return self.compute + self.tp_exposed + self.fsdp_exposed + self.optimizer


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

    @property
    def fits(self) -> bool:
        return self.memory.total <= self.memory_capacity

    @property
    def tokens_per_sec_per_gpu(self) -> float:
        return self.global_batch_tokens / self.time.total / self.world_size

    @property
    def mfu(self) -> float:
        return self.model_flops_per_gpu / (self.time.total * self.peak_flops)


def outside_block_activation_bytes(args: ModelArgs, *, tokens: int, tp: int, dtype: torch.dtype,
                                   mode: ACMode) -> int:  # fmt: skip
    """Bytes kept for backward outside the transformer blocks for ``tokens`` tokens of one micro-batch.

    Token ids (embedding, loss); the final RMSNorm on the sequence shard (its input in the compute dtype
    and 1/rms, or with ``none`` its normalised input in fp32-or-wider, as the blocks' norms); the output
    head's input, gathered over the sequence under TP (B*T*d on every TP rank); and the fp32
    log-probabilities of the rank's vocabulary shard.
    """
    e, c = _bytes(dtype), max(_bytes(dtype), 4)
    norm_input = c if mode == ACMode.none else e
    norm = tokens * (norm_input * args.dim + c) // tp
    loss_weight = 4  # the loss's fp32 scalar total weight
    return 2 * TOKEN_ID_BYTES * tokens + norm + e * args.dim * tokens + 4 * tokens * args.vocab_size // tp + loss_weight


def activation_bytes(args: ModelArgs, *, parallel: ParallelConfig, work: Workload, tp: int) -> int:
    """Everything one micro-batch keeps for backward on one rank: the blocks (the policy's formula) and
    the rest."""
    ac = policy(parallel.ac)
    blocks = ac.model_bytes(args, batch=work.micro_batch, seq_len=work.seq_len, tp=tp, dtype=work.compute_dtype)
    rest = outside_block_activation_bytes(args, tokens=work.micro_tokens, tp=tp, dtype=work.compute_dtype,
                                          mode=parallel.ac.mode)  # fmt: skip
    return blocks + rest


def memory(args: ModelArgs, *, rehearsal: Rehearsal, parallel: ParallelConfig, work: Workload,
           cluster: ClusterConfig) -> Memory:  # fmt: skip
    dims = rehearsal.dims
    master = _bytes(rehearsal.param_dtype)
    e = _bytes(work.compute_dtype)
    reduce = _reduce_bytes(parallel)
    if dims.fsdp_enabled:
        largest = max(b.gathered_numel for b in rehearsal.blocks)
        every_block = sum(b.gathered_numel for b in rehearsal.blocks)
        held = 2 * largest if parallel.fsdp.reshard_after_forward else every_block + largest
        gathered = (rehearsal.root.gathered_numel + held) * e
        accumulating = work.grad_accum > 1 and parallel.fsdp.defer_grad_sync
        # One block's unsharded gradient in the compute dtype and its reduce-dtype copy for the
        # reduce-scatter; while accumulating, FSDP keeps every unsharded gradient in the reduce dtype.
        grads = largest * (e + reduce) + (every_block + rehearsal.root.gathered_numel) * reduce * accumulating
    else:
        gathered, grads = 0, 0
    acts = activation_bytes(args, parallel=parallel, work=work, tp=dims.tp)
    logits = work.micro_tokens * args.vocab_size // dims.tp * (e + 4 + 4)
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


def recomputed_blocks(parallel: ParallelConfig, *, n_layers: int) -> int:
    ac = policy(parallel.ac)
    return sum(ac.recomputes_block(i) for i in range(n_layers))


def recomputed_matmul_flops_per_token(args: ModelArgs, *, parallel: ParallelConfig) -> int:
    """Matmul FLOPs per token (whole model, unsharded) that the policy reruns outside whole-block
    recomputation: ``selective_ffn``'s two up projections in every layer."""
    ac = policy(parallel.ac)
    return sum(ac.recomputed_matmul_flops(args, layer=i) for i in range(args.n_layers))


def elementwise_recompute_bytes(args: ModelArgs, *, parallel: ParallelConfig, tokens: int, tp: int, e: int) -> int:
    """HBM bytes per micro-batch of the element-wise work that selective checkpointing redoes in backward:
    both RMSNorms (read x, write x/rms) and the SwiGLU gate (read a and b, write silu(a) and the product),
    for every layer. Memory-bound work, priced at HBM bandwidth rather than in FLOPs."""
    if parallel.ac.mode not in (ACMode.selective, ACMode.selective_ffn):
        return 0
    return args.n_layers * tokens * (2 * 2 * e * args.dim + 4 * e * args.ffn_hidden_dim) // tp


def estimate(args: ModelArgs, *, rehearsal: Rehearsal, parallel: ParallelConfig, work: Workload,
             cluster: ClusterConfig) -> Estimate:  # fmt: skip
    """Memory, communication, step time and throughput of one rank of the rehearsed layout."""
    dims = rehearsal.dims
    peak = cluster.bf16_peak if work.compute_dtype != torch.float32 else cluster.bf16_peak / 2
    rate = peak * cluster.gemm_efficiency
    e = _bytes(work.compute_dtype)
    reduce = _reduce_bytes(parallel)
    global_tokens = work.micro_tokens * work.grad_accum * dims.dp
    n = args.n_layers

    # Compute: this GPU's share of the model FLOPs (TP splits every matmul t ways), plus the forwards
    # that full / every-k checkpointing reruns.
    micro_flops = flops_per_token(args, seq_len=work.seq_len) * work.micro_tokens / dims.tp
    model_flops = micro_flops * work.grad_accum
    head_flops = 6 * args.vocab_size * args.dim * work.micro_tokens / dims.tp
    block_flops = (micro_flops - head_flops) / n
    block_forward = (2 * (param_counts(args).matmul - args.vocab_size * args.dim) / n
                     + attention_flops_per_token(args, seq_len=work.seq_len) / 3 / n) * work.micro_tokens / dims.tp  # fmt: skip
    recomputed = recomputed_blocks(parallel, n_layers=n)
    recompute = (recomputed * block_forward
                 + recomputed_matmul_flops_per_token(args, parallel=parallel) * work.micro_tokens / dims.tp)  # fmt: skip
    t_fwd_block = block_flops / 3 / rate
    t_elementwise = elementwise_recompute_bytes(args, parallel=parallel, tokens=work.micro_tokens, tp=dims.tp,
                                                e=e) / (cluster.hbm_gbps * 1e9)  # fmt: skip
    t_bwd_block = (2 * block_flops / 3 + recompute / n) / rate + t_elementwise / n
    t_head = head_flops / rate

    # Tensor parallelism: per layer 4 collectives in forward (wait), 6 in backward: the two row-parallel
    # gathers of dy wait, the other four run under the layer's backward GEMMs; a recomputed layer repeats
    # its forward's 4. Embedding and head: 2 in forward, 2 in backward, all waited on.
    t_tp = 0.0
    tp_bytes = 0.0
    if dims.tp_enabled:
        one = work.micro_tokens * args.dim * e * _ring(dims.tp)
        t_one = one / _bandwidth(cluster, stride=1, size=dims.tp)
        recomputed_share = recomputed / n
        per_layer_fwd = 4 * t_one
        per_layer_bwd = (2 + 4 * recomputed_share) * t_one + max(0.0, 4 * t_one - t_bwd_block)
        t_tp = n * (per_layer_fwd + per_layer_bwd) + 4 * t_one
        tp_bytes = one * (n * (10 + 4 * recomputed_share) + 4) * work.grad_accum
    t_tp_step = t_tp * work.grad_accum

    # FSDP: each block's all-gather overlaps the previous block's compute, its reduce-scatter (and the
    # HSDP all-reduce) the next block's backward; only what exceeds the compute shows, plus the root's
    # gather, the first block's gather and the last reduction.
    ag = rs = ar = 0.0
    t_fsdp = 0.0
    if dims.fsdp_enabled:
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
        block_fwd_time = t_fwd_block + t_tp / max(n, 1) / 2
        block_bwd_time = t_bwd_block + t_tp / max(n, 1) / 2
        syncs = 1 if parallel.fsdp.defer_grad_sync else work.grad_accum
        bwd_gathers = (n - 1) if parallel.fsdp.reshard_after_forward else 0
        for micro in range(work.grad_accum):
            sync = micro == work.grad_accum - 1 or not parallel.fsdp.defer_grad_sync
            t_fsdp += t_root_ag + t_ag + (n - 1) * max(0.0, t_ag - block_fwd_time)
            bwd_comm = (t_ag if parallel.fsdp.reshard_after_forward else 0.0) + (t_rs + t_ar if sync else 0.0)
            t_fsdp += n * max(0.0, bwd_comm - block_bwd_time)
            if sync:
                t_fsdp += t_rs + t_ar + t_root_reduce
        ag = (root * e * _ring(dims.dp_shard) + ag_block * (n + bwd_gathers)) * work.grad_accum
        rs = (root * reduce * _ring(dims.dp_shard) + rs_block * n) * syncs
        ar = (2 * rehearsal.root.padded_numel * reduce * _ring(dims.dp_replicate) + ar_block * n) * syncs \
            if dims.dp_replicate > 1 else 0.0  # fmt: skip

    compute = (n * (t_fwd_block + t_bwd_block) + t_head) * work.grad_accum
    optimizer = rehearsal.local_numel * OPTIMIZER_BYTES_MOVED / (cluster.hbm_gbps * 1e9)
    return Estimate(
        memory=memory(args, rehearsal=rehearsal, parallel=parallel, work=work, cluster=cluster),
        comm=Comm(fsdp_all_gather=ag, fsdp_reduce_scatter=rs, hsdp_all_reduce=ar, tp=tp_bytes),
        time=StepTime(compute=compute, tp_exposed=t_tp_step, fsdp_exposed=t_fsdp, optimizer=optimizer),
        model_flops_per_gpu=model_flops,
        global_batch_tokens=global_tokens,
        world_size=dims.world_size,
        peak_flops=peak,
        memory_capacity=cluster.memory_bytes,
    )


@dataclass(frozen=True)
class Budget:
    """A training run of ``tokens`` tokens at the estimated step time (the LLaMA paper's section 6 formula),
    and what failures add to it."""

    steps: int
    days: float
    """Failure-free: steps x step time."""
    gpu_hours: float
    mwh: float
    tco2eq: float
    checkpoint_save_s: float = 0.0
    """One save of the model and AdamW state (12 bytes per parameter) at the cluster's write bandwidth."""
    mtbf_hours: float = 0.0
    """The job's mean time between failures at ``cluster.failures_per_gpu_hour``."""
    checkpoint_interval_s: float = 0.0
    """Young/Daly: sqrt(2 x save x MTBF)."""
    expected_goodput: float = 1.0
    """Share of the wall-clock time kept at that interval (saves, recomputed work and restarts excluded)."""

    @property
    def days_with_failures(self) -> float:
        return self.days / self.expected_goodput if self.expected_goodput > 0 else math.inf


CHECKPOINT_BYTES_PER_PARAM = 12
"""fp32 weights and AdamW's two fp32 moments (what trainer/checkpoint saves)."""


def budget(est: Estimate, *, tokens: float, cluster: ClusterConfig, params: int) -> Budget:
    steps = math.ceil(tokens / est.global_batch_tokens)
    seconds = steps * est.time.total
    gpu_hours = seconds / 3600 * est.world_size
    mwh = gpu_hours * cluster.gpu_power_w / 1e6 * cluster.pue
    nodes = max(1, est.world_size // cluster.gpus_per_node)
    save_s = CHECKPOINT_BYTES_PER_PARAM * params / (nodes * cluster.checkpoint_write_gbps * 1e9)
    mtbf_s = job_mtbf_s(gpus=est.world_size, failures_per_gpu_hour=cluster.failures_per_gpu_hour)
    interval_s = young_daly_interval_s(save_s=save_s, mtbf_s=mtbf_s)
    kept = expected_goodput(save_s=save_s, interval_s=interval_s, mtbf_s=mtbf_s, restart_s=cluster.restart_minutes * 60)
    return Budget(steps=steps, days=seconds / 86400, gpu_hours=gpu_hours, mwh=mwh, tco2eq=mwh * cluster.kg_co2_per_kwh,
                  checkpoint_save_s=save_s, mtbf_hours=mtbf_s / 3600, checkpoint_interval_s=interval_s,
                  expected_goodput=kept)  # fmt: skip
