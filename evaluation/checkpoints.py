"""Evaluate a checkpoint on local tasks (the command line is ``python -m launch.evaluate``, launch/evaluate.py).

The model's shape and its tokenizer come from the checkpoint
(``meta.json``); a ``tokenizer=`` given on the command line must be the very file the checkpoint was
trained with (same sha256), since other ids would score other tokens. Results: ``results.json`` (every
metric, and per example the numbers behind it), the report (evaluation/report.py) as ``results.md`` and
``report.png``, in the run directory (``out_dir``).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Optional

from data.tokenizer import Tokenizer, file_sha256
from evaluation.config import EvaluateConfig
from evaluation.distributed import ShardedLanguageModel, build_sharded, sharded_language_model
from evaluation.evaluate import prepare, run_task
from evaluation.report import plot, report
from trainer.checkpoint.checkpointer import resolve_checkpoint
from trainer.checkpoint.hf_interop import load_model_from_checkpoint
from trainer.checkpoint.meta import CheckpointMeta
from trainer.parallel.dims import ParallelDims
from trainer.parallel.distributed import DistEnv, init_distributed, shutdown_distributed
from trainer.run.device import resolve_device, resolve_dtype

logger = logging.getLogger(__name__)


def checkpoint_tokenizer(step_dir: Path, *, given: Optional[str], vocab_size: int) -> Tokenizer:
    """The tokenizer the checkpoint names; ``given`` must be that same file when both exist."""
    meta = CheckpointMeta.read(step_dir)
    own = meta.tokenizer_path(path=step_dir)
    if given is not None:
        if own is not None and file_sha256(given) != file_sha256(own):
            raise ValueError(f"tokenizer={given} is not the tokenizer checkpoint {step_dir} was trained with ({own}): "
                             "its ids would score other tokens; drop tokenizer= to use the checkpoint's")  # fmt: skip
        tokenizer = Tokenizer(given)
    elif own is None:
        raise ValueError(f"checkpoint {step_dir} names no tokenizer file that exists; pass tokenizer=<tokenizer.model>")
    else:
        tokenizer = Tokenizer(own)
    if tokenizer.vocab_size > vocab_size:
        raise ValueError(f"tokenizer {tokenizer.path} has {tokenizer.vocab_size} tokens, more than the checkpoint's "
                         f"model.vocab_size={vocab_size}: not this model's tokenizer")  # fmt: skip
    return tokenizer


def build_language_model(cfg: EvaluateConfig, *, env: Optional[DistEnv] = None) -> tuple[ShardedLanguageModel, Path]:
    """The checkpoint's model behind a ``LanguageModel``, on this process's device: loaded whole for one
    process, or laid out as ``cfg.parallel`` says over the ``env``'s processes (evaluation/distributed.py)."""
    env = env if env is not None else DistEnv(rank=0, local_rank=0, world_size=1)
    step_dir = resolve_checkpoint(cfg.checkpoint)
    device = resolve_device(cfg.device, local_rank=env.local_rank)
    dtype = resolve_dtype(cfg.precision, device=device)
    if env.world_size > 1:
        args = CheckpointMeta.read(step_dir).model_args(path=step_dir)
        tokenizer = checkpoint_tokenizer(step_dir, given=cfg.tokenizer, vocab_size=args.vocab_size)
        model, dims, pipeline = build_sharded(args, step_dir=step_dir, parallel=cfg.parallel, world_size=env.world_size,
                                              device=device, dtype=dtype)  # fmt: skip
        return sharded_language_model(model, dims, args=args, tokenizer=tokenizer, batch_size=cfg.eval.batch_size,
                                      device=device, dtype=dtype, pipeline=pipeline), step_dir  # fmt: skip
    model, args = load_model_from_checkpoint(step_dir)
    tokenizer = checkpoint_tokenizer(step_dir, given=cfg.tokenizer, vocab_size=args.vocab_size)
    lm = sharded_language_model(model.to(device).eval(), ParallelDims.single(), args=args, tokenizer=tokenizer,
                                batch_size=cfg.eval.batch_size, device=device, dtype=dtype)  # fmt: skip
    return lm, step_dir


def evaluate_checkpoint(cfg: EvaluateConfig, *, out_dir: Path) -> list[dict[str, Any]]:
    """Every task of ``cfg`` on its checkpoint; under torchrun, on all processes, rank 0 writing the files."""
    tasks = cfg.eval.selected()  # unknown or unset tasks fail before the model is loaded
    env = DistEnv.from_environ()
    device = resolve_device(cfg.device, local_rank=env.local_rank)
    step_dir = resolve_checkpoint(cfg.checkpoint)
    # Programs the model writes may neither read nor list the run directory or the checkpoint.
    services = prepare(cfg.eval, tasks, deny=[out_dir, step_dir.parent.parent], device=device)
    init_distributed(env, device=device)
    try:
        lm, step_dir = build_language_model(cfg, env=env)
        logger.info("evaluating %s on %s", step_dir, ", ".join(tasks))
        results = [run_task(name, task, lm, seed=cfg.eval.seed, services=services) for name, task in tasks.items()]
    finally:
        shutdown_distributed()
    if env.is_rank0:
        out_dir.mkdir(parents=True, exist_ok=True)
        summary = {"checkpoint": str(step_dir), "world_size": env.world_size, "results": results}
        (out_dir / "results.json").write_text(json.dumps(summary, indent=1) + "\n")
        (out_dir / "results.md").write_text(report(results))
        plot(results, out_dir / "report.png")
    return results
