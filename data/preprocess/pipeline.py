"""A source's recipe (``PreprocessConfig``) as datatrove stages on the local or the Slurm executor, and the
per-step report.

A recipe is a list of steps. Most act on one document at a time and run in one pass; a deduplication needs
every document before it can decide about any, so it splits the work (datatrove's way): a signature stage over
all tasks, one or more merge stages, then a stage that re-reads the same documents and filters them. Steps
before a deduplication therefore write their output to ``work/segment_<k>/``, which the deduplication's stages
read. Every stage is one datatrove executor depending on the previous one; the last one writes
``<output_dir>/stats.json``.
"""

from __future__ import annotations

import inspect
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from collections.abc import Mapping, Sequence
from typing import Any, Callable, Optional

from datatrove.data import Document, DocumentsPipeline
from datatrove.pipeline.base import PipelineStep
from datatrove.pipeline.writers import JsonlWriter, ParquetWriter

from data.config import SourceConfig
from data.preprocess import steps
from data.preprocess.config import ExecutorKind, OutputFormat, PreprocessConfig
from data.sources import resolve_source_files

# ------------------------------------------------------------------------------------------------ the steps ----


def _c4_quality(**options: Any) -> PipelineStep:
    from datatrove.pipeline.filters import C4QualityFilter

    return C4QualityFilter(language=steps.RegexWordTokenizer(), **options)


def _c4_options() -> list[str]:
    from datatrove.pipeline.filters import C4QualityFilter

    return [n for n in inspect.signature(C4QualityFilter.__init__).parameters if n not in ("self", "exclusion_writer",
                                                                                              "language")]  # fmt: skip


@dataclass(frozen=True)
class Dedup:
    """A deduplication's stages: ``signature`` steps (after the reader, every task), ``merges`` (each a list of
    steps and its task count, None meaning all tasks), and the ``filter`` step of the last stage."""

    signature: list[PipelineStep]
    merges: list[tuple[list[PipelineStep], Optional[int]]]
    filter: PipelineStep


def _hash_config():
    """64-bit sha1 hashes for datatrove's deduplications: its default xxhash helper hashes str, which xxhash
    >= 4 refuses."""
    from datatrove.utils.hashing import HashConfig

    return HashConfig(precision=64, hash_fc="sha1")


def _exact_content(doc: Document) -> str:  # the annotation tells datatrove to hash str
    return doc.text


def _exact_dedup(work: Path) -> Dedup:
    """Exact duplicates (GitHub: the same file content): datatrove's ExactDedup, the first copy kept."""
    from datatrove.pipeline.dedup import ExactDedupFilter, ExactDedupSignature, ExactFindDedups
    from datatrove.pipeline.dedup.exact_dedup import ExactDedupConfig

    config = ExactDedupConfig(content_getter=_exact_content, hash_config=_hash_config())
    return Dedup(
        signature=[ExactDedupSignature(output_folder=str(work / "signatures"), config=config)],
        merges=[([ExactFindDedups(data_folder=str(work / "signatures"), output_folder=str(work / "duplicates"),
                                  config=config)], 1)],  # fmt: skip
        filter=ExactDedupFilter(data_folder=str(work / "duplicates"), config=config),
    )


