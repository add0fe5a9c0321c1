"""``prepare_data``: get a tokenizer, tokenize every source into shards, write the index, return where they are.

Idempotent: a second call (or a call on another rank after rank 0 finished) resolves the same
files, finds the cached tokenizer and finished shards, and only returns their paths.

Across many machines the same work runs in three stages (``python -m launch.prepare --stage ...``, e.g. as
Slurm jobs, ``launch/prepare_slurm.sh``): ``tokenizer`` (once: resolve the files, train or load the
tokenizer), ``tokenize --task i --num-tasks N`` (task i tokenizes shard groups i, i + N, i + 2N, ... of the
one deterministic plan, so N independent tasks write exactly the shards one process would), and ``index``
(once, after them: check every shard is there and write ``index.json``). A shard is a function of its file
group alone, so the result is byte-identical to ``prepare_data`` in one process.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import multiprocessing
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

from tqdm import tqdm

from data.config import DataConfig, SourceConfig, normalized_weights
from data.shards import SPLITS, ShardTask, is_finished, read_sidecar, tokenize_shard
from data.sources import BadRecords, SourceFile, is_val, iter_documents, resolve_source_files
from data.tokenizer import LLAMA_TRAINER_SETTINGS, Tokenizer, train_tokenizer

logger = logging.getLogger(__name__)
_TOKENIZER_CACHE_VERSION = 1
INDEX_FORMAT_VERSION = 1


@dataclass
class PreparedData:
    """Where a prepared dataset lives; everything the loader and trainer need."""

    tokenizer_path: str
    """The sentencepiece model used for every shard."""
    tokenizer_sha256: str
    """Identity of that model."""
    vocab_size: int
    """Number of ids the model can produce."""
    bos_id: int
    """Id that starts every document."""
    eos_id: int
    """Id that ends every document."""
    shards: dict[str, dict[str, list[str]]]
    """split ("train"/"val") -> source name -> non-empty .bin paths, in shard order."""
    num_tokens: dict[str, dict[str, int]]
    """split -> source name -> tokens in that split."""
    weights: dict[str, float]
    """Normalised mixture weights by source name."""
    bad_records_skipped: dict[str, int] = field(default_factory=dict)
    """source name -> malformed records skipped under ``data.bad_records=skip`` (the sidecars say where)."""


def prepare_data(cfg: DataConfig) -> PreparedData:
    """Trains or loads the tokenizer, tokenizes every source (skipping finished shards), writes the index.

    With ``num_proc > 1`` tokenization runs in spawned worker processes, so a script that calls
    this at import time must do so under ``if __name__ == "__main__":`` (as the trainer does).

    Raises ValueError naming the key for a config that cannot be prepared.
    """
    plan = plan_shards(cfg)
    tokenize_tasks(cfg, plan=plan, task=0, num_tasks=1)
    return write_index(cfg, plan=plan)


@dataclass
class ShardPlan:
    """The tokenizer and every shard group of a config, in one fixed order (the same on every machine)."""

    tokenizer: Tokenizer
    tasks: list[ShardTask]

    @property
    def out_dir(self) -> Path:
        return Path(self.tasks[0].out_dir)


def shards_dir(cfg: DataConfig, *, tokenizer_sha256: str) -> Path:
    """Where the shards and ``index.json`` of the data tokenized by this tokenizer go."""
    return Path(cfg.cache_dir) / "shards" / tokenizer_sha256[:12]


def plan_shards(cfg: DataConfig, *, train: bool = True) -> ShardPlan:
    """Resolves every source's files and gets the tokenizer (trained into the cache when ``train``, else it
    must be there already, as for ``--stage tokenize``), and groups the files into shard tasks."""
    cfg.check()
    files = {name: resolve_source_files(name=name, src=src) for name, src in cfg.sources.items()}
    if train:
        for name, src in cfg.sources.items():
            _check_has_text(name=name, src=src, files=files[name], bad=BadRecords(policy=cfg.bad_records))
    tokenizer = _get_tokenizer(cfg, files=files, train=train)
    out_dir = shards_dir(cfg, tokenizer_sha256=tokenizer.sha256)
    tasks = [
        task
        for name, src in cfg.sources.items()
        for task in _plan_tasks(cfg, name=name, src=src, files=files[name], tokenizer=tokenizer, out_dir=out_dir)
    ]
    return ShardPlan(tokenizer=tokenizer, tasks=tasks)


def tokenize_tasks(cfg: DataConfig, *, plan: ShardPlan, task: int, num_tasks: int) -> list[ShardTask]:
    """Tokenizes the shard groups of task ``task`` of ``num_tasks`` (groups task, task + num_tasks, ...) that
    are not finished yet, with ``data.num_proc`` local workers; returns this task's groups."""
    if num_tasks < 1 or not 0 <= task < num_tasks:
        raise ValueError(f"data.prepare: task {task} of {num_tasks} does not exist; use 0 <= task < num_tasks")
    mine = plan.tasks[task::num_tasks]
    todo = [shard for shard in mine if not is_finished(shard)]
    logger.info("data: task %d of %d: %d of its %d shard groups already tokenized (%d groups in all)",
                task, num_tasks, len(mine) - len(todo), len(mine), len(plan.tasks))  # fmt: skip
    _run_tasks(todo, num_proc=cfg.num_proc, progress=cfg.progress)
    return mine


