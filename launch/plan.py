"""Plan a cluster run before it starts: will the layout fit, how fast will it go, what will it cost.

    python -m launch.plan model=llama1_65b cluster=a100_80gb cluster.gpus=2048 parallel.tp=8
    python -m launch.plan model=llama1_7b cluster=h100_80gb cluster.gpus=256 --search
    python -m launch.plan model=llama1_65b cluster.gpus=2048 plan.tokens=1.4e12 plan.global_batch_tokens=4194304

Arguments are Hydra overrides of ``conf/plan.yaml``: the training config's groups (the same overrides as
``launch.train``) plus ``cluster`` (``conf/cluster/``) and ``plan.*``. The configured layout is built by
the trainer's own code in a fake world of ``cluster.gpus`` ranks (``planner.rehearsal``); the report and a
PNG of per-GPU memory go to the run directory (``plan.out_dir``). ``--search`` (``plan.search=true``)
ranks every layout that fits. docs/planner.md has the model and its validation against published runs.
Runs on any machine, without a GPU: nothing is allocated.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig

from conf.schema import PlanConfig, to_config
from model.flops import param_counts
from planner.budget import budget
from planner.report import describe, plot_memory, ranking
from planner.search import plan_one, search
from trainer.parallel.dims import ParallelDims
from trainer.run.device import resolve_dtype

logger = logging.getLogger(__name__)


def run_plan(cfg: PlanConfig, *, out_dir: Path) -> str:
    """The report of ``cfg``'s layout (and with ``plan.search`` the ranking); writes report.txt and memory.png."""
    # Plans are for GPUs, where precision auto means bf16 (trainer.run.device.resolve_dtype).
    dtype = resolve_dtype(cfg.trainer.precision, device=torch.device("cuda"))
    seq_len = cfg.data.seq_len
    global_tokens = cfg.plan.global_batch_tokens
    if global_tokens is None:
        dp = ParallelDims.from_config(cfg.parallel, world_size=cfg.cluster.gpus).dp  # pp and tp ranks share data
        global_tokens = cfg.trainer.micro_batch_size * cfg.trainer.grad_accum_steps * dp * seq_len
    chosen = plan_one(cfg.model, parallel=cfg.parallel, cluster=cfg.cluster, seq_len=seq_len,
                      global_batch_tokens=global_tokens, micro_batch=cfg.trainer.micro_batch_size,
                      compute_dtype=dtype)  # fmt: skip
    text = describe(chosen, args=cfg.model, cluster=cfg.cluster, tokens=cfg.plan.tokens,
                    budget=budget(chosen.estimate, tokens=cfg.plan.tokens, cluster=cfg.cluster,
                                  params=param_counts(cfg.model).total))  # fmt: skip
    shown = [chosen]
    if cfg.plan.search:
        found = search(cfg.model, base=cfg.parallel, cluster=cfg.cluster, seq_len=seq_len,
                       global_batch_tokens=global_tokens, compute_dtype=dtype)  # fmt: skip
        text += ("\n\nsearch (tp x pp and its schedule x dp_replicate x activation checkpointing x micro-batch x "
                 "reshard):\n")
        text += ranking(found, top=cfg.plan.top)
        shown += found[: cfg.plan.top]
    else:
        text += "\n\n--search (plan.search=true) ranks the other layouts of this model on this cluster."
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "report.txt").write_text(text + "\n")
    picture = plot_memory(shown, cluster=cfg.cluster, path=out_dir / "memory.png")
    return text + f"\n\nwritten: {out_dir / 'report.txt'}, {picture}"


@hydra.main(version_base="1.3", config_path="pkg://conf", config_name="plan")
def main(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    try:
        plan_cfg = to_config(cfg)
        out_dir = Path(plan_cfg.plan.out_dir) if plan_cfg.plan.out_dir else Path(HydraConfig.get().runtime.output_dir)
        print(run_plan(plan_cfg, out_dir=out_dir))
    except ValueError as err:  # a layout, batch or cluster that does not work: the message says which and why
        print(f"launch.plan: {err}", file=sys.stderr)
        sys.exit(2)


def cli() -> None:
    """``--search`` as a flag, as well as ``plan.search=true``."""
    if "--search" in sys.argv:
        sys.argv = [a for a in sys.argv if a != "--search"] + ["plan.search=true"]
    main()


if __name__ == "__main__":
    cli()