def _minhash_dedup(work: Path, *, n_grams: int = 5, num_buckets: int = 20, hashes_per_bucket: int = 20) -> Dedup:
    """Near duplicates (books: > 90% overlap): datatrove's MinHash LSH, one copy of each cluster kept.

    Two documents become candidates when all ``hashes_per_bucket`` hashes agree in at least one of
    ``num_buckets`` buckets: probability 1 - (1 - J^r)^b for Jaccard similarity J of their word 5-gram sets.
    With b = r = 20 that is 0.93 at J = 0.9, 0.21 at 0.8 and 0.02 at 0.7 (threshold ~ (1/b)^(1/r) = 0.86),
    so pairs sharing > 90% of their content go and books that merely share a chapter stay.
    """
    from datatrove.pipeline.dedup import (MinhashDedupBuckets, MinhashDedupCluster, MinhashDedupFilter,
                                          MinhashDedupSignature)  # fmt: skip
    from datatrove.pipeline.dedup.minhash import MinhashConfig

    config = MinhashConfig(n_grams=n_grams, num_buckets=num_buckets, hashes_per_bucket=hashes_per_bucket,
                           hash_config=_hash_config())  # fmt: skip
    return Dedup(
        signature=[MinhashDedupSignature(output_folder=str(work / "signatures"), config=config,
                                         language=steps.RegexWordTokenizer())],  # fmt: skip
        merges=[
            ([MinhashDedupBuckets(input_folder=str(work / "signatures"), output_folder=str(work / "buckets"),
                                  config=config)], num_buckets),  # fmt: skip
            ([MinhashDedupCluster(input_folder=str(work / "buckets"), output_folder=str(work / "clusters"),
                                  config=config)], 1),  # fmt: skip
        ],
        filter=MinhashDedupFilter(input_folder=str(work / "clusters")),
    )


def _line_dedup(work: Path, *, min_documents: int = 2) -> Dedup:
    """CCNet's line deduplication (``steps.LineHashes`` / ``MergeLineHashes`` / ``LineDedupFilter``)."""
    return Dedup(
        signature=[steps.LineHashes(str(work))],
        merges=[([steps.MergeLineHashes(str(work), min_documents=min_documents)], 1)],
        filter=steps.LineDedupFilter(str(work)),
    )


@dataclass(frozen=True)
class StepKind:
    """A ``kind`` of step a recipe can name: ``build(**options)`` makes a one-pass step, or ``dedup(work_dir,
    **options)`` a deduplication's stages. ``options`` lists what the recipe may set."""

    build: Optional[Callable[..., PipelineStep]] = None
    dedup: Optional[Callable[..., Dedup]] = None
    options: Optional[Callable[[], list[str]]] = None

    def option_names(self) -> list[str]:
        if self.options is not None:
            return self.options()
        function = self.build or self.dedup
        names = list(inspect.signature(function).parameters)
        return [n for n in names if n not in ("self", "work")]


STEP_KINDS: dict[str, StepKind] = {
    "language": StepKind(build=steps.LanguageFilter),
    "quality_classifier": StepKind(build=steps.FastTextQualityFilter),
    "c4_quality": StepKind(build=_c4_quality, options=_c4_options),
    "license": StepKind(build=steps.LicenseFilter),
    "code_quality": StepKind(build=steps.CodeQualityFilter),
    "license_header": StepKind(build=steps.LicenseHeaderRemover),
    "wikitext": StepKind(build=steps.WikitextCleaner),
    "arxiv_latex": StepKind(build=steps.ArxivLatexCleaner),
    "stack_exchange": StepKind(build=steps.StackExchangeFormatter),
    "min_length": StepKind(build=steps.MinLengthFilter),
    "line_dedup": StepKind(dedup=_line_dedup),
    "exact_dedup": StepKind(dedup=_exact_dedup),
    "minhash_dedup": StepKind(dedup=_minhash_dedup),
}


@dataclass(frozen=True)
class StepSpec:
    """One entry of a recipe's ``steps``, checked: its report name, kind and options."""

    name: str
    kind: str
    options: dict[str, Any]


def step_specs(entries: list[Any]) -> list[StepSpec]:
    """The recipe's steps, each checked against its kind's options; names are the kinds, numbered when a kind
    repeats (``min_length``, ``min_length_2``)."""
    specs, seen = [], {}
    for index, entry in enumerate(entries):
        key = f"preprocess.steps[{index}]"
        entry = dict(entry) if isinstance(entry, Mapping) else entry
        if not isinstance(entry, dict) or "kind" not in entry:
            raise ValueError(f"{key}: a step is a mapping with a 'kind' (one of {sorted(STEP_KINDS)}), got {entry!r}")
        options = {k: v for k, v in entry.items() if k != "kind"}
        kind = STEP_KINDS.get(entry["kind"])
        if kind is None:
            raise ValueError(f"{key}.kind: unknown step {entry['kind']!r}; the steps: {sorted(STEP_KINDS)}")
        unknown = sorted(set(options) - set(kind.option_names()))
        if unknown:
            raise ValueError(f"{key}: {entry['kind']} has no option(s) {unknown}; its options: {kind.option_names()}")
        seen[entry["kind"]] = seen.get(entry["kind"], 0) + 1
        name = entry["kind"] if seen[entry["kind"]] == 1 else f"{entry['kind']}_{seen[entry['kind']]}"
        specs.append(StepSpec(name=name, kind=entry["kind"], options=_plain(options)))
    return specs