def write_index(cfg: DataConfig, *, plan: ShardPlan) -> PreparedData:
    """Checks that every shard of the plan is finished and writes ``<shards dir>/index.json`` (paths relative
    to the cache, so two caches of the same data have the same index); returns the prepared data."""
    missing = [group for group, shard in enumerate(plan.tasks) if not is_finished(shard)]
    if missing:
        raise RuntimeError(
            f"data: index: {len(missing)} of {len(plan.tasks)} shard groups are not tokenized "
            f"(first: {plan.tasks[missing[0]].bin_path('train')}); shard groups {missing[:10]} (group g belongs to "
            "task g % num_tasks) are missing: rerun --stage tokenize for their tasks (finished shards are kept)"
        )
    prepared = _collect(cfg, tasks=plan.tasks, tokenizer=plan.tokenizer)
    _write_index_file(cfg, prepared=prepared, out_dir=plan.out_dir)
    return prepared


def _write_index_file(cfg: DataConfig, *, prepared: PreparedData, out_dir: Path) -> None:
    cache = Path(cfg.cache_dir).resolve()

    def relative(path: str) -> str:
        return str(Path(path).resolve().relative_to(cache)) if Path(path).resolve().is_relative_to(cache) else path

    index = {
        "format_version": INDEX_FORMAT_VERSION,
        "tokenizer": relative(prepared.tokenizer_path),
        "tokenizer_sha256": prepared.tokenizer_sha256,
        "vocab_size": prepared.vocab_size,
        "bos_id": prepared.bos_id,
        "eos_id": prepared.eos_id,
        "weights": prepared.weights,
        "num_tokens": prepared.num_tokens,
        "bad_records_skipped": prepared.bad_records_skipped,
        "shards": {split: {name: [relative(p) for p in paths] for name, paths in by_source.items()}
                   for split, by_source in prepared.shards.items()},  # fmt: skip
    }
    tmp = out_dir / f".index.json.tmp-{os.getpid()}"
    tmp.write_text(json.dumps(index, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, out_dir / "index.json")


def _check_has_text(*, name: str, src: SourceConfig, files: list[SourceFile], bad: BadRecords) -> None:
    """Rejects a source whose files hold no document, before any training or tokenizing.

    Cheap for real sources: reading stops at the first non-blank document.
    """
    if not any(next(iter_documents(file, source=name, text_field=src.text_field, bad=bad), None) for file in files):
        raise ValueError(
            f"data.sources.{name}: paths {list(src.paths)} contain no text "
            "(every file is empty or blank); point the source at files with text or remove it"
        )


def _get_tokenizer(cfg: DataConfig, *, files: dict[str, list[SourceFile]], train: bool = True) -> Tokenizer:
    if cfg.tokenizer.path is not None:
        tokenizer = Tokenizer(cfg.tokenizer.path)  # raises ValueError naming data.tokenizer.path
        if tokenizer.vocab_size != cfg.tokenizer.vocab_size:
            logger.warning(
                "data.tokenizer.vocab_size=%d has no effect with data.tokenizer.path set; %s has %d pieces",
                cfg.tokenizer.vocab_size, tokenizer.path, tokenizer.vocab_size,
            )  # fmt: skip
        return tokenizer
    key = _tokenizer_key(cfg, files=files)
    path = Path(cfg.cache_dir) / "tokenizer" / key[:16] / "tokenizer.model"
    if not path.is_file() and not train:
        raise FileNotFoundError(
            f"data.prepare: the tokenizer this config trains is not in the cache yet ({path}); run "
            "`python -m launch.prepare --stage tokenizer` with the same overrides first, or set data.tokenizer.path"
        )
    if not path.is_file():
        logger.info("data: training a %d-piece tokenizer into %s", cfg.tokenizer.vocab_size, path)
        train_tokenizer(lines=_training_lines(cfg, files=files), out_path=path, tok_cfg=cfg.tokenizer)
    return Tokenizer(path)


def _tokenizer_key(cfg: DataConfig, *, files: dict[str, list[SourceFile]]) -> str:
    """Hash of everything that decides a trained tokenizer, so configs never share one by mistake."""
    tok = cfg.tokenizer
    recipe = {
        "version": _TOKENIZER_CACHE_VERSION,
        "settings": LLAMA_TRAINER_SETTINGS,
        "vocab_size": tok.vocab_size,
        "character_coverage": tok.character_coverage,
        "max_sentences": tok.max_sentences,
        "max_sentence_length": tok.max_sentence_length,
        "val_fraction": cfg.val_fraction,
        "sources": {
            name: {
                "weight": float(src.weight),
                "text_field": src.text_field,
                # doc_id + size, not absolute paths: moving a corpus keeps its tokenizer.
                "files": [(file.doc_id, file.size, file.format.value) for file in files[name]],
            }
            for name, src in cfg.sources.items()
        },
    }
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode("utf-8")).hexdigest()


