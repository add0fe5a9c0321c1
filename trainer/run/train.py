"""A training run, for one process or many (under torchrun): set-up, then the loop, then the summary.

``run_training(model=..., data=..., ..., run_dir=...)`` receives each component's own sub-config; the entry point
(launch/train.py, Hydra) unpacks the root config into it, and tests call it the same way.

Order of construction: process group -> layout and meshes -> data (rank 0 first) -> model (trainer/parallel/
build.py: meta -> parallelise -> materialise -> initialise) -> optimizer -> restore a checkpoint -> metrics ->
the loop's components -> the loop (trainer/run/loop.py). Components made outside the trainer (task
evaluation: evaluation/training.py) are passed in as factories that receive what the set-up built (``Built``).
"""

from __future__ import annotations

import itertools
import logging
import os
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence, Union

import torch
import torch.distributed as dist
from omegaconf import OmegaConf
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from data import DataConfig, PackedLoader, PreparedData, Tokenizer, prepare_data
from data.instruction_loader import InstructionLoader
from data.instructions import prepare_instructions
from model.config import ModelArgs
from model.flops import flops_per_token, param_counts
from trainer.checkpoint.checkpointer import Checkpointer, resolve_checkpoint
from trainer.checkpoint.config import CheckpointConfig
from trainer.checkpoint.meta import CheckpointMeta
from trainer.parallel.build import build_stages
from trainer.parallel.config import ParallelConfig
from trainer.parallel.dims import ParallelDims
from trainer.parallel.distributed import DistEnv, init_distributed, shutdown_distributed
from trainer.parallel.pipeline import Pipeline
from trainer.run.components.checkpointing import PeriodicCheckpoints
from trainer.run.components.goodput import GoodputRecorder
from trainer.run.components.profiling import StepProfiler
from trainer.run.components.spike_guard import SpikeGuard
from trainer.run.components.straggler import StragglerMonitor
from trainer.run.components.train_log import TrainLog
from trainer.run.components.validation import Validation
from trainer.run.components.watchdog import HangWatchdog
from trainer.run.config import (
    GoodputConfig, LoggingConfig, OptimConfig, ProfileConfig, SpikeConfig, StragglerConfig, TrainerConfig,
    WatchdogConfig,
)  # fmt: skip
from trainer.run.device import configure_matmul_precision, peak_flops, resolve_device, resolve_dtype
from trainer.run.faults import FaultConfig, FaultInjector, poisoned
from trainer.run.loop import Component, Progress, run_loop
from trainer.run.metrics import MetricLogger, system_metrics_enabled
from trainer.run.oom import out_of_memory, start_memory_history
from trainer.run.optim import build_lr_scheduler, build_optimizer
from trainer.run.records import TrainResult
from trainer.run.step import ComputeContext, StepResult, cross_entropy_sum, evaluate, train_step

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Built:
    """What the set-up built, for the components made outside the trainer (``train(components=...)``)."""

    model: torch.nn.Module
    """The model being trained, laid out as ``ctx.dims`` says."""
    args: ModelArgs
    ctx: ComputeContext
    """Device, compute dtype and the layout with its meshes."""
    tokenizer_path: Path
    metrics: MetricLogger
    result: TrainResult
    """The run's summary, which components add their results to."""
    run_dir: Path
    pipeline: Optional[Pipeline] = None
    """This rank's pipeline stages and schedule, where ``parallel.pp`` > 1: forwards go through it."""


ComponentFactory = Callable[[Built], Component]


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
    preparing a large corpus can outlast the default group's timeout (``parallel.pg_timeout_s``; NCCL's watchdog
    would abort the job).
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


@dataclass
class TrainingData:
    """What the run trains and validates on: pre-training's packed token shards, or finetuning's records."""

    tokenizer_path: str
    train: Union[PackedLoader, InstructionLoader]
    val: Callable[[], Iterator[dict[str, torch.Tensor]]]
    """A fresh validation loader (the same sequences every time)."""


