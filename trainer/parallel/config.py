"""Typed config of parallelism (``parallel.*``), one dataclass per concern.

- ``ParallelConfig``: the layout (the degrees ``trainer.parallel.dims.ParallelDims`` validates and builds
  meshes from), the TP layers' one setting, and the three concerns below, each handed to the step of
  ``parallelize_llama`` that applies it and to nothing else:
- ``FSDPConfig`` (``parallel.fsdp.*``): how FSDP2 shards, casts, reduces and prefetches;
- ``ACConfig`` (``parallel.ac.*``): the activation-checkpointing policy;
- ``compile`` (a flag): torch.compile per block.

Modes are ``str`` enums (OmegaConf 2.3 rejects ``typing.Literal``): YAML and the command line use the plain
strings, and a wrong one fails at start-up naming the key.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from trainer.parallel.activation_checkpointing import ACMode


class ReduceDtype(str, enum.Enum):
    fp32 = "fp32"  # gradients reduced in fp32 even when computed in bf16 (the default: no precision lost in sums)
    bf16 = "bf16"  # half the communication volume, at the cost of rounding in the reduction


@dataclass
class FSDPConfig:
    """FSDP2 over the data-parallel axes: what it keeps gathered, in which dtype it reduces, when it
    synchronises and how far ahead it gathers."""

    one_rank: bool = False
    """Apply FSDP2 even where the data-parallel degree is 1 (one GPU, or TP only): bf16 through FSDP's
    mixed precision (bf16 parameters, fp32 gradient reduction) instead of autocast, i.e. the multi-GPU
    code path on one device. One process starts a single-rank process group for it."""
    reshard_after_forward: bool = True
    """Free gathered parameters after each block's forward (ZeRO-3); False keeps them until backward."""
    reduce_dtype: ReduceDtype = ReduceDtype.fp32
    """Dtype of the gradient reduce-scatter/all-reduce when computing in bf16."""
    defer_grad_sync: bool = True
    """With gradient accumulation, reduce gradients only after the last micro-batch, not after each."""
    prefetch: bool = True
    """Each block explicitly prefetches the next block's all-gather (forward) and the previous one's
    (backward), issued asynchronously, so parameter gathering overlaps the current block's compute."""

    def __post_init__(self) -> None:
        self.reduce_dtype = ReduceDtype(self.reduce_dtype)


@dataclass
class ACConfig:
    """Activation checkpointing: what the blocks keep for backward (trainer/parallel/activation_checkpointing.py)."""

    mode: ACMode = ACMode.selective
    """none | selective | selective_ffn | full | every_k: what the blocks recompute in backward instead of keeping."""
    every_k: int = 2
    """With mode=every_k: blocks 0, k, 2k, ... are recomputed."""

    def __post_init__(self) -> None:
        self.mode = ACMode(self.mode)
        if self.every_k < 1:
            raise ValueError(f"parallel.ac.every_k must be >= 1, got {self.every_k}")


class PPSchedule(str, enum.Enum):
    """Pipeline schedules (torch.distributed.pipelining; docs/pipeline.md). GPipe runs every micro-batch's
    forward, then every backward; 1F1B alternates one forward and one backward after a warm-up, so at most
    ``pp`` micro-batches' activations are in flight instead of all of them (the same bubble,
    (p - 1) / (m + p - 1)). Interleaved 1F1B gives each rank v stages (``pp_virtual_stages``, looped:
    rank r holds stages r, r + p, ...), dividing the bubble by v for v times the point-to-point traffic.
    The zero-bubble schedules split each backward into the input gradient, sent at once, and the weight
    gradient, run later in what would have been the bubble (model/ops/deferred.py): ``zero_bubble`` is
    torch's ZB1P (looped, any v; v = 1 is ZB-H1), ``zbv`` the V-shaped one (v = 2: rank r holds stages r
    and 2p - 1 - r)."""

    gpipe = "gpipe"
    one_f_one_b = "1f1b"
    interleaved_1f1b = "interleaved_1f1b"
    zero_bubble = "zero_bubble"
    zbv = "zbv"

    @property
    def splits_backward(self) -> bool:
        """Runs weight gradients apart from input gradients."""
        return self in (PPSchedule.zero_bubble, PPSchedule.zbv)


