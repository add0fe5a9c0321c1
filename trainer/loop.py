"""A training run, for one process or many (under torchrun): set-up, the loop, the end.

``train(cfg, run_dir=...)`` is what the entry point (trainer/train.py, Hydra) runs, and what tests call.

Order of construction: process group -> layout and meshes -> data (rank 0 first) -> model (trainer/build.py:
meta -> parallelise -> materialise -> initialise) -> optimizer -> restore a checkpoint -> loop. The loop
receives the sub-configs it uses (trainer, checkpoint, logging), not the root config.
"""

from __future__ import annotations

import itertools
import logging
import math
import os
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Callable, Iterator, Optional

import torch
import torch.distributed as dist
from omegaconf import OmegaConf
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from conf.schema import Config
from data import DataConfig, PackedLoader, PreparedData, prepare_data
from model.config import ModelArgs
from model.flops import flops_per_token, param_counts
from trainer.build import build_model
from trainer.checkpoint import Checkpointer
from trainer.config import CheckpointConfig, TrainerConfig
from trainer.device import configure_matmul_precision, memory_stats, peak_flops, resolve_device, resolve_dtype
from trainer.distributed import DistEnv, init_distributed, shutdown_distributed
from trainer.metrics import MetricLogger, system_metrics_enabled
from trainer.optim import build_lr_scheduler, build_optimizer
from trainer.parallel_dims import ParallelDims
from trainer.profiling import StepProfiler
from trainer.runs import TrainResult
from trainer.signals import StopSignals, agree
from trainer.step import ComputeContext, evaluate, train_step

logger = logging.getLogger(__name__)


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
    dims = ParallelDims.for_run(cfg.parallel, world_size=env.world_size, model=cfg.model, seq_len=cfg.data.seq_len)
    dims = dims.with_meshes(device_type=device.type)
    dtype = resolve_dtype(cfg.trainer.precision, device=device)
    ctx = ComputeContext(device=device, dtype=dtype, dims=dims)

    prepared = prepare_data_rank0_first(cfg.data, env=env)
    check_data_fits_model(model=cfg.model, prepared=prepared, seq_len=cfg.data.seq_len)
    model = build_model(cfg.model, device=device, seed=cfg.trainer.seed, dims=dims, parallel=cfg.parallel,
                        compute_dtype=dtype)  # fmt: skip
    optimizer = build_optimizer(model, cfg.optim)
    scheduler = build_lr_scheduler(optimizer, cfg.optim, max_steps=cfg.trainer.max_steps)
    loader_args = dict(seq_len=cfg.data.seq_len, batch_size=cfg.trainer.micro_batch_size, dp_rank=dims.dp_rank(),
                       dp_size=dims.dp)  # fmt: skip
    train_loader = PackedLoader(prepared, split="train", seed=cfg.trainer.seed, **loader_args)

    run_config = OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True, enum_to_str=True)
    if env.is_rank0:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(run_config))
    checkpointer = Checkpointer(cfg.checkpoint, run_dir=run_dir, tokenizer=prepared.tokenizer_path)
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

    def validate() -> float:
        # A fresh loader with a fixed seed: every evaluation scores exactly the same sequences.
        loader = PackedLoader(prepared, split="val", seed=0, **loader_args)
        return evaluate(model, itertools.islice(batches_to(device, loader), cfg.trainer.eval_steps), ctx=ctx)

    evaluate_tasks = None
    if cfg.eval.every_steps:
        from evaluation.distributed import training_task_evaluator  # only runs that evaluate tasks need it

        evaluate_tasks = training_task_evaluator(model, dims, cfg=cfg.eval, args=cfg.model, device=device, dtype=dtype,
                                                 tokenizer_path=str(prepared.tokenizer_path))  # fmt: skip

    run = _Run(trainer=cfg.trainer, checkpoint=cfg.checkpoint, log_every=cfg.logging.log_every,
               grad_clip=cfg.optim.grad_clip, defer_grad_sync=cfg.parallel.defer_grad_sync, model=model,
               optimizer=optimizer, scheduler=scheduler, train_loader=train_loader, validate=validate,
               metrics=metrics, checkpointer=checkpointer, ctx=ctx, flops_per_token=flops_tok, peak=peak,
               run_config=run_config, result=result, evaluate_tasks=evaluate_tasks, eval_every=cfg.eval.every_steps,
               profiler=StepProfiler(run_dir=run_dir, rank=env.rank, first=cfg.profile.step, steps=cfg.profile.steps))  # fmt: skip
    try:
        with StopSignals(enabled=cfg.checkpoint.save_on_signal) as stop:
            _loop(run, stop=stop)
        checkpointer.wait()
    finally:
        run.profiler.stop()
        metrics.close()
    result.wall_time_s = time.perf_counter() - started
    if cfg.trainer.save_final_model:
        _save_full_model(model, path=run_dir / "final_model.pt", is_rank0=env.is_rank0)
    if env.is_rank0:
        result.write(run_dir)
    return result