def training_data(data: DataConfig, *, model: ModelArgs, trainer: TrainerConfig, dims: ParallelDims, env: DistEnv,
                  init_from: Optional[str]) -> TrainingData:  # fmt: skip
    """The loaders of ``data``: the pre-training mixture (rank 0 prepares the shards first), or, with
    ``data.instructions.train``, the instruction records tokenized by the tokenizer of the checkpoint the run
    starts from (``data.tokenizer.path`` if given)."""
    args = dict(seq_len=data.seq_len, batch_size=trainer.micro_batch_size, dp_rank=dims.dp_rank(), dp_size=dims.dp)
    if not data.instructions.enabled:
        prepared = prepare_data_rank0_first(data, env=env)
        check_data_fits_model(model=model, prepared=prepared, seq_len=data.seq_len)
        args["document_mask"] = data.document_mask
        return TrainingData(tokenizer_path=prepared.tokenizer_path,
                            train=PackedLoader(prepared, split="train", seed=trainer.seed, **args),
                            val=lambda: PackedLoader(prepared, split="val", seed=0, **args))  # fmt: skip
    path = data.tokenizer.path or _checkpoint_tokenizer(init_from)
    tokenizer = Tokenizer(path)
    if tokenizer.vocab_size > model.vocab_size or data.seq_len > model.max_seq_len:
        raise ValueError(f"the tokenizer {path} ({tokenizer.vocab_size} tokens) or data.seq_len={data.seq_len} does not "
                         f"fit the model (model.vocab_size={model.vocab_size}, max_seq_len={model.max_seq_len}): "
                         "finetune with the model config the checkpoint was trained with")  # fmt: skip
    records = prepare_instructions(data.instructions, encode=tokenizer.encode, bos_id=tokenizer.bos_id,
                                   eos_id=tokenizer.eos_id, seq_len=data.seq_len)  # fmt: skip
    if env.is_rank0:
        logger.info("instructions: %d train and %d validation records (%d cut to data.seq_len=%d, %d dropped: no room "
                    "for a response)", len(records.train.records), len(records.val.records),
                    records.train.cut + records.val.cut, data.seq_len, records.train.dropped + records.val.dropped)  # fmt: skip
    return TrainingData(tokenizer_path=str(path),
                        train=InstructionLoader(records.train.records, seed=trainer.seed, **args),
                        val=lambda: InstructionLoader(records.val.records, seed=0, shuffle=False, **args))  # fmt: skip


def _checkpoint_tokenizer(init_from: Optional[str]) -> str:
    if init_from is None:
        raise ValueError("finetuning (data.instructions.train) starts from a checkpoint: set checkpoint.init_from=<a "
                         "pre-training checkpoint> (its tokenizer is used), or data.tokenizer.path")  # fmt: skip
    step = resolve_checkpoint(init_from)
    found = CheckpointMeta.read(step).tokenizer_path(path=step)
    if found is None:
        raise ValueError(f"checkpoint {step} names no tokenizer file that exists; set data.tokenizer.path")
    return str(found)


