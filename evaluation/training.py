"""Task evaluation during training: the loop component that scores ``eval.tasks`` on the model being trained
every ``eval.every_steps`` steps and after the last (``eval/<task>/<metric>`` in the metrics and wandb,
``task_scores`` in the run's summary).

The entry point (launch/train.py) builds it from what the run built (``trainer.run.train.Built``), so the
trainer needs nothing of evaluation/: the requests run through the same sharded language model as
``python -m launch.evaluate`` under the run's own layout.
"""

from __future__ import annotations

import torch

from data.tokenizer import Tokenizer
from evaluation.config import EvalConfig
from evaluation.distributed import sharded_language_model
from evaluation.evaluate import load_task, prepare, score_examples
from trainer.run.loop import Component, Control, StepOutcome
from trainer.run.train import Built


class TaskEvaluation(Component):
    phase = "eval"

    def __init__(self, cfg: EvalConfig, *, built: Built, max_steps: int):
        """Reads the task files once, here; every rank builds it (scoring is a collective)."""
        self.every, self.max_steps = cfg.every_steps, max_steps
        self.metrics, self.result = built.metrics, built.result
        self.tasks = cfg.selected()
        self.services = prepare(cfg, self.tasks, deny=[built.run_dir], device=built.ctx.device)
        self.examples = {name: load_task(task, seed=cfg.seed) for name, task in self.tasks.items()}
        self.lm = sharded_language_model(built.model, built.ctx.dims, args=built.args,
                                         tokenizer=Tokenizer(str(built.tokenizer_path)), batch_size=cfg.batch_size,
                                         device=built.ctx.device, dtype=built.ctx.dtype, pipeline=built.pipeline)  # fmt: skip

    def step_end(self, outcome: StepOutcome, control: Control) -> None:
        step = outcome.step
        if step % self.every and step != self.max_steps:
            return
        scores = self.scores()
        self.result.task_scores[step] = scores
        self.metrics.log(scores, step=step, tokens=outcome.total_tokens, namespace="eval")

    @torch.no_grad()
    def scores(self) -> dict[str, float]:
        """``{"<task>/<metric>": value}`` on the model as it is now (all ranks call it together)."""
        out = {}
        for name, task in self.tasks.items():
            metrics = score_examples(self.examples[name], task, self.lm, services=self.services)[0]
            out |= {f"{name}/{metric}": value for metric, value in metrics.items()}
        return out
