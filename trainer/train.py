"""Training entry point, for one process or many (under torchrun).

    python -m trainer.train                                   # one process
    torchrun --nproc-per-node 2 -m trainer.train parallel.tp=2
    python -m launch.local --nproc 4 parallel.dp_replicate=2  # see launch/

``main`` is the only Hydra-decorated function; tests call ``train(cfg, run_dir=...)`` directly.

Order of construction: process group -> mesh -> data (rank 0 first) -> model on the meta device ->
parallelise (TP, FSDP) -> materialise with ``to_empty`` -> initialise -> optimizer.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import os
import re
import signal
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, Iterator, Optional

import hydra
import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from conf.schema import Config, to_config
from data import DataConfig, PackedLoader, PreparedData, prepare_data
from model.config import ModelArgs
from model.flops import flops_per_token, param_counts
from model.llama import Transformer
from trainer.checkpoint import Checkpointer
from trainer.config import ParallelConfig
from trainer.device import configure_matmul_precision, memory_stats, peak_flops, resolve_device, resolve_dtype
from trainer.distributed import DistEnv, init_distributed, shutdown_distributed
from trainer.initialize import init_parameters
from trainer.metrics import MetricLogger, system_metrics_enabled
from trainer.optim import build_lr_scheduler, build_optimizer
from trainer.parallel_dims import Meshes, ParallelDims
from trainer.parallelize import parallelize_llama
from trainer.profiling import StepProfiler
from trainer.step import ComputeContext, evaluate, train_step

logger = logging.getLogger(__name__)


@dataclass
class TrainResult:
    """What a finished run reports (also written to ``summary.json`` in the run directory)."""

    losses: list[float] = field(default_factory=list)
    """Training loss of every step this process ran (the global batch's mean), from ``first_step`` on."""
    first_step: int = 1
    """1, or the step after the checkpoint this run resumed from."""
    val_losses: dict[int, float] = field(default_factory=dict)
    """Validation loss by step."""
    tokens: int = 0
    """Training tokens consumed, all ranks together."""
    tokens_per_sec: float = 0.0
    """Global throughput over the whole run, evaluation excluded."""
    wall_time_s: float = 0.0
    world_size: int = 1
    checkpoint_stall_s: list[float] = field(default_factory=list)
    """Seconds each checkpoint save held training up."""
    stopped_by_signal: bool = False


def check_data_fits_model(*, model: ModelArgs, prepared: PreparedData, seq_len: int) -> None:
    if prepared.vocab_size != model.vocab_size:
        raise ValueError(
            f"model.vocab_size={model.vocab_size} does not match the tokenizer's vocabulary of "
            f"{prepared.vocab_size} ({prepared.tokenizer_path}). Set model.vocab_size={prepared.vocab_size}, "
            f"or train a tokenizer of {model.vocab_size} tokens with data.tokenizer.vocab_size={model.vocab_size}."
        )
    if seq_len > model.max_seq_len:
        raise ValueError(
            f"data.seq_len={seq_len} exceeds model.max_seq_len={model.max_seq_len}: lower data.seq_len or "
            f"raise model.max_seq_len"
        )


def prepare_data_rank0_first(cfg: DataConfig, *, env: DistEnv) -> PreparedData:
    """Rank 0 trains the tokenizer and writes the shards; the others then find them finished and load them.

    The others wait in a barrier of a gloo group of its own whose timeout is ``data.prepare_timeout_minutes``:
    preparing a large corpus outlasts the default group's 10 minutes (NCCL's watchdog would abort the job).
    If rank 0 fails instead, its exit ends the job (torchrun stops the other workers).
    """
    waiting = None
    if env.world_size > 1:
        waiting = dist.new_group(backend="gloo", timeout=timedelta(minutes=cfg.prepare_timeout_minutes))
    if env.is_rank0:
        prepared = prepare_data(cfg)
    if waiting is not None:
        dist.barrier(group=waiting)
        dist.destroy_process_group(waiting)
    if not env.is_rank0:
        prepared = prepare_data(cfg)
    return prepared


def build_model(
    args: ModelArgs,
    *,
    device: torch.device,
    seed: int,
    meshes: Optional[Meshes] = None,
    dims: Optional[ParallelDims] = None,
    parallel: Optional[ParallelConfig] = None,
    compute_dtype: torch.dtype = torch.float32,
) -> Transformer:
    """Build on meta (no memory), parallelise, materialise on ``device``, then initialise under ``seed``:
    the same weights for every layout (``trainer.initialize``)."""
    with torch.device("meta"):
        model = Transformer(args)
    if parallel is not None:
        parallelize_llama(model, meshes=meshes, dims=dims, cfg=parallel, compute_dtype=compute_dtype)
    model.to_empty(device=device)
    model.init_buffers(device=device)
    init_parameters(model, seed=seed)
    return model


def batches_to(device: torch.device, loader: Iterator[dict]) -> Iterator[dict[str, torch.Tensor]]:
    """The loader's CPU batches on ``device``. To a GPU through pinned memory: a copy from pageable memory
    would block the host until it is done, so the host could not queue the step's forward behind it."""
    for batch in loader:
        if device.type == "cuda":
            batch = {k: v.pin_memory() for k, v in batch.items()}
        yield {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def train(cfg: Config, *, run_dir: Path) -> TrainResult:
    """Run training as configured, writing config, metrics and wandb files under ``run_dir`` (rank 0)."""
    env = DistEnv.from_environ()
    if cfg.parallel.tp > 1:
        # The TP backward overlaps a collective with a GEMM by issuing the collective first; with one
        # hardware queue per device (read when CUDA starts, so set before) kernels start in issue order
        # and the GEMM cannot take every SM first (Megatron sets the same). No effect on CPU.
        os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")
    device = resolve_device(cfg.trainer.device, local_rank=env.local_rank)
    configure_matmul_precision(device=device, tf32=cfg.trainer.tf32)
    init_distributed(env, device=device, one_rank=cfg.parallel.fsdp_one_rank)
    try:
        return _train(cfg, run_dir=Path(run_dir), env=env, device=device)
    finally:
        shutdown_distributed()


def _train(cfg: Config, *, run_dir: Path, env: DistEnv, device: torch.device) -> TrainResult:
    started = time.perf_counter()
    dims = ParallelDims.from_config(cfg.parallel, world_size=env.world_size)
    dims.check_model(cfg.model)
    dims.check_seq_len(cfg.data.seq_len)
    meshes = dims.build_meshes(device_type=device.type)
    dtype = resolve_dtype(cfg.trainer.precision, device=device)
    dp_mesh = meshes.dp if meshes is not None else None
    ctx = ComputeContext(device=device, dtype=dtype, dp_mesh=dp_mesh, dp=dims.dp, tp_enabled=dims.tp_enabled,
                         fsdp_mixed_precision=dims.fsdp_enabled)  # fmt: skip

    prepared = prepare_data_rank0_first(cfg.data, env=env)
    check_data_fits_model(model=cfg.model, prepared=prepared, seq_len=cfg.data.seq_len)
    model = build_model(cfg.model, device=device, seed=cfg.trainer.seed, meshes=meshes, dims=dims,
                        parallel=cfg.parallel, compute_dtype=dtype)  # fmt: skip
    optimizer = build_optimizer(model, cfg.optim)
    scheduler = build_lr_scheduler(optimizer, cfg.optim, max_steps=cfg.trainer.max_steps)
    dp_rank = dp_mesh.get_local_rank() if dp_mesh is not None else 0
    train_loader = PackedLoader(
        prepared, split="train", seq_len=cfg.data.seq_len, batch_size=cfg.trainer.micro_batch_size,
        dp_rank=dp_rank, dp_size=dims.dp, seed=cfg.trainer.seed,
    )  # fmt: skip

    run_config = OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True, enum_to_str=True)
    if env.is_rank0:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(run_config))
    checkpointer = Checkpointer(cfg.checkpoint, run_dir=run_dir)
    result = TrainResult(world_size=env.world_size)
    wandb_id = _restore(cfg, checkpointer=checkpointer, model=model, optimizer=optimizer, scheduler=scheduler,
                        loader=train_loader, result=result)  # fmt: skip
    metrics = MetricLogger(cfg.logging, run_dir=run_dir, run_config=run_config, enabled=env.is_rank0,
                           wandb_id=wandb_id, resumed=result.first_step > 1,
                           system_metrics=system_metrics_enabled(cfg.logging.system_metrics, device_type=device.type))  # fmt: skip
    counts = param_counts(cfg.model)
    flops_tok = flops_per_token(cfg.model, seq_len=cfg.data.seq_len)
    peak = peak_flops(device=device, dtype=dtype, override=cfg.trainer.peak_flops, tf32=cfg.trainer.tf32)
    peak = peak * env.world_size if peak is not None else None
    logger.info(
        "model: %s parameters (%s non-embedding), %.3g training FLOPs/token; layout dp_replicate=%d dp_shard=%d "
        "tp=%d on %d processes; %s %s; peak %s FLOP/s (all processes); run dir %s", f"{counts.total:,}",
        f"{counts.non_embedding:,}", flops_tok, dims.dp_replicate, dims.dp_shard, dims.tp, env.world_size,
        device.type, dtype, "unknown" if peak is None else f"{peak:.3g}", run_dir,
    )  # fmt: skip

    run = _Run(cfg=cfg, model=model, optimizer=optimizer, scheduler=scheduler, train_loader=train_loader,
               prepared=prepared, metrics=metrics, checkpointer=checkpointer, ctx=ctx, dp_rank=dp_rank,
               flops_per_token=flops_tok, peak=peak, run_config=run_config, result=result,
               profiler=StepProfiler(run_dir=run_dir, rank=env.rank, first=cfg.logging.profile_step,
                                     steps=cfg.logging.profile_steps))  # fmt: skip
    try:
        with _StopSignals(enabled=cfg.checkpoint.save_on_signal) as stop:
            _loop(run, stop=stop)
        checkpointer.wait()
    finally:
        run.profiler.stop()
        metrics.close()
    result.wall_time_s = time.perf_counter() - started
    if cfg.trainer.save_final_model:
        _save_full_model(model, path=run_dir / "final_model.pt", is_rank0=env.is_rank0)
    if env.is_rank0:
        (run_dir / "summary.json").write_text(json.dumps(asdict(result), indent=1))
    return result


