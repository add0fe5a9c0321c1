"""Finding a source's files, reading documents out of them, and the train/val split.

File formats: each ``SourceFormat`` has a ``Reader`` in ``READERS`` (the file suffixes ``auto`` picks it by,
and a function yielding (doc_id, text)); adding a format is a member and a reader here, and its test.
"""

from __future__ import annotations

import enum
import glob
import hashlib
import json
import os
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

if TYPE_CHECKING:
    from data.config import SourceConfig

STDLIB_ENTRY = "stdlib"
# Directories under the stdlib that are test suites or vendored packages, not library code; leaving
# them out keeps the default corpus ~11 MB instead of ~31 MB.
_STDLIB_SKIP_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"})


class SourceFormat(str, enum.Enum):
    """How a source's files are read (``data.sources.<name>.format``); a ``str`` enum, as OmegaConf needs."""

    auto = "auto"  # by file suffix (READERS), plain text where none matches
    text = "text"
    jsonl = "jsonl"
    parquet = "parquet"


@dataclass(frozen=True)
class SourceFile:
    """One input file of a source."""

    path: str
    """Absolute path used to read the file."""
    doc_id: str
    """Location-independent id (path relative to the entry that matched it); documents hash this for the split."""
    size: int
    """Size in bytes, used to group files into shards and to key the tokenizer cache."""
    format: SourceFormat
    """Resolved reader (never auto)."""


def stdlib_files() -> list[tuple[Path, Path]]:
    """The running interpreter's stdlib *.py files as sorted (file, stdlib root) pairs, tests excluded."""
    root = Path(sysconfig.get_paths()["stdlib"]).resolve()
    files = [
        path
        for path in root.rglob("*.py")
        if not _STDLIB_SKIP_DIRS.intersection(path.relative_to(root).parts[:-1])
    ]
    return [(path, root) for path in sorted(files)]


def _expand_entry(entry: str) -> list[tuple[Path, Path]]:
    """Files one ``paths`` entry names, each with the base its doc id is taken relative to."""
    if entry == STDLIB_ENTRY:
        return stdlib_files()
    expanded = os.path.expanduser(entry)
    if glob.has_magic(expanded):
        base = _glob_base(expanded)
        matches = sorted(Path(p) for p in glob.glob(expanded, recursive=True))
        return [(path, base) for path in matches if path.is_file()]
    path = Path(expanded)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
        return [(file, path) for file in files]
    if path.is_file():
        return [(path, path.parent)]
    return []


def _glob_base(pattern: str) -> Path:
    """The leading directories of a glob that contain no wildcard."""
    parts = Path(pattern).parts
    plain = parts[: next(i for i, part in enumerate(parts) if glob.has_magic(part))]
    return Path(*plain) if plain else Path(".")


def _resolve_format(path: Path, fmt: SourceFormat) -> SourceFormat:
    """``fmt``, or for ``auto`` the format whose reader claims ``path``'s suffix (else plain text)."""
    if fmt != SourceFormat.auto:
        return fmt
    suffix = path.suffix.lower()
    return next((f for f, reader in READERS.items() if suffix in reader.suffixes), SourceFormat.text)


def resolve_source_files(*, name: str, src: SourceConfig) -> list[SourceFile]:
    """Expands a source's ``paths`` into a deterministic, de-duplicated file list.

    Raises ValueError naming ``data.sources.<name>`` when nothing matches.
    """
    seen: set[Path] = set()
    files: list[SourceFile] = []
    for entry in src.paths:
        for path, base in _expand_entry(str(entry)):
            resolved = path.resolve()
            if resolved in seen:
                continue
            seen.add(resolved)
            doc_id = os.path.relpath(path.absolute(), base.absolute())
            fmt = _resolve_format(path, SourceFormat(src.format))
            files.append(SourceFile(str(resolved), doc_id, resolved.stat().st_size, fmt))
    if src.max_files is not None:
        files = files[: src.max_files]
    if not files:
        raise ValueError(
            f"data.sources.{name}: paths {list(src.paths)} match no files; "
            "fix the paths (files, directories, globs or 'stdlib')"
        )
    return files


def is_val(doc_id: str, *, val_fraction: float) -> bool:
    """Stable split decision: the same id lands in the same split on every machine and run."""
    if val_fraction <= 0.0:
        return False
    digest = hashlib.blake2b(doc_id.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2**64 < val_fraction


def _read_text(file: SourceFile) -> Iterator[tuple[str, str]]:
    # errors="replace": one stray byte should not abort a multi-hour tokenization run.
    with open(file.path, encoding="utf-8", errors="replace") as fh:
        yield file.doc_id, fh.read()


def _checked_text(value: Any, *, where: str, key: str, text_field: str) -> str:
    if not isinstance(value, str):
        raise ValueError(
            f"{key}: {where} has {text_field!r} of type {type(value).__name__}; "
            "point text_field at a string field"
        )
    return value


def _read_jsonl(file: SourceFile, *, key: str, text_field: str) -> Iterator[tuple[str, str]]:
    with open(file.path, encoding="utf-8", errors="replace") as fh:
        for index, line in enumerate(fh):
            if not line.strip():
                continue
            record = json.loads(line)
            where = f"{file.path}:{index + 1}"
            if text_field not in record:
                raise ValueError(
                    f"{key}: {where} has no field {text_field!r} "
                    f"(fields: {sorted(record)}); set text_field to the field holding the text"
                )
            text = _checked_text(record[text_field], where=where, key=key, text_field=text_field)
            yield f"{file.doc_id}:{index}", text


def _read_parquet(file: SourceFile, *, key: str, text_field: str) -> Iterator[tuple[str, str]]:
    import pyarrow.parquet as pq  # imported lazily: only Parquet sources pay for pyarrow

    parquet = pq.ParquetFile(file.path)
    if text_field not in parquet.schema_arrow.names:
        raise ValueError(
            f"{key}: {file.path} has no column {text_field!r} "
            f"(columns: {parquet.schema_arrow.names}); set text_field to the text column"
        )
    index = 0
    for batch in parquet.iter_batches(columns=[text_field], batch_size=1024):
        for value in batch.column(0).to_pylist():
            if value is not None:
                yield f"{file.doc_id}:{index}", _checked_text(value, where=file.path, key=key, text_field=text_field)
            index += 1


@dataclass(frozen=True)
class Reader:
    suffixes: frozenset[str]
    """File suffixes that ``format: auto`` reads with this reader."""
    read: Callable[..., Iterator[tuple[str, str]]]
    """read(file, *, key, text_field) -> (doc_id, text); ``key`` names the config key in errors."""


READERS: dict[SourceFormat, Reader] = {
    SourceFormat.text: Reader(frozenset(), lambda file, *, key, text_field: _read_text(file)),
    SourceFormat.jsonl: Reader(frozenset({".jsonl", ".ndjson"}), _read_jsonl),
    SourceFormat.parquet: Reader(frozenset({".parquet"}), _read_parquet),
}


def iter_documents(file: SourceFile, *, source: str, text_field: str) -> Iterator[tuple[str, str]]:
    """Yields (doc_id, text) for every non-blank document in a file of source ``source``."""
    documents = READERS[file.format].read(file, key=f"data.sources.{source}.text_field", text_field=text_field)
    for doc_id, text in documents:
        if text.strip():
            yield doc_id, text