def _plain(value: Any) -> Any:
    """Mappings as dicts and sequences as tuples (the steps keep list options as tuples: they are hashable and
    cannot be changed by a step)."""
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, Sequence) and not isinstance(value, str):
        return tuple(_plain(v) for v in value)
    return value


# ----------------------------------------------------------------------------------------------- the stages ----


@dataclass
class Stage:
    name: str
    pipeline: list[Any]
    tasks: Optional[int] = None
    """None: the executor's task count."""


@dataclass
class Layout:
    """Where a run writes."""

    output_dir: Path

    @classmethod
    def of(cls, cfg: PreprocessConfig) -> Layout:
        return cls(Path(cfg.output_dir).resolve())

    @property
    def clean(self) -> Path:
        return self.output_dir / "clean"

    @property
    def work(self) -> Path:
        return self.output_dir / "work"

    @property
    def stats(self) -> Path:
        return self.output_dir / "stats.json"


def input_files(cfg: PreprocessConfig) -> list[tuple[str, str]]:
    """(absolute path, path relative to its entry) of the recipe's input files, sorted, de-duplicated."""
    source = SourceConfig(paths=list(cfg.preprocess.input.paths))
    try:
        files = resolve_source_files(name=cfg.preprocess.name, src=source)
    except ValueError:
        raise ValueError(f"preprocess.input.paths: {list(cfg.preprocess.input.paths)} match no files; point it at "
                         "the source's .jsonl / .parquet files (files, directories or globs)") from None  # fmt: skip
    return [(file.path, file.doc_id) for file in files]


def _parquet_row(writer: PipelineStep, document: Document) -> dict[str, str]:
    """A document as one Parquet row. The metadata is one JSON string: it holds whatever fields a source's raw
    records carry, and a struct column would take its schema from the first row and reject the rest."""
    return {"text": document.text, "id": str(document.id),
            "metadata": json.dumps(document.metadata, ensure_ascii=False, sort_keys=True)}  # fmt: skip


def clean_writer(out: Path, *, output_format: OutputFormat) -> PipelineStep:
    """The last stage's writer: ``<out>/<rank>.jsonl``, or ``<out>/<file>_<rank>.parquet``."""
    if output_format == OutputFormat.jsonl:
        return JsonlWriter(str(out), output_filename="${rank}.jsonl", compression=None)
    import pyarrow as pa

    schema = pa.schema([("text", pa.string()), ("id", pa.string()), ("metadata", pa.string())])
    return ParquetWriter(str(out), output_filename="${rank}.parquet", adapter=_parquet_row, schema=schema)