def _restore(cfg: Config, *, checkpointer: Checkpointer, model, optimizer, scheduler, loader,
             result: TrainResult) -> Optional[str]:  # fmt: skip
    """Resume from a checkpoint, or take initial weights from one; returns the wandb run id to continue."""
    path = checkpointer.resume_path()
    if path is not None:
        meta = checkpointer.load(path, model=model, optimizer=optimizer, scheduler=scheduler, loader=loader,
                                 args=cfg.model)  # fmt: skip
        result.first_step = meta.step + 1
        result.tokens = meta.tokens
        return meta.wandb_id
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
    """The parts of a run the loop needs, built once by ``_train``: its own sub-configs and objects."""

    trainer: TrainerConfig
    checkpoint: CheckpointConfig
    log_every: int
    grad_clip: float
    defer_grad_sync: bool
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    train_loader: PackedLoader
    validate: Callable[[], float]
    """The mean validation loss over the same ``trainer.eval_steps`` batches every time (a collective)."""
    metrics: MetricLogger
    checkpointer: Checkpointer
    ctx: ComputeContext
    flops_per_token: int
    peak: Optional[float]
    """Peak FLOP/s of all processes together; None where unknown (no MFU is logged)."""
    run_config: dict
    result: TrainResult
    profiler: StepProfiler
    evaluate_tasks: Optional[Callable[[], dict[str, float]]] = None
    """``eval.tasks`` scored on the model being trained (a collective), ``{"<task>/<metric>": value}``."""
    eval_every: int = 0


def _loop(run: _Run, *, stop: StopSignals) -> None:
    tcfg, result, ctx = run.trainer, run.result, run.ctx
    batches = batches_to(ctx.device, run.train_loader)
    every, every_s = run.checkpoint.every_steps, run.checkpoint.every_minutes * 60
    last_save = time.monotonic()
    window_start, window_steps, window_tokens, window_data_s, train_s = time.perf_counter(), 0, 0, 0.0, 0.0
    for step in range(result.first_step, tcfg.max_steps + 1):
        run.profiler.step_begin(step)
        t0 = time.perf_counter()
        micro_batches = list(itertools.islice(batches, tcfg.grad_accum_steps))
        data_s = time.perf_counter() - t0
        out = train_step(run.model, run.optimizer, run.scheduler, micro_batches, ctx=ctx, grad_clip=run.grad_clip,
                         defer_grad_sync=run.defer_grad_sync, step=step)  # fmt: skip
        run.profiler.step_end(step)
        result.losses.append(out.loss)
        result.tokens += out.tokens
        window_steps += 1
        window_tokens += out.tokens
        window_data_s += data_s
        run.checkpointer.poll()
        if step % run.log_every == 0 or step in (result.first_step, tcfg.max_steps):
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
            val_loss = run.validate()
            result.val_losses[step] = val_loss
            run.metrics.log({"loss": val_loss, "perplexity": math.exp(min(val_loss, 50.0))}, step=step,
                            tokens=result.tokens, namespace="val")  # fmt: skip
            side_work = True
        if run.evaluate_tasks is not None and (step % run.eval_every == 0 or step == tcfg.max_steps):
            scores = run.evaluate_tasks()
            result.task_scores[step] = scores
            run.metrics.log(scores, step=step, tokens=result.tokens, namespace="eval")
            side_work = True
        stopping = time_due = False
        if stop.enabled or every_s:  # one small collective after the step, only where a flag can be set
            decided = agree({"stop": stop.received is not None,
                             "time": bool(every_s) and time.monotonic() - last_save >= every_s}, device=ctx.device)  # fmt: skip
            stopping, time_due = decided["stop"] and stop.enabled, decided["time"]
        final = step == tcfg.max_steps and run.checkpoint.save_final
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
