"""Training entry point.

    python -m trainer.train                        # the built-in default (experiment=quickstart)
    python -m trainer.train model=debug trainer.max_steps=20
    python -m trainer.train --multirun optim.lr=1e-3,3e-3

``main`` is the only Hydra-decorated function; tests call ``train(cfg, run_dir=...)`` directly.

Order of construction (the seams later stages plug into): data -> model on the meta device ->
(parallelise) -> materialise with ``to_empty`` -> ``init_weights`` under the seed -> optimizer.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from conf.schema import Config, to_config
from data import PackedLoader, PreparedData, prepare_data
from model.config import ModelArgs
from model.flops import flops_per_token, param_counts
from model.llama import Transformer
from trainer.device import memory_stats, peak_flops, resolve_device, resolve_dtype
from trainer.metrics import MetricLogger
from trainer.optim import build_lr_scheduler, build_optimizer
from trainer.step import autocast_context, evaluate, train_step

logger = logging.getLogger(__name__)


@dataclass
class TrainResult:
    """What a finished run reports (also written to ``summary.json`` in the run directory)."""

    losses: list[float] = field(default_factory=list)
    """Training loss of every step."""
    val_losses: dict[int, float] = field(default_factory=dict)
    """Validation loss by step."""
    tokens: int = 0
    """Training tokens consumed."""
    tokens_per_sec: float = 0.0
    """Throughput over the whole run, evaluation excluded."""
    wall_time_s: float = 0.0


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


def build_model(args: ModelArgs, *, device: torch.device, seed: int) -> Transformer:
    """Build on meta (no memory), materialise on ``device``, then initialise under ``seed``."""
    with torch.device("meta"):
        model = Transformer(args)
    # Parallelisation (TP/SP, activation checkpointing, FSDP) is applied here, on the meta model.
    model.to_empty(device=device)
    torch.manual_seed(seed)
    model.init_weights(buffer_device=device)
    return model


def batches_to(device: torch.device, loader: Iterator[dict]) -> Iterator[dict[str, torch.Tensor]]:
    for batch in loader:
        yield {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def train(cfg: Config, *, run_dir: Path) -> TrainResult:
    """Run training as configured, writing config, metrics and wandb files under ``run_dir``."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    device = resolve_device(cfg.trainer.device)
    dtype = resolve_dtype(cfg.trainer.precision, device=device)
    autocast = autocast_context(device=device, dtype=dtype)

    prepared = prepare_data(cfg.data)
    check_data_fits_model(model=cfg.model, prepared=prepared, seq_len=cfg.data.seq_len)
    model = build_model(cfg.model, device=device, seed=cfg.trainer.seed)
    optimizer = build_optimizer(model, cfg.optim)
    scheduler = build_lr_scheduler(optimizer, cfg.optim, max_steps=cfg.trainer.max_steps)
    train_loader = PackedLoader(
        prepared, split="train", seq_len=cfg.data.seq_len, batch_size=cfg.trainer.micro_batch_size,
        dp_rank=0, dp_size=1, seed=cfg.trainer.seed,
    )  # fmt: skip

    run_config = OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True, enum_to_str=True)
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(run_config))
    metrics = MetricLogger(cfg.logging, run_dir=run_dir, run_config=run_config)
    counts = param_counts(cfg.model)
    flops_tok = flops_per_token(cfg.model, seq_len=cfg.data.seq_len)
    peak = peak_flops(device=device, dtype=dtype, override=cfg.trainer.peak_flops)
    logger.info(
        "model: %s parameters (%s non-embedding), %.3g training FLOPs/token; device %s, %s, peak %.3g FLOP/s; "
        "run dir %s", f"{counts.total:,}", f"{counts.non_embedding:,}", flops_tok, device, dtype, peak, run_dir,
    )  # fmt: skip

    result = TrainResult()
    try:
        _loop(cfg, model=model, optimizer=optimizer, scheduler=scheduler, train_loader=train_loader,
              prepared=prepared, metrics=metrics, result=result, autocast=autocast, device=device,
              flops_per_token=flops_tok, peak=peak)  # fmt: skip
    finally:
        metrics.close()
    result.wall_time_s = time.perf_counter() - started
    (run_dir / "summary.json").write_text(json.dumps(asdict(result), indent=1))
    return result


def _loop(cfg: Config, *, model, optimizer, scheduler, train_loader, prepared, metrics, result, autocast, device,
          flops_per_token: int, peak: float) -> None:  # fmt: skip
    tcfg = cfg.trainer
    batches = batches_to(device, train_loader)
    window_start, window_steps, window_tokens, window_data_s, train_s = time.perf_counter(), 0, 0, 0.0, 0.0
    for step in range(1, tcfg.max_steps + 1):
        t0 = time.perf_counter()
        micro_batches = list(itertools.islice(batches, tcfg.grad_accum_steps))
        data_s = time.perf_counter() - t0
        out = train_step(model, optimizer, scheduler, micro_batches, grad_clip=cfg.optim.grad_clip,
                         autocast=autocast, step=step)  # fmt: skip
        result.losses.append(out.loss)
        result.tokens += out.tokens
        window_steps += 1
        window_tokens += out.tokens
        window_data_s += data_s
        if step % cfg.logging.log_every == 0 or step in (1, tcfg.max_steps):
            elapsed = time.perf_counter() - window_start
            train_s += elapsed
            tps = window_tokens / elapsed
            metrics.log(
                {"loss": out.loss, "lr": out.lr, "grad_norm": out.grad_norm, "tokens_per_sec": tps,
                 "mfu": tps * flops_per_token / peak, "step_time_s": elapsed / window_steps,
                 "data_wait_frac": window_data_s / elapsed, "tokens": result.tokens, **memory_stats(device)},
                step=step, prefix=f"train[{step}/{tcfg.max_steps}]",
            )  # fmt: skip
            window_steps, window_tokens, window_data_s = 0, 0, 0.0
            window_start = time.perf_counter()
        if tcfg.eval_every and (step % tcfg.eval_every == 0 or step == tcfg.max_steps):
            val_loss = _validate(cfg, model=model, prepared=prepared, autocast=autocast, device=device)
            result.val_losses[step] = val_loss
            metrics.log({"loss": val_loss, "perplexity": math.exp(min(val_loss, 50.0))}, step=step, prefix="val")
            window_start = time.perf_counter()  # evaluation time is not training throughput
    result.tokens_per_sec = result.tokens / max(train_s, 1e-9)


def _validate(cfg: Config, *, model, prepared, autocast, device) -> float:
    # A fresh loader with a fixed seed: every evaluation scores exactly the same sequences.
    loader = PackedLoader(
        prepared, split="val", seq_len=cfg.data.seq_len, batch_size=cfg.trainer.micro_batch_size,
        dp_rank=0, dp_size=1, seed=0,
    )  # fmt: skip
    return evaluate(model, itertools.islice(batches_to(device, loader), cfg.trainer.eval_steps), autocast=autocast)


@hydra.main(version_base="1.3", config_path="pkg://conf", config_name="config")
def main(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    run_dir = Path(HydraConfig.get().runtime.output_dir)
    result = train(to_config(cfg), run_dir=run_dir)
    first, last = result.losses[0], result.losses[-1]
    logger.info(
        "done: loss %.4f -> %.4f over %d steps, %d tokens at %.0f tokens/s, %.1f s; run dir %s",
        first, last, len(result.losses), result.tokens, result.tokens_per_sec, result.wall_time_s, run_dir,
    )  # fmt: skip


if __name__ == "__main__":
    main()
