"""Typed configs of the trainer's components: optimizer, training loop, logging.

Modes are ``str`` enums whose names equal their values (OmegaConf 2.3 rejects ``typing.Literal``): YAML
and the command line use plain strings, and a wrong one fails at start-up naming the key.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Optional

from trainer.activation_checkpointing import ACMode


class Device(str, enum.Enum):
    auto = "auto"  # CUDA when available, else CPU
    cpu = "cpu"
    cuda = "cuda"


class Precision(str, enum.Enum):
    auto = "auto"  # bf16 on CUDA; fp32 on CPU, where bf16 matmuls are ~50x slower (shared/ENVIRONMENT.md)
    fp32 = "fp32"
    bf16 = "bf16"  # bf16 compute (autocast), fp32 master weights and optimizer state


class WandbMode(str, enum.Enum):
    offline = "offline"  # writes the run locally; needs no network or key; `wandb sync` uploads it later
    online = "online"
    disabled = "disabled"


@dataclass
class OptimConfig:
    """AdamW with linear warm-up then cosine decay. Defaults are the LLaMA paper's recipe (section 2.2)."""

    lr: float = 3e-4
    """Peak learning rate (LLaMA: 3e-4 for 7B/13B, 1.5e-4 for 33B/65B)."""
    beta1: float = 0.9
    """AdamW beta1."""
    beta2: float = 0.95
    """AdamW beta2."""
    eps: float = 1e-8
    """AdamW epsilon."""
    weight_decay: float = 0.1
    """Decoupled weight decay, applied to matrices only (linear and embedding weights), not RMSNorm gains."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this; 0 disables clipping (the norm is still logged)."""
    warmup_steps: int = 2000
    """Linear warm-up from lr/warmup_steps to lr over this many optimizer steps."""
    min_lr_ratio: float = 0.1
    """Cosine decay ends at lr * min_lr_ratio (LLaMA: 10% of peak)."""
    decay_steps: Optional[int] = None
    """Step at which the cosine reaches its floor; None means trainer.max_steps."""

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise ValueError(f"optim.lr must be positive, got {self.lr}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"optim.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.warmup_steps < 0:
            raise ValueError(f"optim.warmup_steps must be >= 0, got {self.warmup_steps}")


@dataclass
class TrainerConfig:
    """The training loop: length, batch, device, precision, evaluation."""

    max_steps: int = 1000
    """Optimizer steps to run."""
    micro_batch_size: int = 8
    """Sequences per micro-batch on each data-parallel rank."""
    grad_accum_steps: int = 1
    """Micro-batches accumulated per optimizer step."""
    seed: int = 0
    """Seeds weight initialisation and the data order."""
    device: Device = Device.auto
    """auto | cpu | cuda."""
    precision: Precision = Precision.auto
    """auto | fp32 | bf16."""
    tf32: bool = True
    """CUDA only: fp32 matmuls run on TF32 tensor cores (10-bit mantissa inputs, fp32 accumulation), as
    bf16 runs' few fp32 matmuls and most fp32 training want; false keeps full fp32. MFU's peak follows."""
    eval_every: int = 100
    """Run validation every this many steps (and after the last); 0 disables it."""
    eval_steps: int = 10
    """Validation batches per evaluation (the same batches every time)."""
    peak_flops: Optional[float] = None
    """Device peak FLOP/s for MFU; None measures it on CPU and looks it up on known GPUs."""
    save_final_model: bool = False
    """Write the consolidated final weights to ``<run_dir>/final_model.pt`` (for layout comparisons)."""

    def __post_init__(self) -> None:
        self.device = Device(self.device)
        self.precision = Precision(self.precision)
        for key in ("max_steps", "micro_batch_size", "grad_accum_steps"):
            if getattr(self, key) <= 0:
                raise ValueError(f"trainer.{key} must be positive, got {getattr(self, key)}")
        if self.eval_every < 0 or self.eval_steps < 0:
            raise ValueError("trainer.eval_every and trainer.eval_steps must be >= 0")


class ReduceDtype(str, enum.Enum):
    fp32 = "fp32"  # gradients reduced in fp32 even when computed in bf16 (the default: no precision lost in sums)
    bf16 = "bf16"  # half the communication volume, at the cost of rounding in the reduction


@dataclass
class ParallelConfig:
    """How the processes split the work: data-parallel replicate x data-parallel shard x tensor parallel.

    The three degrees multiply to the world size; ``dp_shard=-1`` takes whatever the other two leave.
    HSDP: ``dp_replicate`` > 1 replicates across groups (e.g. nodes) and shards within each.
    """

    dp_replicate: int = 1
    """Replicas of the sharded model (HSDP's replicate degree); gradients are all-reduced across them."""
    dp_shard: int = -1
    """FSDP degree: parameters, gradients and optimizer state are sharded over this many ranks; -1 = the rest."""
    tp: int = 1
    """Tensor (+ sequence) parallel degree, Megatron layout; must divide heads, kv heads and the vocabulary."""
    fsdp_one_rank: bool = False
    """Apply FSDP2 even where the data-parallel degree is 1 (one GPU, or TP only): bf16 through FSDP's
    mixed precision (bf16 parameters, fp32 gradient reduction) instead of autocast, i.e. the multi-GPU
    code path on one device. One process starts a single-rank process group for it."""
    reshard_after_forward: bool = True
    """FSDP frees gathered parameters after each block's forward (ZeRO-3); False keeps them until backward."""
    reduce_dtype: ReduceDtype = ReduceDtype.fp32
    """Dtype of the gradient reduce-scatter/all-reduce when computing in bf16."""
    defer_grad_sync: bool = True
    """With gradient accumulation, reduce gradients only after the last micro-batch, not after each."""
    overlap_comm: bool = True
    """Overlap communication with compute: TP backward runs the independent GEMM while its all-gather or
    reduce-scatter is in flight; false waits at once (same arithmetic; for measuring what overlap buys)."""
    fsdp_prefetch: bool = True
    """FSDP: each block explicitly prefetches the next block's all-gather (forward) and the previous one's
    (backward), issued asynchronously, so parameter gathering overlaps the current block's compute."""
    activation_checkpoint: ACMode = ACMode.selective
    """none | selective | selective_ffn | full | every_k: what the blocks recompute in backward instead of keeping."""
    compile: bool = False
    """torch.compile each transformer block (after TP and activation checkpointing, before FSDP)."""
    ac_every_k: int = 2
    """With activation_checkpoint=every_k: blocks 0, k, 2k, ... are recomputed."""

    def __post_init__(self) -> None:
        self.reduce_dtype = ReduceDtype(self.reduce_dtype)
        self.activation_checkpoint = ACMode(self.activation_checkpoint)
        if self.ac_every_k < 1:
            raise ValueError(f"parallel.ac_every_k must be >= 1, got {self.ac_every_k}")
        for key in ("dp_replicate", "tp"):
            if getattr(self, key) < 1:
                raise ValueError(f"parallel.{key} must be >= 1, got {getattr(self, key)}")
        if self.dp_shard < 1 and self.dp_shard != -1:
            raise ValueError(f"parallel.dp_shard must be >= 1 or -1 (the rest of the world), got {self.dp_shard}")


@dataclass
class CheckpointConfig:
    """Distributed checkpoints (torch.distributed.checkpoint) of everything a run needs to continue."""

    dir: Optional[str] = None
    """Where checkpoints go; None means ``<run_dir>/checkpoints``."""
    every_steps: int = 1000
    """Save every this many steps (0: not by step count). A run that dies without a stop signal (a node
    failure, an OOM kill) restarts from the newest of these."""
    every_minutes: float = 60.0
    """Also save when this many minutes have passed since the last save (or the start), whatever the step
    count (0: not by time): the bound on lost work when steps are slow or their speed unknown."""
    save_final: bool = True
    """Save after the last step."""
    keep_last_k: int = 3
    """Keep this many newest complete checkpoints, delete older ones; 0 keeps all."""
    async_save: bool = False
    """Stage tensors to host memory, then write them from a background thread while training goes on."""
    resume: Optional[str] = "auto"
    """auto: continue from the newest complete checkpoint in ``dir`` if there is one; a path: from that one
    (it must exist); null: never resume."""
    init_from: Optional[str] = None
    """A checkpoint to take the model weights from (not optimizer or data state) when not resuming, e.g. one
    written by ``python -m trainer.hf_interop import``."""
    save_on_signal: bool = True
    """On SIGUSR2 or SIGTERM, save a checkpoint at the end of the current step and stop (Slurm preemption)."""

    def __post_init__(self) -> None:
        if self.every_steps < 0 or self.keep_last_k < 0 or self.every_minutes < 0:
            raise ValueError("checkpoint.every_steps, checkpoint.every_minutes and checkpoint.keep_last_k must be >= 0")


@dataclass
class LoggingConfig:
    """Where metrics go: console, a JSONL file in the run directory, wandb."""

    log_every: int = 10
    """Log training metrics every this many steps (and at the first and last)."""
    sinks: list[str] = field(default_factory=lambda: ["jsonl", "wandb"])
    """Where records go besides the console (trainer/metrics.py ``SINKS``): jsonl (<run_dir>/metrics.jsonl,
    what resume and the tools read), wandb (as wandb_mode says)."""
    wandb_mode: WandbMode = WandbMode.offline
    """offline | online | disabled. Offline needs no network or API key."""
    project: str = "llama-pretrain"
    """wandb project."""
    entity: Optional[str] = None
    """wandb entity (team); None is the key's default."""
    run_name: Optional[str] = None
    """wandb run name; None uses the run directory's name (under --multirun: the job's overrides)."""
    group: Optional[str] = None
    """wandb group; None: runs are ungrouped, except that --multirun groups its jobs under the sweep's name."""
    system_metrics: Optional[bool] = None
    """wandb samples GPU utilisation, memory and power (and CPU, disk, network); None: on with CUDA, off on
    CPU (a sampler thread would compete with training for the cores)."""

    def __post_init__(self) -> None:
        self.wandb_mode = WandbMode(self.wandb_mode)
        if self.log_every <= 0:
            raise ValueError(f"logging.log_every must be positive, got {self.log_every}")


@dataclass
class ProfileConfig:
    """torch.profiler traces of a few steps (``profile.step=5``), for finding where a step's time goes."""

    step: int = 0
    """If > 0: record steps step .. step + steps - 1 and write a chrome trace per rank to
    <run_dir>/profile/rank<r>.json."""
    steps: int = 2
    """How many steps the profiler records."""

    def __post_init__(self) -> None:
        if self.step < 0 or self.steps < 1:
            raise ValueError(f"profile.step must be >= 0 (0: off) and profile.steps >= 1; got {self.step} and {self.steps}")