def _training_lines(cfg: DataConfig, *, files: dict[str, list[SourceFile]]) -> Iterator[str]:
    """Non-blank lines of train documents, at most ``max_sentences`` split across sources by weight.

    Files are visited in a hash-shuffled (but fixed) order so a capped source still contributes
    lines from across the corpus, not only its alphabetically first files.
    """
    for name, weight in normalized_weights(cfg).items():
        budget = math.ceil(cfg.tokenizer.max_sentences * weight)
        ordered = sorted(files[name], key=lambda f: hashlib.blake2b(f.doc_id.encode(), digest_size=8).digest())
        yield from _take(_train_lines(ordered, cfg=cfg, source=name), budget)


def _train_lines(files: Iterable[SourceFile], *, cfg: DataConfig, source: str) -> Iterator[str]:
    text_field = cfg.sources[source].text_field
    bad = BadRecords(policy=cfg.bad_records)
    try:
        for file in files:
            for doc_id, text in iter_documents(file, source=source, text_field=text_field, bad=bad):
                if not is_val(doc_id, val_fraction=cfg.val_fraction):
                    yield from (line for line in text.splitlines() if line.strip())
    finally:
        if bad.skipped:
            logger.warning("data.sources.%s: tokenizer training skipped %d bad record(s) (data.bad_records=skip); "
                           "first: %s", source, bad.skipped, bad.locations[0])  # fmt: skip