def _restore(cfg: Config, *, checkpointer: Checkpointer, model, optimizer, scheduler, loader,
             result: TrainResult) -> Optional[str]:  # fmt: skip
    """Resume from a checkpoint, or take initial weights from one; returns the wandb run id to continue."""
    path = checkpointer.resume_path()
    if path is not None:
        meta = checkpointer.load(path, model=model, optimizer=optimizer, scheduler=scheduler, loader=loader,
                                 args=cfg.model)  # fmt: skip
        result.first_step = meta["step"] + 1
        result.tokens = meta["tokens"]
        return meta.get("wandb_id")
    if cfg.checkpoint.init_from is not None:
        checkpointer.load_model_only(Path(cfg.checkpoint.init_from), model=model, args=cfg.model)
    return None


def _save_full_model(model: torch.nn.Module, *, path: Path, is_rank0: bool) -> None:
    """Consolidated fp32 weights on rank 0 (a collective: every rank must call it)."""
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if is_rank0:
        torch.save(state, path)


@dataclass
class _Run:
    """The parts of a run the loop needs, built once by ``_train``."""

    cfg: Config
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    train_loader: PackedLoader
    prepared: PreparedData
    metrics: MetricLogger
    checkpointer: Checkpointer
    ctx: ComputeContext
    dp_rank: int
    flops_per_token: int
    peak: Optional[float]
    """Peak FLOP/s of all processes together; None where unknown (no MFU is logged)."""
    run_config: dict
    result: TrainResult
    profiler: StepProfiler