def build_stages(cfg: PreprocessConfig) -> list[Stage]:
    """The recipe as an ordered list of stages (each runs after the one before), the report last."""
    layout = Layout.of(cfg)
    specs = step_specs(list(cfg.preprocess.steps))
    files = input_files(cfg)
    source = cfg.preprocess.input

    def reader(segment: int) -> PipelineStep:
        if segment == 0:
            paths = [path for path, _ in files]
            base = os.path.commonpath([os.path.dirname(p) for p in paths])
            return steps.RecordReader(paths, base=base, text_key=source.text_key, id_key=source.id_key,
                                      bad_records=source.bad_records)  # fmt: skip
        return steps.RecordReader(folder=str(layout.work / f"segment_{segment - 1}"), nested_metadata=True)

    # Segments: runs of one-pass steps, each but the first opened by a deduplication.
    segments: list[list[StepSpec]] = [[]]
    for spec in specs:
        if STEP_KINDS[spec.kind].dedup is not None and segments[-1]:
            segments.append([])
        segments[-1].append(spec)

    stages: list[Stage] = []
    for number, segment in enumerate(segments):
        last = number == len(segments) - 1
        if last:
            writer = clean_writer(layout.clean, output_format=cfg.output_format)
        else:  # what the next segment's RecordReader reads back
            writer = JsonlWriter(str(layout.work / f"segment_{number}"), output_filename="${rank}.jsonl", compression=None)
        head: list[PipelineStep] = [steps.Measured("read", [reader(number)])] if number == 0 else [reader(number)]
        measured = []
        for position, spec in enumerate(segment):
            kind = STEP_KINDS[spec.kind]
            if kind.dedup is not None:
                assert position == 0
                dedup = kind.dedup(layout.work / spec.name, **spec.options)
                stages.append(Stage(f"{spec.name}_signature", [reader(number), *dedup.signature]))
                stages += [Stage(f"{spec.name}_merge_{i}", merge, tasks) for i, (merge, tasks) in enumerate(dedup.merges)]
                measured.append(steps.Measured(spec.name, [dedup.filter]))
            else:
                measured.append(steps.Measured(spec.name, [kind.build(**spec.options)]))
        stages.append(Stage(f"segment_{number}", [*head, *measured, writer]))
    stages.append(Stage("report", [ReportStep(layout=layout, source=cfg.preprocess.name,
                                              step_names=["read", *(s.name for s in specs)],
                                              input_bytes=sum(os.path.getsize(p) for p, _ in files))], 1))  # fmt: skip
    return stages


# ----------------------------------------------------------------------------------------------- the report ----


def _total(value: Any) -> float:
    """A datatrove stat as saved: a bare number, or a dict with its total."""
    if isinstance(value, dict):
        return value.get("total", 0)
    return value or 0


def collect_stats(work: Path, *, step_names: list[str]) -> tuple[list[dict[str, Any]], int]:
    """Sums the ``Measured`` entries of every stage's per-task stats files (``work/logs/*/stats/*.json``) by step;
    returns the steps in recipe order and the bad records skipped."""
    sums: dict[str, dict[str, float]] = {name: {} for name in step_names}
    prefix = f"{steps.Measured.type}: "
    for path in sorted(work.glob("logs/*/stats/*.json")):
        for entry in json.loads(path.read_text()):
            name = entry["name"].removeprefix(prefix)
            if entry["name"].startswith(prefix) and name in sums:
                for key, value in entry["stats"].items():
                    sums[name][key] = sums[name].get(key, 0) + _total(value)
    report, skipped = [], 0
    for name in step_names:
        stats = sums[name]
        dropped = {k.removeprefix("dropped_"): int(v) for k, v in sorted(stats.items()) if k.startswith("dropped_")}
        docs_in, docs_out = int(stats.get("docs_in", 0)), int(stats.get("docs_out", 0))
        if name != "read" and docs_in - docs_out > sum(dropped.values()):
            dropped[name] = docs_in - docs_out - sum(dropped.values())  # a deduplication gives no reason: itself
        skipped += int(stats.get("bad_records_skipped", 0))
        report.append({"step": name, "docs_in": docs_in, "docs_out": docs_out, "bytes_in": int(stats.get("bytes_in", 0)),
                       "bytes_out": int(stats.get("bytes_out", 0)), "dropped": dropped})  # fmt: skip
    return report, skipped


