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
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Iterator, Optional

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


def _read_text(file: SourceFile, *, key: str, text_field: str, bad: BadRecords) -> Iterator[tuple[str, str]]:
    # errors="replace": one stray byte should not abort a multi-hour tokenization run.
    with open(file.path, encoding="utf-8", errors="replace") as fh:
        yield file.doc_id, fh.read()


class BadRecordPolicy(str, enum.Enum):
    """What a malformed record does (``data.bad_records``): stop the run naming it, or skip and count it."""

    error = "error"
    skip = "skip"


class BadRecordError(ValueError):
    """A record that cannot be read as a document; the message names the file and line (or row group)."""


@dataclass
class BadRecords:
    """The bad-record policy of one read, and what it skipped: the count and the first few locations."""

    policy: BadRecordPolicy = BadRecordPolicy.error
    setting: str = "data.bad_records"
    """The config key of ``policy``, and where skipped records are counted: what the error tells the user."""
    counted_in: str = "the log and the shard sidecars"
    skipped: int = 0
    locations: list[str] = field(default_factory=list)
    MAX_LOCATIONS: ClassVar[int] = 10

    def found(self, where: str, problem: str, *, records: int = 1) -> None:
        """A bad record (or ``records`` of them, e.g. an unreadable row group) at ``where``: raise or count."""
        if self.policy == BadRecordPolicy.error:
            raise BadRecordError(
                f"{where}: {problem}; fix or remove the record, or set {self.setting}=skip to skip such "
                f"records (they are counted in {self.counted_in})"
            )
        self.skipped += records
        if len(self.locations) < self.MAX_LOCATIONS:
            self.locations.append(f"{where}: {problem}")


def record_text(record: Any, *, where: str, key: str, text_field: str, bad: BadRecords) -> Optional[str]:
    """The text of a decoded record, or None (after ``bad.found``) when it has none; ``key`` is the config key
    that names the text field (shared by the tokenizer's readers and the preprocessing reader)."""
    if not isinstance(record, dict):
        bad.found(where, f"is a JSON {type(record).__name__}, not an object with a {text_field!r} field")
        return None
    if text_field not in record:
        bad.found(where, f"has no field {text_field!r} ({key}={text_field!r}; fields: {sorted(record)[:10]}); "
                  f"if every record lacks it, set {key} to the field holding the text")  # fmt: skip
        return None
    return _string_value(record[text_field], where=where, key=key, text_field=text_field, bad=bad)


def _string_value(value: Any, *, where: str, key: str, text_field: str, bad: BadRecords) -> Optional[str]:
    if isinstance(value, str):
        return value
    bad.found(where, f"has {text_field!r} of type {type(value).__name__}, not a string; "
              f"if every record does, point {key} at a string field")  # fmt: skip
    return None


def iter_jsonl_records(path: str, *, bad: BadRecords) -> Iterator[tuple[int, int, Any]]:
    """(0-based line index, 1-based line number, decoded value) of every non-blank line of a JSONL file; a line
    that is not JSON goes to ``bad`` (the preprocessing readers share this with the tokenizer's)."""
    with open(path, encoding="utf-8", errors="replace") as fh:
        for index, line in enumerate(fh):
            if not line.strip():
                continue
            try:
                yield index, index + 1, json.loads(line)
            except json.JSONDecodeError as err:
                bad.found(f"{path}:{index + 1}", f"is not valid JSON ({err.msg} at column {err.colno})")


def iter_parquet_records(path: str, *, columns: Optional[list[str]], bad: BadRecords) -> Iterator[tuple[int, str, dict]]:
    """(row number in the file, "<path>: row group g, row r", row as a dict of ``columns``, all when None) of
    every row; a row group that cannot be read goes to ``bad`` with all its rows. Raises ValueError when a
    column is missing (a config error, not a bad record)."""
    import pyarrow as pa  # imported lazily: only Parquet sources pay for pyarrow
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as err:
        # Unreadable footer: no row group can be found, so the whole file is the bad record.
        bad.found(path, f"is not a readable Parquet file ({err})")
        return
    missing = [c for c in columns or [] if c not in parquet.schema_arrow.names]
    if missing:
        raise ValueError(f"{path} has no column(s) {missing} (columns: {parquet.schema_arrow.names})")
    index = 0  # row number in the file, so ids do not depend on which row groups were skipped
    for group in range(parquet.num_row_groups):
        rows = parquet.metadata.row_group(group).num_rows
        where = f"{path}: row group {group}"
        try:
            records = parquet.read_row_group(group, columns=columns).to_pylist()
        except (pa.ArrowException, OSError) as err:
            bad.found(where, f"cannot be read ({err})", records=rows)
            index += rows
            continue
        for row, record in enumerate(records):
            yield index, f"{where}, row {row}", record
            index += 1


def _read_jsonl(file: SourceFile, *, key: str, text_field: str, bad: BadRecords) -> Iterator[tuple[str, str]]:
    for index, number, record in iter_jsonl_records(file.path, bad=bad):
        text = record_text(record, where=f"{file.path}:{number}", key=key, text_field=text_field, bad=bad)
        if text is not None:
            yield f"{file.doc_id}:{index}", text


def _read_parquet(file: SourceFile, *, key: str, text_field: str, bad: BadRecords) -> Iterator[tuple[str, str]]:
    try:
        for index, where, record in iter_parquet_records(file.path, columns=[text_field], bad=bad):
            value = record[text_field]
            if value is not None:
                text = _string_value(value, where=where, key=key, text_field=text_field, bad=bad)
                if text is not None:
                    yield f"{file.doc_id}:{index}", text
    except BadRecordError:
        raise
    except ValueError as err:  # a missing column: the config's text_field, not a record
        raise ValueError(f"{key}: {err}; set text_field to the text column") from None


@dataclass(frozen=True)
class Reader:
    suffixes: frozenset[str]
    """File suffixes that ``format: auto`` reads with this reader."""
    read: Callable[..., Iterator[tuple[str, str]]]
    """read(file, *, key, text_field, bad) -> (doc_id, text); ``key`` names the config key in errors, ``bad``
    decides what a malformed record does (``BadRecords.found``)."""


READERS: dict[SourceFormat, Reader] = {
    SourceFormat.text: Reader(frozenset(), _read_text),
    SourceFormat.jsonl: Reader(frozenset({".jsonl", ".ndjson"}), _read_jsonl),
    SourceFormat.parquet: Reader(frozenset({".parquet"}), _read_parquet),
}


def iter_documents(
    file: SourceFile, *, source: str, text_field: str, bad: Optional[BadRecords] = None
) -> Iterator[tuple[str, str]]:
    """Yields (doc_id, text) for every non-blank document in a file of source ``source``.

    A malformed record raises ``BadRecordError`` naming its file and line (Parquet: row group), unless ``bad``
    has the skip policy, which counts it instead.
    """
    bad = bad if bad is not None else BadRecords()
    documents = READERS[file.format].read(file, key=f"data.sources.{source}.text_field", text_field=text_field, bad=bad)
    for doc_id, text in documents:
        if text.strip():
            yield doc_id, text
