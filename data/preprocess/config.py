"""Typed config of preprocessing (``python -m launch.preprocess``): one source's pipeline and where it runs.

``conf/preprocess/<source>.yaml`` (the Hydra group ``preprocess``) holds each source's recipe: its input and its
steps, each ``{kind: <step>, <its options>}`` from ``pipeline.STEP_KINDS``. ``conf/preprocessing/preprocess.yaml`` adds the
executor and the output directory.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any, Optional

from data.sources import BadRecordPolicy


class ExecutorKind(str, enum.Enum):
    local = "local"  # datatrove's LocalPipelineExecutor: tasks run in worker processes here
    slurm = "slurm"  # datatrove's SlurmPipelineExecutor: every stage an sbatch array job, chained by dependencies


class OutputFormat(str, enum.Enum):
    jsonl = "jsonl"  # one {"text", "id", "metadata": {...}} object per line, as datatrove's JsonlWriter writes it
    parquet = "parquet"  # string columns text, id, metadata (the object as JSON: its keys differ from record to record)


@dataclass
class InputConfig:
    """The raw files of a source."""

    paths: list[str] = field(default_factory=list)
    """Files, directories (recursive) or globs of .jsonl / .parquet files."""
    text_key: str = "text"
    """Field with the document's text (Stack Exchange: the question's HTML body)."""
    id_key: str = "id"
    """Field with the document's id; without one the id is ``<file>:<row>``."""
    bad_records: BadRecordPolicy = BadRecordPolicy.error
    """A malformed record: ``error`` (stop, naming file and line) or ``skip`` (count it in stats.json)."""

    def __post_init__(self) -> None:
        self.bad_records = BadRecordPolicy(self.bad_records)


@dataclass
class SourcePipelineConfig:
    """One source's recipe (the ``preprocess`` group)."""

    name: str = "web"
    """The source's name: the output directory's and the stats'."""
    input: InputConfig = field(default_factory=InputConfig)
    steps: list[Any] = field(default_factory=list)
    """The steps in order, each ``{kind: ..., option: value}``; checked against the step's options."""


@dataclass
class SlurmConfig:
    """sbatch settings of every stage's array job (datatrove's SlurmPipelineExecutor)."""

    partition: str = "cpu"
    time: str = "24:00:00"
    cpus_per_task: int = 1
    mem_per_cpu_gb: int = 2
    job_name: str = "preprocess"
    sbatch_args: dict[str, Any] = field(default_factory=dict)
    """Further sbatch options, e.g. ``{account: myproject}``."""
    qos: str = ""
    """A QOS for the jobs; empty: the cluster's default (datatrove's own default, "normal", is not on every
    cluster)."""
    env_command: Optional[str] = None
    """A shell command run before each task, e.g. ``source /path/venv/bin/activate``: the jobs run datatrove's
    ``launch_pickled_pipeline`` and import this project, so both must be found there."""


@dataclass
class ExecutorConfig:
    kind: ExecutorKind = ExecutorKind.local
    tasks: int = 2
    """Tasks of each parallel stage; the input files are split over them (a file is never split)."""
    workers: int = -1
    """Local executor: tasks run at once (-1: all)."""
    slurm: SlurmConfig = field(default_factory=SlurmConfig)

    def __post_init__(self) -> None:
        self.kind = ExecutorKind(self.kind)
        if self.tasks < 1:
            raise ValueError(f"executor.tasks: got {self.tasks}; use 1 or more")


@dataclass
class PreprocessConfig:
    """``python -m launch.preprocess preprocess=<source> preprocess.input.paths=[...]``."""

    preprocess: SourcePipelineConfig = field(default_factory=SourcePipelineConfig)
    executor: ExecutorConfig = field(default_factory=ExecutorConfig)
    raw_root: str = "${oc.env:LLAMA_RAW_ROOT,/data/llama/raw}"
    """Where the recipes look for each source's raw files (``<raw_root>/<source>/``)."""
    output_root: str = "outputs/preprocess"
    output_dir: str = "${output_root}/${preprocess.name}"
    """The cleaned documents go to ``<output_dir>/clean/``, the per-step report to ``<output_dir>/stats.json``;
    datatrove's logs, completion markers and dedup signatures to ``<output_dir>/work/``."""
    output_format: OutputFormat = OutputFormat.jsonl
    """The cleaned files: ``<rank>.jsonl``, or ``*.parquet`` (datatrove numbers its files per rank); ``data.sources``
    reads both."""

    def __post_init__(self) -> None:
        self.output_format = OutputFormat(self.output_format)