def batches_to(device: torch.device, loader: Iterator[dict]) -> Iterator[dict[str, torch.Tensor]]:
    """The loader's CPU batches on ``device``. To a GPU through pinned memory: a copy from pageable memory
    would block the host until it is done, so the host could not queue the step's forward behind it."""
    for batch in loader:
        if device.type == "cuda":
            batch = {k: v.pin_memory() for k, v in batch.items()}
        yield {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def run_training(*, model: ModelArgs, data: DataConfig, optim: OptimConfig, trainer: TrainerConfig,
                 parallel: ParallelConfig, checkpoint: CheckpointConfig, log: LoggingConfig, profile: ProfileConfig,
                 spike: SpikeConfig, straggler: StragglerConfig, watchdog: WatchdogConfig, goodput: GoodputConfig,
                 run_dir: Path, run_config: dict, components: Sequence[ComponentFactory] = (),
                 faults: Optional[FaultConfig] = None) -> TrainResult:  # fmt: skip
    """Run training as configured, writing config, metrics and wandb files under ``run_dir`` (rank 0).

    Args:
        run_config: the resolved root config, written to ``<run_dir>/config.yaml`` and into every checkpoint.
        components: more loop components, each made from what the set-up built; they run after the
            trainer's own metrics and validation, before the spike guard and checkpoints.
        faults: test-only fault injection (trainer/run/faults.py).
    """
    env = DistEnv.from_environ()
    if parallel.tp > 1:
        # The TP backward overlaps a collective with a GEMM by issuing the collective first; with one
        # hardware queue per device (read when CUDA starts, so set before) kernels start in issue order
        # and the GEMM cannot take every SM first (Megatron sets the same). No effect on CPU.
        os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")
    device = resolve_device(trainer.device, local_rank=env.local_rank)
    configure_matmul_precision(device=device, tf32=trainer.tf32)
    if trainer.memory_history:
        start_memory_history(device)
    if watchdog.enabled and device.type == "cuda":
        # The NCCL flight recorder (what the hang report lists of the collectives in flight) records only
        # with a buffer; read when the first NCCL group starts.
        os.environ.setdefault("TORCH_NCCL_TRACE_BUFFER_SIZE", "2000")
    _check_timeouts(watchdog, pg_timeout_s=parallel.pg_timeout_s)
    init_distributed(env, device=device, one_rank=parallel.fsdp.one_rank, timeout_s=parallel.pg_timeout_s)
    started = time.perf_counter()
    try:
        dims = ParallelDims.for_run(parallel, world_size=env.world_size, model=model, seq_len=data.seq_len)
        ctx = ComputeContext(device=device, dtype=resolve_dtype(trainer.precision, device=device),
                             dims=dims.with_meshes(device_type=device.type))  # fmt: skip
        sources = training_data(data, model=model, trainer=trainer, dims=ctx.dims, env=env,
                                init_from=checkpoint.init_from)  # fmt: skip
        net, stages = build_stages(model, device=device, seed=trainer.seed, dims=ctx.dims, parallel=parallel,
                                   compute_dtype=ctx.dtype)  # fmt: skip
        pipeline = (Pipeline(stages, ctx.dims, cfg=parallel, device=device, loss=cross_entropy_sum)
                    if ctx.dims.pp_enabled else None)  # fmt: skip
        optimizer = build_optimizer(net, optim)
        scheduler = build_lr_scheduler(optimizer, optim, max_steps=trainer.max_steps)
        train_loader = sources.train
        if env.is_rank0:
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(run_config))
        checkpointer = Checkpointer(checkpoint, run_dir=run_dir, tokenizer=sources.tokenizer_path)
        result = TrainResult(world_size=env.world_size)
        wandb_id = _restore(checkpoint, checkpointer=checkpointer, args=model, model=net, optimizer=optimizer,
                            scheduler=scheduler, loader=train_loader, result=result)  # fmt: skip
        for first, stop in data.skip_samples:  # after the restore: a checkpoint's own skips are kept too
            train_loader.skip(first, stop)
        batches: Iterator[dict[str, torch.Tensor]] = train_loader
        if faults is not None and faults.poison_samples:
            batches = poisoned(train_loader, loader=train_loader, cfg=faults, vocab_size=model.vocab_size)
        metrics = MetricLogger(log, run_dir=run_dir, run_config=run_config, enabled=env.is_rank0, wandb_id=wandb_id,
                               resumed=result.first_step > 1,
                               system_metrics=system_metrics_enabled(log.system_metrics, device_type=device.type))  # fmt: skip
        try:
            peak = _log_start(model=model, data=data, trainer=trainer, ctx=ctx, env=env, run_dir=run_dir)
            built = Built(model=net, args=model, ctx=ctx, tokenizer_path=Path(sources.tokenizer_path), metrics=metrics,
                          result=result, run_dir=run_dir, pipeline=pipeline)  # fmt: skip

            def validate() -> float:
                # A fresh loader with a fixed seed: every evaluation scores exactly the same sequences.
                loader = sources.val()
                return evaluate(net, itertools.islice(batches_to(device, loader), trainer.eval_steps), ctx=ctx,
                                pipeline=pipeline)  # fmt: skip

            progress = Progress()
            parts, checkpoints = _components(
                spike=spike, straggler=straggler, watchdog=watchdog, goodput=goodput, profile=profile, log=log,
                checkpoint=checkpoint, faults=faults, extra=[make(built) for make in components], progress=progress,
                env=env, run_dir=run_dir, built=built, validate=validate, peak_flops=peak, optimizer=optimizer,
                scheduler=scheduler, loader=train_loader, checkpointer=checkpointer, run_config=run_config,
                flops_per_token=flops_per_token(model, seq_len=data.seq_len), max_steps=trainer.max_steps,
                eval_every=trainer.eval_every,
                samples_per_step=ctx.dims.dp * trainer.micro_batch_size * trainer.grad_accum_steps,
                probe_tokens=trainer.micro_batch_size * data.seq_len,
            )  # fmt: skip

            def step(micro_batches: list[dict[str, torch.Tensor]], index: int, review, phase) -> StepResult:
                return train_step(net, optimizer, scheduler, micro_batches, ctx=ctx, grad_clip=optim.grad_clip,
                                  defer_grad_sync=parallel.fsdp.defer_grad_sync, step=index, review=review,
                                  phase=phase, pipeline=pipeline)  # fmt: skip

            try:
                run_loop(steps=range(result.first_step, trainer.max_steps + 1), batches=batches_to(device, batches),
                         grad_accum_steps=trainer.grad_accum_steps, train_step=step, result=result, components=parts,
                         rollback=checkpoints.roll_back, progress=progress)  # fmt: skip
            except torch.OutOfMemoryError as err:
                raise out_of_memory(err, run_dir=run_dir, rank=env.rank, step=progress.step, phase=progress.phase,
                                    device=device) from err  # fmt: skip
        finally:
            metrics.close()
        result.wall_time_s = time.perf_counter() - started
        if trainer.save_final_model:
            _save_full_model(net, path=run_dir / "final_model.pt", is_rank0=env.is_rank0, pp=ctx.dims.pp_enabled)
        if env.is_rank0:
            result.write(run_dir)
        return result
    finally:
        shutdown_distributed()