class _StopSignals:
    """SIGUSR2 / SIGTERM (Slurm's preemption warning, a scheduler's stop) ask for a checkpoint and a clean stop.

    The handler only sets a flag; the loop acts on it at the end of a step, after every rank has agreed
    (a collective), so all ranks save the same step.
    """

    SIGNALS = (signal.SIGUSR2, signal.SIGTERM)

    def __init__(self, *, enabled: bool):
        # Signal handlers can only be installed from the main thread (tests may run training elsewhere).
        self.enabled = enabled and threading.current_thread() is threading.main_thread()
        self.received: Optional[int] = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> _StopSignals:
        if self.enabled:
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.received = signum

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)



def agree(flags: dict[str, bool], *, device: torch.device) -> dict[str, bool]:
    """Each flag true on every rank when it is true on any (one all-reduce for all of them): a decision to
    save or stop that differed between ranks would deadlock their collectives."""
    values = torch.tensor([int(v) for v in flags.values()], device=device)
    if dist.is_initialized():
        dist.all_reduce(values, op=dist.ReduceOp.MAX)
    return dict(zip(flags, (bool(v) for v in values.tolist())))


def _loop(run: _Run, *, stop: _StopSignals) -> None:
    cfg, tcfg, result, ctx = run.cfg, run.cfg.trainer, run.result, run.ctx
    batches = batches_to(ctx.device, run.train_loader)
    every, every_s = cfg.checkpoint.every_steps, cfg.checkpoint.every_minutes * 60
    last_save = time.monotonic()
    window_start, window_steps, window_tokens, window_data_s, train_s = time.perf_counter(), 0, 0, 0.0, 0.0
    for step in range(result.first_step, tcfg.max_steps + 1):
        run.profiler.step_begin(step)
        t0 = time.perf_counter()
        micro_batches = list(itertools.islice(batches, tcfg.grad_accum_steps))
        data_s = time.perf_counter() - t0
        out = train_step(run.model, run.optimizer, run.scheduler, micro_batches, ctx=ctx,
                         grad_clip=cfg.optim.grad_clip, defer_grad_sync=cfg.parallel.defer_grad_sync, step=step)  # fmt: skip
        run.profiler.step_end(step)
        result.losses.append(out.loss)
        result.tokens += out.tokens
        window_steps += 1
        window_tokens += out.tokens
        window_data_s += data_s
        run.checkpointer.poll()
        if step % cfg.logging.log_every == 0 or step in (result.first_step, tcfg.max_steps):
            elapsed = time.perf_counter() - window_start
            train_s += elapsed
            tps = window_tokens / elapsed
            mfu = {} if run.peak is None else {"mfu": tps * run.flops_per_token / run.peak}
            run.metrics.log(
                {"loss": out.loss, "lr": out.lr, "grad_norm": out.grad_norm, "tokens_per_sec": tps, **mfu,
                 "step_time_s": elapsed / window_steps, "data_wait_frac": window_data_s / elapsed,
                 **memory_stats(ctx.device)},
                step=step, tokens=result.tokens, namespace="train", console=f"train[{step}/{tcfg.max_steps}]",
            )  # fmt: skip
            window_steps, window_tokens, window_data_s = 0, 0, 0.0
            window_start = time.perf_counter()
        side_work = False  # evaluation and checkpoint time is not training throughput
        if tcfg.eval_every and (step % tcfg.eval_every == 0 or step == tcfg.max_steps):
            val_loss = _validate(cfg, model=run.model, prepared=run.prepared, ctx=ctx, dp_rank=run.dp_rank)
            result.val_losses[step] = val_loss
            run.metrics.log({"loss": val_loss, "perplexity": math.exp(min(val_loss, 50.0))}, step=step,
                            tokens=result.tokens, namespace="val")  # fmt: skip
            side_work = True
        stopping = time_due = False
        if stop.enabled or every_s:  # one small collective after the step, only where a flag can be set
            decided = agree({"stop": stop.received is not None,
                             "time": bool(every_s) and time.monotonic() - last_save >= every_s}, device=ctx.device)  # fmt: skip
            stopping, time_due = decided["stop"] and stop.enabled, decided["time"]
        final = step == tcfg.max_steps and cfg.checkpoint.save_final
        if stopping or time_due or final or (every and step % every == 0):
            result.checkpoint_stall_s.append(_save(run, step=step))
            last_save = time.monotonic()
            side_work = True
        if stopping:
            logger.warning("stop signal received: checkpoint of step %d saved, stopping", step)
            result.stopped_by_signal = True
            break
        if side_work:
            window_start = time.perf_counter()
    result.tokens_per_sec = result.tokens / train_s if train_s else 0.0