def _take(items: Iterator[str], count: int) -> Iterator[str]:
    for index, item in enumerate(items):
        if index >= count:
            return
        yield item


def _group_files(files: list[SourceFile], *, shard_bytes: int) -> list[tuple[SourceFile, ...]]:
    """Consecutive files packed into groups of about ``shard_bytes`` input bytes (a file is never split)."""
    groups: list[tuple[SourceFile, ...]] = []
    current: list[SourceFile] = []
    size = 0
    for file in files:
        if current and size + file.size > shard_bytes:
            groups.append(tuple(current))
            current, size = [], 0
        current.append(file)
        size += file.size
    if current:
        groups.append(tuple(current))
    return groups


def _plan_tasks(
    cfg: DataConfig, *, name: str, src: SourceConfig, files: list[SourceFile], tokenizer: Tokenizer, out_dir: Path
) -> list[ShardTask]:
    return [
        ShardTask(
            source=name,
            index=index,
            files=group,
            text_field=src.text_field,
            val_fraction=float(cfg.val_fraction),
            tokenizer_path=tokenizer.path,
            tokenizer_sha256=tokenizer.sha256,
            vocab_size=tokenizer.vocab_size,
            out_dir=str(out_dir),
            bad_records=cfg.bad_records,
        )
        for index, group in enumerate(_group_files(files, shard_bytes=cfg.shard_bytes))
    ]


def _run_tasks(tasks: list[ShardTask], *, num_proc: int, progress: bool) -> None:
    if not tasks:
        return
    # Biggest groups first so the last worker is not left alone with a large file.
    tasks = sorted(tasks, key=lambda task: -task.input_bytes)
    bar = tqdm(total=sum(t.input_bytes for t in tasks), unit="B", unit_scale=True, desc="tokenizing",
               file=sys.stderr, disable=not progress)
    with bar:
        if num_proc == 1 or len(tasks) == 1:
            for task in tasks:
                tokenize_shard(task)
                bar.update(task.input_bytes)
            return
        # spawn, not fork: the caller may already hold threads (torch, NCCL) that fork would copy mid-lock.
        context = multiprocessing.get_context("spawn")
        with context.Pool(processes=min(num_proc, len(tasks))) as pool:
            for sidecars in pool.imap_unordered(tokenize_shard, tasks):
                bar.update(sum(entry["size"] for entry in sidecars["train"]["inputs"]))


def _collect(cfg: DataConfig, *, tasks: list[ShardTask], tokenizer: Tokenizer) -> PreparedData:
    """Reads the sidecars back into paths and token counts."""
    shards: dict[str, dict[str, list[str]]] = {split: {name: [] for name in cfg.sources} for split in SPLITS}
    num_tokens = {split: {name: 0 for name in cfg.sources} for split in SPLITS}
    skipped = {name: 0 for name in cfg.sources}
    for task in tasks:
        for split in SPLITS:
            sidecar = read_sidecar(task.bin_path(split))
            num_tokens[split][task.source] += sidecar["num_tokens"]
            if sidecar["num_tokens"] > 0:
                shards[split][task.source].append(str(task.bin_path(split)))
        skipped[task.source] += sidecar.get("bad_records_skipped", 0)  # the same in both splits' sidecars
    for name, count in skipped.items():
        if count:
            logger.warning("data.sources.%s: %d bad record(s) skipped in all (data.bad_records=skip); the shard "
                           "sidecars list where", name, count)  # fmt: skip
    return PreparedData(
        tokenizer_path=tokenizer.path,
        tokenizer_sha256=tokenizer.sha256,
        vocab_size=tokenizer.vocab_size,
        bos_id=tokenizer.bos_id,
        eos_id=tokenizer.eos_id,
        shards=shards,
        num_tokens=num_tokens,
        weights=normalized_weights(cfg),
        bad_records_skipped=skipped,
    )