def _components(*, spike: SpikeConfig, straggler: StragglerConfig, watchdog: WatchdogConfig, goodput: GoodputConfig,
                profile: ProfileConfig, log: LoggingConfig, checkpoint: CheckpointConfig, faults: Optional[FaultConfig],
                extra: list[Component], progress: Progress, env: DistEnv, run_dir: Path, built: Built,
                validate: Callable[[], float], peak_flops: Optional[float], optimizer: torch.optim.Optimizer,
                scheduler: torch.optim.lr_scheduler.LRScheduler, loader: PackedLoader, checkpointer: Checkpointer,
                run_config: dict, flops_per_token: int, max_steps: int, eval_every: int, samples_per_step: int,
                probe_tokens: int) -> tuple[list[Component], PeriodicCheckpoints]:  # fmt: skip
    """The loop's components in the order they are called (docs/architecture.md, "The loop"), each given its
    own sub-config and what it acts on; and the checkpointing one, which also carries out rollbacks."""
    metrics, result, device = built.metrics, built.result, built.ctx.device
    parts: list[Component] = []
    if watchdog.enabled:
        parts.append(HangWatchdog(watchdog, progress=progress, run_dir=run_dir, rank=env.rank, device=device))
    if faults is not None and faults.injects_in_loop:
        parts.append(FaultInjector(faults, rank=env.rank))
    parts += [
        StepProfiler(profile, run_dir=run_dir, rank=env.rank),
        TrainLog(metrics=metrics, result=result, log_every=log.log_every, max_steps=max_steps,
                 flops_per_token=flops_per_token, peak_flops=peak_flops, device=device),
        Validation(validate=validate, every=eval_every, max_steps=max_steps, metrics=metrics,
                   result=result),
        *extra,
    ]  # fmt: skip
    if straggler.every_steps and env.world_size > 1:
        slowed = faults is not None and faults.slow_rank == env.rank
        parts.append(StragglerMonitor(straggler, args=built.args, tokens=probe_tokens, dtype=built.ctx.dtype,
                                      device=device, metrics=metrics, result=result,
                                      repeats=faults.slow_factor if slowed else 1))  # fmt: skip
    if spike.enabled:
        parts.append(SpikeGuard(spike, loader=loader, samples_per_step=samples_per_step, metrics=metrics,
                                result=result, device=device))  # fmt: skip
    checkpoints = PeriodicCheckpoints(checkpoint, checkpointer=checkpointer, max_steps=max_steps, args=built.args,
                                      model=built.model, optimizer=optimizer, scheduler=scheduler, loader=loader,
                                      run_config=run_config, wandb_id=metrics.wandb_id, result=result, device=device)  # fmt: skip
    parts.append(checkpoints)
    if goodput.enabled:  # last: it reads the step's checkpoint stall
        parts.append(GoodputRecorder(goodput, run_dir=run_dir, enabled=env.is_rank0, progress=progress,
                                     gpus=env.world_size, metrics=metrics, result=result,
                                     checkpoint_every_minutes=checkpoint.every_minutes))  # fmt: skip
    return parts, checkpoints