def _save(run: _Run, *, step: int) -> float:
    return run.checkpointer.save(step=step, tokens=run.result.tokens, model=run.model, optimizer=run.optimizer,
                                 scheduler=run.scheduler, loader=run.train_loader, run_config=run.run_config,
                                 wandb_id=run.metrics.wandb_id)  # fmt: skip


def _validate(cfg: Config, *, model, prepared, ctx: ComputeContext, dp_rank: int) -> float:
    # A fresh loader with a fixed seed: every evaluation scores exactly the same sequences.
    loader = PackedLoader(
        prepared, split="val", seq_len=cfg.data.seq_len, batch_size=cfg.trainer.micro_batch_size,
        dp_rank=dp_rank, dp_size=ctx.dp, seed=0,
    )  # fmt: skip
    return evaluate(model, itertools.islice(batches_to(ctx.device, loader), cfg.trainer.eval_steps), ctx=ctx)


_SWEEP_SYNTAX = re.compile(r",|^(range|choice|interval|glob)\(")


def sweep_names(*, sweep_dir: str, job_overrides: list[str], command_line: list[str], job_num: int) -> tuple[str, str]:
    """(wandb group, run name) of one ``--multirun`` job: the sweep's directory, and the job's values of the
    swept keys (``optim.lr=0.001,parallel.tp=2``); the keys set alike for every job are left out of the name."""
    swept = set()
    for arg in command_line:
        key, sep, value = arg.partition("=")
        if sep and _SWEEP_SYNTAX.search(value):
            swept.add(key.lstrip("+~"))
    values = [o for o in job_overrides if o.partition("=")[0].lstrip("+~") in swept]
    group = re.sub(r"[^\w.=-]+", "-", sweep_dir).strip("-")
    return group, ",".join(values) or f"job{job_num}"