class ReportStep(PipelineStep):
    """The last stage (one task): writes ``<output_dir>/stats.json`` (documents and bytes in and out of every
    step, why documents were dropped) and prints it as a table."""

    name = "report"
    type = "📊 - REPORT"

    def __init__(self, *, layout: Layout, source: str, step_names: list[str], input_bytes: int):
        super().__init__()
        self.layout, self.source, self.step_names, self.input_bytes = layout, source, step_names, input_bytes

    def run(self, data: DocumentsPipeline = None, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        report, skipped = collect_stats(self.layout.work, step_names=self.step_names)
        report[0].update(docs_in=report[0]["docs_out"] + skipped, bytes_in=self.input_bytes)
        if skipped:
            report[0]["dropped"] = {"bad_record": skipped}
        payload = {"source": self.source, "output": str(self.layout.clean), "bad_records_skipped": skipped,
                   "steps": report}  # fmt: skip
        tmp = self.layout.stats.with_name(f".stats.json.tmp-{os.getpid()}")
        tmp.write_text(json.dumps(payload, indent=1) + "\n")
        os.replace(tmp, self.layout.stats)
        print(format_report(payload), flush=True)
        return iter(())


def format_report(payload: dict[str, Any]) -> str:
    rows = [f"preprocess {payload['source']}: -> {payload['output']}",
            f"{'step':<16} {'docs in':>9} {'docs out':>9} {'kB in':>9} {'kB out':>9}  dropped"]  # fmt: skip
    for step in payload["steps"]:
        dropped = ", ".join(f"{reason} {count}" for reason, count in step["dropped"].items()) or "-"
        rows.append(f"{step['step']:<16} {step['docs_in']:>9} {step['docs_out']:>9} {step['bytes_in'] / 1e3:>9.1f} "
                    f"{step['bytes_out'] / 1e3:>9.1f}  {dropped}")  # fmt: skip
    return "\n".join(rows)


# --------------------------------------------------------------------------------------------- the executors ----


def _config_fingerprint(cfg: PreprocessConfig) -> dict[str, Any]:
    recipe = {"preprocess": asdict(cfg.preprocess), "tasks": cfg.executor.tasks}
    if cfg.output_format != OutputFormat.jsonl:  # absent for JSONL, so markers written before the option still match
        recipe["output_format"] = cfg.output_format.value
    return json.loads(json.dumps(recipe, default=str))


def _claim_output_dir(cfg: PreprocessConfig, layout: Layout) -> None:
    """An output directory belongs to one recipe: datatrove skips tasks it finds completed there, which for a
    changed recipe would silently mix old and new output. A rerun of the same recipe resumes."""
    layout.work.mkdir(parents=True, exist_ok=True)
    marker = layout.work / "recipe.json"
    fingerprint = _config_fingerprint(cfg)
    if marker.is_file():
        if json.loads(marker.read_text()) != fingerprint:
            raise ValueError(f"output_dir={layout.output_dir} holds the output of another recipe (or task count; see "
                             f"{marker}); use a new output_dir, or delete that one to redo it")  # fmt: skip
        return
    marker.write_text(json.dumps(fingerprint, indent=1) + "\n")


def build_executor(cfg: PreprocessConfig, stages: list[Stage]):
    """Datatrove executors for the stages, each depending on the one before; returns the last (running it
    runs, or submits, all of them)."""
    layout = Layout.of(cfg)
    previous = None
    for stage in stages:
        tasks = stage.tasks or cfg.executor.tasks
        common = dict(pipeline=stage.pipeline, tasks=tasks, logging_dir=str(layout.work / "logs" / stage.name),
                      depends=previous)  # fmt: skip
        if cfg.executor.kind == ExecutorKind.local:
            from datatrove.executor import LocalPipelineExecutor

            workers = tasks if cfg.executor.workers < 1 else min(cfg.executor.workers, tasks)
            previous = LocalPipelineExecutor(**common, workers=workers)
        else:
            from datatrove.executor import SlurmPipelineExecutor

            slurm = cfg.executor.slurm
            previous = SlurmPipelineExecutor(
                **common, time=slurm.time, partition=slurm.partition, cpus_per_task=slurm.cpus_per_task,
                mem_per_cpu_gb=slurm.mem_per_cpu_gb, job_name=f"{slurm.job_name}-{cfg.preprocess.name}-{stage.name}",
                sbatch_args=dict(slurm.sbatch_args) or None, env_command=slurm.env_command, qos=slurm.qos,
            )  # fmt: skip
    return previous


def run_preprocess(cfg: PreprocessConfig) -> Layout:
    """Builds the recipe's stages and runs them (local) or submits them (Slurm); returns where they write."""
    layout = Layout.of(cfg)
    stages = build_stages(cfg)  # checks the recipe before anything is written
    _claim_output_dir(cfg, layout)
    build_executor(cfg, stages).run()
    return layout

