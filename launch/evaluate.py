"""Evaluate a checkpoint on local tasks: ``python -m launch.evaluate checkpoint=<dir> eval.tasks=[...]``.

    python -m launch.evaluate checkpoint=latest                       # the newest checkpoint under outputs/
    torchrun --nproc-per-node 4 -m launch.evaluate checkpoint=<dir> parallel.tp=2 eval.tasks=[hellaswag]

Hydra overrides of ``conf/evaluation/eval.yaml`` (``evaluation.config.EvaluateConfig``); the work is
``evaluation.checkpoints.evaluate_checkpoint``. Results: ``results.json`` (every metric, and per example the
numbers behind it), the report (the LLaMA paper's tables with our numbers in them, then every metric:
evaluation/report.py), printed and written as ``results.md``, and ``report.png``, in the run directory
(``out_dir``). A task, file, checkpoint or tokenizer that does not work ends the command with exit code 2 and
one line saying why.
"""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from conf.schema import to_config
from evaluation.checkpoints import evaluate_checkpoint
from evaluation.report import report
from evaluation.tasks import TaskFileError
from trainer.parallel.distributed import DistEnv


@hydra.main(version_base="1.3", config_path="pkg://conf.evaluation", config_name="eval")
def main(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    try:
        eval_cfg = to_config(cfg)
        out_dir = Path(eval_cfg.out_dir) if eval_cfg.out_dir else Path(HydraConfig.get().runtime.output_dir)
        results = evaluate_checkpoint(eval_cfg, out_dir=out_dir)
    except (ValueError, TaskFileError) as err:  # a task, file, checkpoint or tokenizer that does not work
        print(f"launch.evaluate: {err}", file=sys.stderr)
        sys.exit(2)
    if DistEnv.from_environ().is_rank0:
        print(report(results))
        png = out_dir / "report.png"
        print(f"written: {out_dir / 'results.json'}, {out_dir / 'results.md'}" + (f", {png}" if png.exists() else ""))


if __name__ == "__main__":
    main()