def _prefix_logs_with_rank(rank: int) -> None:
    """Every log line says which rank wrote it (Hydra has already installed the handlers)."""
    fmt = logging.Formatter(f"[%(asctime)s][rank{rank}][%(name)s][%(levelname)s] - %(message)s")
    for handler in logging.getLogger().handlers:
        handler.setFormatter(fmt)


@hydra.main(version_base="1.3", config_path="pkg://conf", config_name="config")
def main(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    env = DistEnv.from_environ()
    _prefix_logs_with_rank(env.rank)
    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    cfg = to_config(cfg)
    if hydra_cfg.mode == RunMode.MULTIRUN:
        group, name = sweep_names(sweep_dir=hydra_cfg.sweep.dir, job_overrides=list(hydra_cfg.overrides.task),
                                  command_line=sys.argv[1:], job_num=hydra_cfg.job.num)  # fmt: skip
        cfg.logging.group = cfg.logging.group or group
        cfg.logging.run_name = cfg.logging.run_name or name
    result = train(cfg, run_dir=run_dir)
    if env.is_rank0 and result.losses:
        logger.info(
            "done: loss %.4f -> %.4f over steps %d-%d, %d tokens at %.0f tokens/s on %d processes, %.1f s; run dir %s",
            result.losses[0], result.losses[-1], result.first_step, result.first_step + len(result.losses) - 1,
            result.tokens, result.tokens_per_sec, result.world_size, result.wall_time_s, run_dir,
        )  # fmt: skip
    elif env.is_rank0:
        logger.info("done: nothing to train (resumed at step %d of %d)", result.first_step - 1, cfg.trainer.max_steps)


if __name__ == "__main__":
    main()
