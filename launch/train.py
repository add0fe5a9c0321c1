"""Training entry point (Hydra), for one process or many (under torchrun).

    python -m launch.train                                   # one process (llama-train)
    torchrun --nproc-per-node 2 -m launch.train parallel.tp=2
    python -m launch.local --nproc 4 parallel.dp_replicate=2  # see launch/local.py

``main`` is the only Hydra-decorated function. This module is the one place that holds the root config:
it turns the composed config into typed dataclasses, names the run directory and ``--multirun`` jobs, and
hands each part of the trainer its own sub-config (``train``, which tests call directly), with task
evaluation (evaluation/, a floor above the trainer) as one more loop component when ``eval.every_steps``
is set.
"""

from __future__ import annotations

import logging
import re
import sys
from pathlib import Path
from typing import Sequence

import hydra
from omegaconf import DictConfig, OmegaConf

from conf.schema import Config, to_config
from trainer.parallel.distributed import DistEnv
from trainer.run.oom import TrainingOutOfMemory
from trainer.run.records import TrainResult
from trainer.run.train import ComponentFactory, run_training

logger = logging.getLogger(__name__)


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


def train(cfg: Config, *, run_dir: Path, components: Sequence[ComponentFactory] = ()) -> TrainResult:
    """Train as ``cfg`` says: each component gets its own sub-config; the whole resolved config is written
    to the run directory and into every checkpoint. ``components``: more loop components (``run_training``)."""
    components = list(components)
    if cfg.eval.every_steps:
        from evaluation.training import TaskEvaluation  # only runs that evaluate tasks need it

        components.append(lambda built: TaskEvaluation(cfg.eval, built=built, max_steps=cfg.trainer.max_steps))
    run_config = OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True, enum_to_str=True)
    try:
        return run_training(model=cfg.model, data=cfg.data, optim=cfg.optim, trainer=cfg.trainer,
                            parallel=cfg.parallel, checkpoint=cfg.checkpoint, log=cfg.logging, profile=cfg.profile,
                            spike=cfg.spike, straggler=cfg.straggler, watchdog=cfg.watchdog, goodput=cfg.goodput,
                            run_dir=Path(run_dir), run_config=run_config, components=components,
                            faults=cfg.faults)  # fmt: skip
    except TrainingOutOfMemory as err:
        env = DistEnv.from_environ()
        if env.is_rank0:  # the planner's view of the same layout, next to the allocator's
            prediction = write_oom_prediction(cfg, path=err.report.parent / "prediction.txt", world_size=env.world_size)
            err.args = (f"{err.args[0]}; the planner's prediction for this layout: {prediction}",)
        raise


def write_oom_prediction(cfg: Config, *, path: Path, world_size: int) -> Path:
    """The planner's memory report for the layout that ran out of memory, on this machine's GPU model (or,
    without one, the planner's default cluster), into ``path``; a planner failure is written there too."""
    import torch

    from planner.config import ClusterConfig
    from planner.budget import budget
    from planner.report import describe
    from planner.search import plan_one
    from model.flops import param_counts
    from trainer.parallel.dims import ParallelDims
    from trainer.run.device import gpu_peak, resolve_dtype

    try:
        if torch.cuda.is_available():
            name = torch.cuda.get_device_name(0)
            cluster = ClusterConfig(gpu=name, gpus=world_size, gpus_per_node=min(world_size, torch.cuda.device_count()),
                                    memory_gib=torch.cuda.get_device_properties(0).total_memory / 2**30,
                                    peak_flops=None if gpu_peak(name) else 1e15)  # fmt: skip
            note = f"priced on this machine's GPU, {name}"
        else:
            cluster = ClusterConfig(gpus=world_size, gpus_per_node=world_size)
            note = f"no CUDA device here: priced on the planner's default cluster, {cluster.gpu}"
        dtype = resolve_dtype(cfg.trainer.precision, device=torch.device("cuda" if torch.cuda.is_available() else "cpu"))
        dp = ParallelDims.from_config(cfg.parallel, world_size=world_size).dp  # pp and tp ranks share data
        global_tokens = cfg.trainer.micro_batch_size * cfg.trainer.grad_accum_steps * cfg.data.seq_len * dp
        chosen = plan_one(cfg.model, parallel=cfg.parallel, cluster=cluster, seq_len=cfg.data.seq_len,
                          global_batch_tokens=global_tokens, micro_batch=cfg.trainer.micro_batch_size,
                          compute_dtype=dtype)  # fmt: skip
        tokens = global_tokens * cfg.trainer.max_steps
        text = f"({note})\n" + describe(chosen, args=cfg.model, cluster=cluster, tokens=tokens,
                                         budget=budget(chosen.estimate, tokens=tokens, cluster=cluster,
                                                       params=param_counts(cfg.model).total))  # fmt: skip
    except Exception as err:  # the report of an error must not fail on the planner's own
        text = f"the planner could not price this layout: {type(err).__name__}: {err}"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text + "\n")
    return path


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
    try:
        result = train(cfg, run_dir=run_dir)
    except TrainingOutOfMemory as err:
        print(f"launch.train: {err}. Lower trainer.micro_batch_size, checkpoint more activations "
              "(parallel.ac.mode=full), or shard more (parallel.tp, more processes); python -m launch.plan "
              "--search lists the layouts that fit.", file=sys.stderr)  # fmt: skip
        sys.exit(1)
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
