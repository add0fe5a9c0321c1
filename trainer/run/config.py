"""Typed configs of the run: the optimizer, the training loop, logging, profiling.

Modes are ``str`` enums whose names equal their values (OmegaConf 2.3 rejects ``typing.Literal``): YAML
and the command line use plain strings, and a wrong one fails at start-up naming the key.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Optional

from trainer.run.goodput import LLAMA3_FAILURES_PER_GPU_HOUR


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
    memory_history: bool = True
    """CUDA: record the allocator's history (the last 100,000 allocations, with Python stacks) so that an
    out-of-memory error leaves a snapshot of what held the memory (trainer/run/oom.py)."""
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


@dataclass
class LoggingConfig:
    """Where metrics go: console, a JSONL file in the run directory, wandb."""

    log_every: int = 10
    """Log training metrics every this many steps (and at the first and last)."""
    sinks: list[str] = field(default_factory=lambda: ["jsonl", "wandb"])
    """Where records go besides the console (trainer/run/metrics.py ``SINKS``): jsonl (<run_dir>/metrics.jsonl,
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


class SpikeAction(str, enum.Enum):
    warn = "warn"  # log it (metrics, summary) and train on
    skip = "skip"  # skip the optimizer step on every rank: the weights stay those of the step before
    rollback = "rollback"  # reload the newest checkpoint from before the spike and never train on its batches
    stop = "stop"  # skip the update and stop the run with an error naming the step and its batches


@dataclass
class SpikeConfig:
    """The loss-spike guard (trainer/run/components/spike_guard.py): what counts as a spike, what to do.

    A step is a spike when its loss exceeds the running mean of the recent losses by ``loss_sigmas``
    running standard deviations, or its gradient norm (before clipping) exceeds ``grad_norm_ratio`` times
    the running median of the recent norms. Both statistics are taken over the last ``window`` steps that
    were not spikes, and only once ``min_history`` of them exist (the first steps of a run move fast).
    """

    enabled: bool = True
    action: SpikeAction = SpikeAction.skip
    loss_sigmas: float = 6.0
    """A 6-sigma rise: for Gaussian noise one false alarm in ~10^9 steps, and still ~1 in 10^4 for the heavy
    tails real loss curves have, i.e. a handful over a 500k-step run; the spikes PaLM and OPT report rose by
    far more than 6 of their window's deviations in a step. 0 turns the loss test off."""
    grad_norm_ratio: float = 10.0
    """Pre-clip gradient norms wander by 2-3x around their median in a healthy run (warm-up aside, which
    ``min_history`` covers); a spike's batch multiplies it by 10-100x. 0 turns the gradient test off."""
    window: int = 100
    """Steps of history the statistics are taken over."""
    min_history: int = 50
    """Steps of history needed before anything counts as a spike."""
    rollback_skip_steps: int = 1
    """With rollback: how many steps' batches, ending with the spike's, are never trained on (PaLM skipped
    200-500 batches around each spike; 1 skips just the batch that spiked)."""
    max_rollbacks: int = 3
    """With rollback: more than this many rollbacks within ``rollback_window`` steps stops the run."""
    rollback_window: int = 1000

    def __post_init__(self) -> None:
        self.action = SpikeAction(self.action)
        if self.loss_sigmas < 0 or self.grad_norm_ratio < 0:
            raise ValueError("spike.loss_sigmas and spike.grad_norm_ratio must be >= 0 (0 turns a test off)")
        if self.window < 2 or not 2 <= self.min_history <= self.window:
            raise ValueError(f"spike.window ({self.window}) must be >= 2 and spike.min_history ({self.min_history}) "
                             "between 2 and spike.window")  # fmt: skip
        if self.rollback_skip_steps < 1 or self.max_rollbacks < 0 or self.rollback_window < 1:
            raise ValueError("spike.rollback_skip_steps and spike.rollback_window must be >= 1, spike.max_rollbacks >= 0")


@dataclass
class StragglerConfig:
    """The straggler monitor (trainer/run/components/straggler.py): every ``every_steps`` steps each rank
    times the same matmul on its own device and the ranks compare (one small all-gather)."""

    every_steps: int = 100
    """How often the ranks compare (0: never). One probe costs a few matmuls: ~1 ms on a GPU at 7B widths."""
    warn_ratio: float = 1.2
    """Warn when the slowest rank's time is this many times the median's. GPUs of one model differ by a few
    percent in matmul speed; a throttled or faulty one (or a host whose CPU is shared) falls 20%+ behind,
    and under synchronous data parallelism every rank then waits for it."""

    def __post_init__(self) -> None:
        if self.every_steps < 0 or self.warn_ratio <= 1.0:
            raise ValueError("straggler.every_steps must be >= 0 and straggler.warn_ratio > 1")


@dataclass
class WatchdogConfig:
    """The hang watchdog (trainer/run/components/watchdog.py): when the run makes no progress for too long,
    every rank writes where it is stuck to ``<run_dir>/hang/rank<N>.txt`` and exits with code 86, so that
    torchrun's ``--max-restarts`` (or the Slurm job's requeue) restarts it from the newest checkpoint.

    Progress is a finished step, or the end of side work. Its allowance (``timeout``) depends on what the
    run is doing: the training steps get ``timeout_s``, the first step (compile, first collectives)
    ``first_step_timeout_s``, a checkpoint save or an evaluation ``side_work_timeout_s``. Keep all of them
    below ``parallel.pg_timeout_s``, so that the watchdog, not the process group's bare timeout, reports a
    hang (a warning at start says when they are not).
    """

    enabled: bool = True
    timeout_s: Optional[float] = None
    """Seconds without a finished step before a hang is declared; None: ``step_multiple`` times the slowest
    step so far, at least ``min_timeout_s``."""
    step_multiple: float = 20.0
    """A step 20x slower than the slowest seen so far is no longer noise (a GC pause, a slow data read, a
    checkpoint's background write competing are a few x at most)."""
    min_timeout_s: float = 600.0
    """The floor of the automatic timeout: a fast step times 20 could be seconds, below what a slow file
    system or a busy network can stall a healthy step for."""
    first_step_timeout_s: float = 1800.0
    """Before any step has finished: compilation and the first collectives of a 65B run take minutes."""
    side_work_timeout_s: float = 3600.0
    """A checkpoint save or an evaluation (a 65B checkpoint is ~800 GB of optimizer state to write)."""
    poll_s: float = 5.0
    """How often the watchdog thread looks."""
    grace_s: float = 15.0
    """After writing its report a rank waits this long before exiting, so that the other ranks' watchdogs
    (which fire within ``poll_s`` of each other) write theirs before the launcher stops them."""

    def __post_init__(self) -> None:
        for key in ("min_timeout_s", "first_step_timeout_s", "side_work_timeout_s", "poll_s", "step_multiple"):
            if getattr(self, key) <= 0:
                raise ValueError(f"watchdog.{key} must be positive, got {getattr(self, key)}")
        if self.timeout_s is not None and self.timeout_s <= 0:
            raise ValueError(f"watchdog.timeout_s must be positive (or null: automatic), got {self.timeout_s}")
        if self.grace_s < 0:
            raise ValueError(f"watchdog.grace_s must be >= 0, got {self.grace_s}")

    def longest_s(self) -> float:
        """The longest fixed allowance (the automatic step timeout counts as its floor, ``min_timeout_s``)."""
        return max(self.timeout_s or self.min_timeout_s, self.first_step_timeout_s, self.side_work_timeout_s)


@dataclass
class GoodputConfig:
    """Where the run's time goes (trainer/run/components/goodput.py, trainer/run/goodput.py)."""

    enabled: bool = True
    record_every_s: float = 60.0
    """Rank 0 appends a record to ``<run_dir>/events.jsonl`` this often: a crash loses at most this much of
    the accounting (it counts as part of the restart)."""
    failures_per_gpu_hour: float = LLAMA3_FAILURES_PER_GPU_HOUR
    """For the checkpoint-interval advice: Llama 3's 419 unexpected interruptions in 54 days on 16,384 GPUs."""

    def __post_init__(self) -> None:
        if self.record_every_s <= 0 or self.failures_per_gpu_hour <= 0:
            raise ValueError("goodput.record_every_s and goodput.failures_per_gpu_hour must be positive")
