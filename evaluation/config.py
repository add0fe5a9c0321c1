"""Typed configs of evaluation: ``EvalConfig`` (``eval.*``: which tasks, how they are read and scored), and
``EvaluateConfig``, the root of ``python -m launch.evaluate`` (a checkpoint, its layout, the tasks)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from evaluation.demo_report import DEMO_ENTRIES
from evaluation.layouts import RESPECTFUL
from evaluation.sandbox import Limits
from evaluation.sampling import Sampling
from evaluation.tasks import DEFAULT_NORMALIZATION, SCORERS, Normalization, Scorer, TaskFormat
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
    fewshot_first: bool = False
    """Take the first k shots (MMLU's dev examples, the fixed prompts of GSM8k, MATH and MBPP) instead of a
    seeded draw."""
    prefix: str = ""
    """Text before every prompt (and its shots): the "respectful" RealToxicityPrompts instruction."""
    normalization: Optional[Normalization] = None
    """Multiple choice: which normalisation is the task's ``acc``; null: the paper's for this format
    (unconditional for OpenBookQA and BoolQ, characters otherwise)."""
    limit: Optional[int] = None
    """Only the first ``limit`` examples (quick looks; the results say so)."""
    max_new_tokens: int = 32
    """Generation tasks: the most tokens decoded per example."""
    samples: int = 1
    """Generation tasks scored by math or code: completions per prompt (maj1@k votes over them; pass@k
    estimates from them)."""
    temperature: float = 0.0
    """0: greedy decoding; > 0: sampling (evaluation/sampling.py)."""
    top_p: float = 1.0
    top_k: int = 0
    pass_k: list[int] = field(default_factory=lambda: [1])
    """Code tasks: the k of each pass@k reported (each at most ``samples``)."""
    paper: Optional[str] = None
    """The LLaMA paper's column this task's headline metric is compared with in the report
    (evaluation/report.py: ``"<table>/<column>"``); null: none."""
    stride: Optional[int] = None
    """Perplexity (text) tasks: tokens scored per window after the first; null: the window (disjoint)."""

    def __post_init__(self) -> None:
        self.format = TaskFormat(self.format)
        if self.normalization is not None:
            self.normalization = Normalization(self.normalization)
        if self.num_fewshot < 0 or self.max_new_tokens < 1 or (self.limit is not None and self.limit < 1):
            raise ValueError("eval task: num_fewshot must be >= 0, max_new_tokens >= 1 and limit (if set) >= 1")
        self.sampling  # validates temperature, top_k and top_p
        if self.samples < 1 or (self.samples > 1 and self.scorer not in (Scorer.gsm8k, Scorer.math, Scorer.code)):
            raise ValueError(f"eval task: samples={self.samples}; more than one sample per prompt is for the math "
                             "(maj1@k) and code (pass@k) formats: gsm8k, math, humaneval, mbpp")  # fmt: skip
        if self.samples > 1 and self.temperature == 0:
            raise ValueError(f"eval task: samples={self.samples} at temperature 0 would be {self.samples} copies of the "
                             "greedy answer; set temperature > 0 (the paper: 0.8 for pass@100, Minerva's 0.6 for maj1@k)")  # fmt: skip
        self.pass_k = [int(k) for k in self.pass_k]
        if self.scorer == Scorer.code and not all(1 <= k <= self.samples for k in self.pass_k):
            raise ValueError(f"eval task: pass_k={self.pass_k} needs every k in [1, samples={self.samples}]")

    @property
    def scorer(self) -> Scorer:
        return SCORERS.get(self.format, Scorer.exact_match)

    @property
    def sampling(self) -> Sampling:
        return Sampling(temperature=self.temperature, top_k=self.top_k, top_p=self.top_p)

    @property
    def acc_normalization(self) -> Normalization:
        if self.normalization is not None:
            return self.normalization
        return DEFAULT_NORMALIZATION.get(self.format, Normalization.char)


def paper_catalog() -> dict[str, TaskConfig]:
    """The LLaMA paper's tasks (sections 3 and 5) with its protocols, whose ``path`` the user sets to their local
    copy (nothing is downloaded). Where the paper does not say (shots for GSM8k and MATH, samples per problem,
    top-p), the values are Minerva's and Codex's (docs/evaluation.md lists each choice)."""
    F = TaskFormat
    zero_shot = {"boolq": (F.boolq, "table3/BoolQ"), "piqa": (F.piqa, "table3/PIQA"), "siqa": (F.siqa, "table3/SIQA"),
                 "hellaswag": (F.hellaswag, "table3/HellaSwag"), "winogrande": (F.winogrande, "table3/WinoGrande"),
                 "arc_easy": (F.arc, "table3/ARC-e"), "arc_challenge": (F.arc, "table3/ARC-c"),
                 "openbookqa": (F.openbookqa, "table3/OBQA"), "race_middle": (F.race, "table6/RACE-middle"),
                 "race_high": (F.race, "table6/RACE-high"), "crows_pairs": (F.crows_pairs, "table12/Average"),
                 "winogender": (F.winogender, "table13/All"), "truthfulqa_mc1": (F.truthfulqa_mc1, None),
                 "truthfulqa_mc2": (F.truthfulqa_mc2, None)}  # fmt: skip
    tasks = {name: TaskConfig(format=fmt, paper=paper) for name, (fmt, paper) in zero_shot.items()}
    code = dict(max_new_tokens=512, top_p=0.95)
    maj = dict(temperature=0.6, top_p=0.95)
    tasks.update(
        triviaqa=TaskConfig(format=F.triviaqa, max_new_tokens=24, paper="table5/0-shot"),
        nq_open=TaskConfig(format=F.nq_open, max_new_tokens=24, paper="table4/0-shot"),
        mmlu=TaskConfig(format=F.mmlu, num_fewshot=5, fewshot_first=True, max_new_tokens=1, paper="table9/Average"),
        gsm8k=TaskConfig(format=F.gsm8k, num_fewshot=8, max_new_tokens=256, paper="table7/GSM8k"),
        gsm8k_maj=TaskConfig(format=F.gsm8k, num_fewshot=8, max_new_tokens=256, samples=100, **maj,
                             paper="table7/GSM8k maj1@k"),
        math=TaskConfig(format=F.math, num_fewshot=4, max_new_tokens=512, paper="table7/MATH"),
        math_maj=TaskConfig(format=F.math, num_fewshot=4, max_new_tokens=512, samples=256, **maj,
                            paper="table7/MATH maj1@k"),
        humaneval=TaskConfig(format=F.humaneval, samples=10, temperature=0.1, pass_k=[1], **code,
                             paper="table8/HumanEval pass@1"),
        humaneval_pass100=TaskConfig(format=F.humaneval, samples=200, temperature=0.8, pass_k=[1, 10, 100], **code,
                                     paper="table8/HumanEval pass@100"),
        mbpp=TaskConfig(format=F.mbpp, num_fewshot=3, fewshot_first=True, samples=10, temperature=0.1, pass_k=[1],
                        **code, paper="table8/MBPP pass@1"),
        mbpp_pass80=TaskConfig(format=F.mbpp, num_fewshot=3, fewshot_first=True, samples=200, temperature=0.8,
                               pass_k=[1, 10, 80], **code, paper="table8/MBPP pass@80"),
        realtoxicityprompts=TaskConfig(format=F.realtoxicityprompts, max_new_tokens=32, paper="table11/Basic"),
        realtoxicityprompts_respectful=TaskConfig(format=F.realtoxicityprompts, max_new_tokens=32, prefix=RESPECTFUL,
                                                  paper="table11/Respectful"),
    )  # fmt: skip
    return tasks


def default_catalog() -> dict[str, TaskConfig]:
    """The tasks every config knows: the built-in demos (evaluation/demo.py, evaluation/demo_report.py) and the
    LLaMA paper's (``paper_catalog``)."""
    demo = {"stdlib_next_line": TaskConfig(path="stdlib_next_line.jsonl", format=TaskFormat.multiple_choice, demo=True),
            "stdlib_import": TaskConfig(path="stdlib_import.jsonl", format=TaskFormat.generation, demo=True,
                                        max_new_tokens=8),
            "stdlib_text": TaskConfig(path="stdlib_text.jsonl", format=TaskFormat.text, demo=True)}  # fmt: skip
    report = {name: TaskConfig(demo=True, **fields) for name, fields in DEMO_ENTRIES.items()}
    return {**demo, **report, **paper_catalog()}


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
    allow_code_execution: bool = False
    """Code tasks (HumanEval, MBPP) run the programs the model writes, each in a sandboxed process of its own
    (evaluation/sandbox.py): set true to allow that."""
    execution: Limits = field(default_factory=Limits)
    execution_workers: int = 0
    """Programs run at once per process (0: one per CPU core)."""
    toxicity_classifier: Optional[str] = None
    """RealToxicityPrompts: a local Hugging Face sequence-classification directory (e.g. a copy of
    unitary/toxic-bert, Detoxify's model) that scores the continuations."""
    toxicity_label: Optional[str] = None
    """The classifier's toxic label; null: the one named "toxic" or "toxicity"."""

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
        tasks = {name: self._located(self.catalog[name]) for name in self.tasks}
        for name, task in tasks.items():
            if task.scorer == Scorer.code and not self.allow_code_execution:
                raise ValueError(f"task {name} runs the programs the model writes (each in a sandboxed process: "
                                 "evaluation/sandbox.py); set eval.allow_code_execution=true to allow it")  # fmt: skip
            if task.scorer == Scorer.toxicity and not self.toxicity_classifier and not task.demo:
                raise ValueError(f"task {name} scores continuations with a toxicity classifier: set "
                                 "eval.toxicity_classifier=/path/to/a/local/hf/classifier (e.g. a copy of unitary/toxic-bert)")  # fmt: skip
        return tasks

    def _located(self, task: TaskConfig) -> TaskConfig:
        """The task with a demo file's path inside ``demo_dir``."""
        if not task.demo:
            return task
        shots = str(Path(self.demo_dir) / task.fewshot_path) if task.fewshot_path else None
        return dataclasses.replace(task, path=str(Path(self.demo_dir) / task.path), fewshot_path=shots)


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