@dataclass
class ParallelConfig:
    """How the processes split the work (data-parallel replicate x data-parallel shard x tensor parallel) and
    how the model is transformed for it.

    The three degrees multiply to the world size; ``dp_shard=-1`` takes whatever the other two leave.
    HSDP: ``dp_replicate`` > 1 replicates across groups (e.g. nodes) and shards within each.
    """

    dp_replicate: int = 1
    """Replicas of the sharded model (HSDP's replicate degree); gradients are all-reduced across them."""
    dp_shard: int = -1
    """FSDP degree: parameters, gradients and optimizer state are sharded over this many ranks; -1 = the rest."""
    tp: int = 1
    """Tensor (+ sequence) parallel degree, Megatron layout; must divide heads, kv heads and the vocabulary."""
    pp: int = 1
    """Pipeline stages: the blocks split into ``pp`` consecutive stages (the first owns the embedding, the
    last the final norm and the head), the outermost mesh axis. Composes with FSDP/HSDP (each stage
    sharded over its data-parallel ranks) and TP/SP (inside each stage) (docs/pipeline.md)."""
    pp_schedule: PPSchedule = PPSchedule.one_f_one_b
    pp_virtual_stages: int = 0
    """Stages per rank: 0 = the schedule's own (2 for interleaved_1f1b and zbv, 1 otherwise); more than 1
    needs a looped or V schedule (interleaved_1f1b, zero_bubble; zbv takes exactly 2)."""
    pp_microbatches: int = 0
    """Micro-batches each step's local batch is cut into for the pipeline; 0: ``pp`` (the least that fills
    it). More shrink the bubble, (p - 1) / (m + p - 1), and must divide the micro-batch size."""
    tp_overlap: bool = True
    """TP backward runs the independent GEMM while its all-gather or reduce-scatter is in flight; false
    waits at once (same arithmetic; for measuring what overlap buys)."""
    fsdp: FSDPConfig = field(default_factory=FSDPConfig)
    ac: ACConfig = field(default_factory=ACConfig)
    compile: bool = False
    """torch.compile each transformer block (after TP and activation checkpointing, before FSDP)."""
    pg_timeout_s: float = 7200.0
    """The process group's timeout: a collective that waits longer fails (NCCL aborts the communicator).
    Above every allowance of the hang watchdog (``watchdog.*``, at most an hour by default), so that a hang
    is reported by the watchdog, with every rank's stacks, rather than by this bare timeout."""

    def __post_init__(self) -> None:
        self.pp_schedule = PPSchedule(self.pp_schedule)
        if self.pp_virtual_stages < 0:
            raise ValueError(f"parallel.pp_virtual_stages must be >= 0 (0: the schedule's own), got {self.pp_virtual_stages}")
        self.pp_stages_per_rank  # the schedule takes that many stages per rank, or the error says so
        if self.pp_microbatches < 0:
            raise ValueError(f"parallel.pp_microbatches must be >= 0 (0: as many as stages), got {self.pp_microbatches}")
        for key in ("dp_replicate", "tp", "pp"):
            if getattr(self, key) < 1:
                raise ValueError(f"parallel.{key} must be >= 1, got {getattr(self, key)}")
        if self.pg_timeout_s <= 0:
            raise ValueError(f"parallel.pg_timeout_s must be positive, got {self.pg_timeout_s}")
        if self.dp_shard < 1 and self.dp_shard != -1:
            raise ValueError(f"parallel.dp_shard must be >= 1 or -1 (the rest of the world), got {self.dp_shard}")


    @property
    def pp_stages_per_rank(self) -> int:
        """``pp_virtual_stages`` resolved for ``pp_schedule`` (0: the schedule's own), or the error."""
        schedule, v = self.pp_schedule, self.pp_virtual_stages
        v = v or (2 if schedule in (PPSchedule.interleaved_1f1b, PPSchedule.zbv) else 1)
        if schedule in (PPSchedule.gpipe, PPSchedule.one_f_one_b) and v != 1:
            raise ValueError(f"parallel.pp_schedule={schedule.value} runs one stage per rank, but parallel.pp_virtual_stages="
                             f"{v}: use interleaved_1f1b or zero_bubble for several, or pp_virtual_stages=1")  # fmt: skip
        if schedule == PPSchedule.zbv and v != 2:
            raise ValueError(f"parallel.pp_schedule=zbv holds exactly 2 stages per rank (a V), got parallel.pp_virtual_stages={v}")
        return v


RENAMED_KEYS = {
    "parallel.fsdp_one_rank": "parallel.fsdp.one_rank",
    "parallel.reshard_after_forward": "parallel.fsdp.reshard_after_forward",
    "parallel.reduce_dtype": "parallel.fsdp.reduce_dtype",
    "parallel.defer_grad_sync": "parallel.fsdp.defer_grad_sync",
    "parallel.fsdp_prefetch": "parallel.fsdp.prefetch",
    "parallel.overlap_comm": "parallel.tp_overlap",
    "parallel.activation_checkpoint": "parallel.ac.mode",
    "parallel.ac_every_k": "parallel.ac.every_k",
}
"""Keys of the flat ``ParallelConfig`` before it was split by concern (2026-12), and where each went: an
error naming an old key says its new name (``launch.local``, ``conf.schema.to_config``)."""
