"""Typed configs of evaluation: ``EvalConfig`` (``eval.*``: which tasks, how they are read and scored), and
``EvaluateConfig``, the root of ``python -m launch.evaluate`` (a checkpoint, its layout, the tasks)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from evaluation.tasks import DEFAULT_NORMALIZATION, Normalization, TaskFormat
from structured import structured_entry
from trainer.parallel.config import ParallelConfig
from trainer.run.config import Device, Precision


@dataclass
class TaskConfig:
    """One task: a local file in one of ``TaskFormat``'s layouts (evaluation/tasks.py)."""

    path: Optional[str] = None
    """The task's JSONL file; null in the catalog's paper tasks until the user points it at their copy."""
    demo: bool = False
    """A built-in demo task: ``path`` is a file name in ``eval.demo_dir``, generated on first use."""
    format: TaskFormat = TaskFormat.multiple_choice
    num_fewshot: int = 0
    fewshot_path: Optional[str] = None
    """Where k-shot examples are drawn from; null: the task file itself (never the example asked)."""
    normalization: Optional[Normalization] = None
    """Multiple choice: which normalisation is the task's ``acc``; null: the paper's for this format
    (unconditional for OpenBookQA and BoolQ, characters otherwise)."""
    limit: Optional[int] = None
    """Only the first ``limit`` examples (quick looks; the results say so)."""
    max_new_tokens: int = 32
    """Generation tasks: the most tokens decoded per example."""
    stride: Optional[int] = None
    """Perplexity (text) tasks: tokens scored per window after the first; null: the window (disjoint)."""

    def __post_init__(self) -> None:
        self.format = TaskFormat(self.format)
        if self.normalization is not None:
            self.normalization = Normalization(self.normalization)
        if self.num_fewshot < 0 or self.max_new_tokens < 1 or (self.limit is not None and self.limit < 1):
            raise ValueError("eval task: num_fewshot must be >= 0, max_new_tokens >= 1 and limit (if set) >= 1")

    @property
    def acc_normalization(self) -> Normalization:
        if self.normalization is not None:
            return self.normalization
        return DEFAULT_NORMALIZATION.get(self.format, Normalization.char)


def default_catalog() -> dict[str, TaskConfig]:
    """The tasks every config knows: the built-in demo (evaluation/demo.py) and the LLaMA paper's (section 3),
    zero-shot, whose ``path`` the user sets to their local copy (nothing is downloaded)."""
    demo = {"stdlib_next_line": TaskConfig(path="stdlib_next_line.jsonl", format=TaskFormat.multiple_choice, demo=True),
            "stdlib_import": TaskConfig(path="stdlib_import.jsonl", format=TaskFormat.generation, demo=True,
                                        max_new_tokens=8),
            "stdlib_text": TaskConfig(path="stdlib_text.jsonl", format=TaskFormat.text, demo=True)}  # fmt: skip
    paper = {"hellaswag": TaskFormat.hellaswag, "piqa": TaskFormat.piqa, "arc_easy": TaskFormat.arc,
             "arc_challenge": TaskFormat.arc, "openbookqa": TaskFormat.openbookqa, "boolq": TaskFormat.boolq,
             "winogrande": TaskFormat.winogrande}  # fmt: skip
    return {**demo, **{name: TaskConfig(format=fmt) for name, fmt in paper.items()},
            "triviaqa": TaskConfig(format=TaskFormat.triviaqa, max_new_tokens=24)}


@dataclass
class EvalConfig:
    tasks: list[str] = field(default_factory=lambda: ["stdlib_next_line", "stdlib_import", "stdlib_text"])
    """Names of ``catalog`` entries to run: ``eval.tasks=[stdlib_next_line,hellaswag]``."""
    # Typed Any, not TaskConfig: OmegaConf refuses to merge a new plain dict into a dict of dataclasses
    # ("dict is not a subclass of TaskConfig"), which is how a user adds a task from the command line;
    # __post_init__ turns every entry into a TaskConfig, naming an entry with an unknown key.
    catalog: dict[str, Any] = field(default_factory=default_catalog)
    """Every task this config knows; a paper task's ``path`` is set to the user's copy
    (``eval.catalog.hellaswag.path=/data/hellaswag_val.jsonl``), a new task added with
    ``+eval.catalog.<name>={path: ..., format: ...}``."""
    batch_size: int = 8
    seed: int = 1234
    """Seed of the few-shot draws."""
    every_steps: int = 0
    """In training: run ``tasks`` every this many steps (0: never)."""
    demo_dir: str = "cache/eval_tasks"
    """Where the built-in demo tasks are generated (evaluation/demo.py) when first needed."""

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.every_steps < 0:
            raise ValueError("eval.batch_size must be >= 1 and eval.every_steps >= 0")
        self.catalog = {name: structured_entry(TaskConfig, entry, key=f"eval.catalog.{name}")
                        for name, entry in self.catalog.items()}  # fmt: skip

    def selected(self) -> dict[str, TaskConfig]:
        """The configs of ``tasks``, in order; an unknown name is an error that lists the known ones."""
        unknown = [name for name in self.tasks if name not in self.catalog]
        if unknown:
            raise ValueError(f"eval.tasks: unknown task(s) {unknown}; known: {sorted(self.catalog)} "
                             "(add one with +eval.catalog.<name>={path: ..., format: ...})")  # fmt: skip
        if not self.tasks:
            raise ValueError("eval.tasks is empty; name at least one task, e.g. eval.tasks=[stdlib_next_line]")
        unset = [name for name in self.tasks if not self.catalog[name].path]
        if unset:
            raise ValueError(f"eval.catalog.{unset[0]}.path is not set: point it at your local copy of the task "
                             f"(eval.catalog.{unset[0]}.path=/path/to/{unset[0]}.jsonl); nothing is downloaded")  # fmt: skip
        return {name: self._located(self.catalog[name]) for name in self.tasks}

    def _located(self, task: TaskConfig) -> TaskConfig:
        """The task with a demo file's path inside ``demo_dir``."""
        if not task.demo:
            return task
        return dataclasses.replace(task, path=str(Path(self.demo_dir) / task.path))


@dataclass
class EvaluateConfig:
    """The root of ``python -m launch.evaluate`` (``conf/evaluation/eval.yaml``): a checkpoint and the tasks. The model,
    its shape and its tokenizer come from the checkpoint."""

    checkpoint: str = "latest"
    tokenizer: Optional[str] = None
    eval: EvalConfig = field(default_factory=EvalConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """The layout under torchrun (FSDP over all processes by default; ``parallel.tp=2``, ...)."""
    device: Device = Device.auto
    precision: Precision = Precision.auto
    out_dir: Optional[str] = None

    def __post_init__(self) -> None:
        self.device, self.precision = Device(self.device), Precision(self.precision)