def _check_timeouts(watchdog: WatchdogConfig, *, pg_timeout_s: float) -> None:
    """Warn where the process group's timeout would fire before the watchdog could report a hang."""
    if not watchdog.enabled:
        return
    longest = watchdog.longest_s()
    if pg_timeout_s <= longest:
        logger.warning("parallel.pg_timeout_s=%.0f is not above the hang watchdog's longest allowance (%.0f s): a hang "
                       "may end in the process group's bare timeout instead of the watchdog's report; raise "
                       "parallel.pg_timeout_s or lower watchdog.*", pg_timeout_s, longest)  # fmt: skip


def _log_start(*, model: ModelArgs, data: DataConfig, trainer: TrainerConfig, ctx: ComputeContext, env: DistEnv,
               run_dir: Path) -> Optional[float]:  # fmt: skip
    """Log what is about to train; returns the peak FLOP/s of all processes together (None where unknown)."""
    peak = peak_flops(device=ctx.device, dtype=ctx.dtype, override=trainer.peak_flops, tf32=trainer.tf32)
    peak = peak * env.world_size if peak is not None else None
    counts, dims = param_counts(model), ctx.dims
    logger.info(
        "model: %s parameters (%s non-embedding), %.3g training FLOPs/token; layout dp_replicate=%d dp_shard=%d "
        "tp=%d on %d processes; %s %s; peak %s FLOP/s (all processes); run dir %s", f"{counts.total:,}",
        f"{counts.non_embedding:,}", flops_per_token(model, seq_len=data.seq_len), dims.dp_replicate, dims.dp_shard,
        dims.tp, env.world_size, ctx.device.type, ctx.dtype, "unknown" if peak is None else f"{peak:.3g}", run_dir,
    )  # fmt: skip
    return peak


def _restore(cfg: CheckpointConfig, *, checkpointer: Checkpointer, args: ModelArgs, model, optimizer, scheduler, loader,
             result: TrainResult) -> Optional[str]:  # fmt: skip
    """Resume from a checkpoint, or take initial weights from one; returns the wandb run id to continue."""
    path = checkpointer.resume_path()
    if path is not None:
        meta = checkpointer.load(path, model=model, optimizer=optimizer, scheduler=scheduler, loader=loader, args=args)
        result.first_step = meta.step + 1
        result.tokens = meta.tokens
        return meta.wandb_id
    if cfg.init_from is not None:
        checkpointer.load_model_only(Path(cfg.init_from), model=model, args=args)
    return None


def _save_full_model(model: torch.nn.Module, *, path: Path, is_rank0: bool, pp: bool = False) -> None:
    """Consolidated fp32 weights on rank 0 (a collective: every rank must call it); under pipelining the
    stages' weights are gathered first (each stage holds other names)."""
    if pp:  # each stage's whole weights (gathered over its FSDP ranks on every rank), then every stage's names
        local = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
        local = {name: tensor.detach().cpu() for name, tensor in local.items()}
        stages: list = [None] * dist.get_world_size()
        dist.all_gather_object(stages, local)
        state = {name: tensor for stage in stages for name, tensor in stage.items()}
    else:
        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if is_rank0:
        torch.save(state, path)
