"""Instruction data for finetuning (LLaMA §4, LLaMA-I): records, the prompt template, tokens and loss masks.

Two JSONL layouts, one record a line (``layout=auto`` tells them apart by their fields):

- ``instruction``: ``instruction``, optional ``input``, ``output`` (Alpaca's and Flan's flat records);
- ``chat``: ``messages``, a list of ``{role, content}`` turns, roles ``system``, ``user`` and ``assistant``.

A record becomes segments of text, each trained on or not: the prompt (the template filled with the
instruction and input; in a chat every system and user turn) is context only, the response (``output``; every
assistant turn) is trained on and ends with EOS, so the model learns where an answer stops. The template is
Flan's style (Chung et al. 2022: natural-language instructions, the answer after them, no role markers):
``"{instruction}\\n\\n{input}\\n\\n"`` then the answer, or ``"{instruction}\\n\\n"`` without an input; chats
write each turn with its own template (``InstructionTemplate``). Segments are tokenized one by one, after
BOS: the prompt's tokens are exactly those a prompt gets at generation time (evaluation/ encodes BOS +
prompt and generates from there), so training and inference see the same boundary.

Labels: position t predicts token t + 1; a label is kept (its token trained on) only where token t + 1 is
in a trained segment, and is ``IGNORE_INDEX`` otherwise. A record whose prompt leaves no room for a
response in ``seq_len + 1`` tokens is dropped, a longer one cut (both counted, and logged by the loader).
A malformed record stops with its file and line.
"""

from __future__ import annotations

import enum
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional

import numpy as np

IGNORE_INDEX = -100
"""A label that is not trained on (the trainer's cross-entropy ignores it)."""


class InstructionLayout(str, enum.Enum):
    auto = "auto"
    instruction = "instruction"  # instruction, input, output
    chat = "chat"  # messages [{role, content}]


@dataclass
class InstructionTemplate:
    """How records become text (``data.instructions.template.*``): ``{instruction}``, ``{input}`` and
    ``{content}`` are filled in; the response follows its prompt directly."""

    prompt: str = "{instruction}\n\n{input}\n\n"
    prompt_no_input: str = "{instruction}\n\n"
    system: str = "{content}\n\n"
    user: str = "{content}\n\n"
    assistant: str = "{content}"
    """An assistant turn (trained on); EOS follows it, then the next turn."""


@dataclass
class InstructionsConfig:
    """Finetuning data (``data.instructions.*``): setting ``train`` turns a run into finetuning."""

    train: Optional[str] = None
    """A JSONL file (or a directory of them) of instruction or chat records; null: pre-training."""
    val: Optional[str] = None
    """Validation records; null: about one record of ``train`` in ``val_every``, picked by a stable hash of
    its position, is held out (not every n-th: a file written in a cycle would hold out one kind only)."""
    val_every: int = 20
    layout: InstructionLayout = InstructionLayout.auto
    template: InstructionTemplate = field(default_factory=InstructionTemplate)
    max_records: Optional[int] = None
    """Read at most this many records of ``train`` (quick looks)."""

    def __post_init__(self) -> None:
        self.layout = InstructionLayout(self.layout)
        if self.val_every < 2 or (self.max_records is not None and self.max_records < 1):
            raise ValueError("data.instructions: val_every must be >= 2 and max_records (if set) >= 1")

    @property
    def enabled(self) -> bool:
        return self.train is not None


class InstructionFileError(ValueError):
    """A record that cannot be read: names the file and the line."""


Segment = tuple[str, bool]
"""(text, trained on)."""


def _segments(row: dict, *, layout: InstructionLayout, template: InstructionTemplate) -> list[Segment]:
    if layout == InstructionLayout.auto:
        layout = InstructionLayout.chat if "messages" in row else InstructionLayout.instruction
    if layout == InstructionLayout.instruction:
        for key in ("instruction", "output"):
            if not isinstance(row.get(key), str):
                raise ValueError(f"the instruction layout needs a string {key!r}")
        given = row.get("input") or ""
        if not isinstance(given, str):
            raise ValueError("input must be a string")
        prompt = (template.prompt if given.strip() else template.prompt_no_input).format(
            instruction=row["instruction"], input=given)
        return [(prompt, False), (template.assistant.format(content=row["output"]), True)]
    messages = row.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ValueError("the chat layout needs a non-empty list 'messages' of {role, content}")
    segments = []
    for turn in messages:
        role, content = (turn.get("role"), turn.get("content")) if isinstance(turn, dict) else (None, None)
        if role not in ("system", "user", "assistant") or not isinstance(content, str):
            raise ValueError(f"each message needs a role (system, user, assistant) and a string content; got {turn!r}")
        segments.append((getattr(template, role).format(content=content), role == "assistant"))
    if not any(trained for _, trained in segments):
        raise ValueError("a chat needs at least one assistant turn to train on")
    return segments


def prompt_and_response(row: dict, *, template: InstructionTemplate = InstructionTemplate()) -> tuple[str, str]:
    """An ``instruction``-layout record's prompt (as training formats it) and its answer: what evaluation
    asks a finetuned model and compares its generation with."""
    segments = _segments(row, layout=InstructionLayout.instruction, template=template)
    return segments[0][0], row["output"]


def _files(path: Path) -> list[Path]:
    files = sorted(path.glob("*.jsonl")) if path.is_dir() else [path]
    if not files or not all(f.is_file() for f in files):
        raise InstructionFileError(f"instruction data {path} is not a JSONL file or a directory of them; "
                                   "check data.instructions.train / val")  # fmt: skip
    return files


def read_records(path: str | Path, *, layout: InstructionLayout, template: InstructionTemplate,
                 limit: Optional[int] = None) -> Iterator[list[Segment]]:  # fmt: skip
    """Each record's segments, in file order; a malformed one raises InstructionFileError with file:line."""
    count = 0
    for file in _files(Path(path)):
        with file.open(encoding="utf-8") as handle:
            for number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                if limit is not None and count >= limit:
                    return
                try:
                    row = json.loads(line)
                    if not isinstance(row, dict):
                        raise ValueError(f"expected a JSON object, got {type(row).__name__}")
                    segments = _segments(row, layout=layout, template=template)
                except json.JSONDecodeError as err:
                    raise InstructionFileError(f"{file}:{number}: not valid JSON ({err.msg})") from None
                except (ValueError, KeyError, IndexError) as err:
                    raise InstructionFileError(f"{file}:{number}: {err} (data.instructions.layout={layout.value})") from None
                count += 1
                yield segments


@dataclass(frozen=True)
class TokenizedRecord:
    ids: np.ndarray
    """BOS, then every segment's tokens (EOS after each trained one): (L,) int64."""
    trained: np.ndarray
    """(L,) bool: the token is part of a response (its prediction is trained on)."""

    def inputs_labels(self) -> tuple[np.ndarray, np.ndarray]:
        """(L - 1,) inputs and labels: labels[t] = ids[t + 1] where that token is trained on, else IGNORE_INDEX."""
        labels = np.where(self.trained[1:], self.ids[1:], IGNORE_INDEX)
        return self.ids[:-1], labels


def tokenize_record(segments: list[Segment], *, encode, bos_id: int, eos_id: int,
                    max_tokens: int) -> tuple[Optional[TokenizedRecord], bool]:  # fmt: skip
    """(the record's tokens cut to ``max_tokens``, whether it was cut); None when no trained token remains."""
    ids, trained = [bos_id], [False]
    for text, is_response in segments:
        pieces = list(encode(text)) + ([eos_id] if is_response else [])
        ids += pieces
        trained += [is_response] * len(pieces)
    cut = len(ids) > max_tokens
    ids, trained = ids[:max_tokens], trained[:max_tokens]
    if not any(trained[1:]):
        return None, cut
    return TokenizedRecord(ids=np.asarray(ids, dtype=np.int64), trained=np.asarray(trained, dtype=bool)), cut


@dataclass
class TokenizedSet:
    records: list[TokenizedRecord]
    dropped: int = 0
    """Records whose prompt left no room for a response."""
    cut: int = 0
    """Records cut to the sequence length."""


def tokenize_records(records: Iterator[list[Segment]], *, encode, bos_id: int, eos_id: int, seq_len: int) -> TokenizedSet:
    """Every record in at most ``seq_len + 1`` tokens (a packed row's inputs and labels are its shifts)."""
    out = TokenizedSet(records=[])
    for segments in records:
        record, cut = tokenize_record(segments, encode=encode, bos_id=bos_id, eos_id=eos_id, max_tokens=seq_len + 1)
        if record is None:
            out.dropped += 1
            continue
        out.cut += int(cut)
        out.records.append(record)
    return out


def _held_out(index: int, *, every: int) -> bool:
    digest = hashlib.blake2b(index.to_bytes(8, "little"), digest_size=8).digest()
    return int.from_bytes(digest, "little") % every == 0


@dataclass
class InstructionData:
    train: TokenizedSet
    val: TokenizedSet


def prepare_instructions(cfg: InstructionsConfig, *, encode, bos_id: int, eos_id: int, seq_len: int) -> InstructionData:
    """The train and validation records, tokenized for rows of ``seq_len``: ``cfg.val``'s, or every
    ``cfg.val_every``-th record of ``cfg.train`` held out."""
    if not cfg.enabled:
        raise ValueError("data.instructions.train is not set: nothing to finetune on")
    tokens = dict(encode=encode, bos_id=bos_id, eos_id=eos_id, seq_len=seq_len)
    records = list(read_records(cfg.train, layout=cfg.layout, template=cfg.template, limit=cfg.max_records))
    if cfg.val is not None:
        train = tokenize_records(iter(records), **tokens)
        val = tokenize_records(read_records(cfg.val, layout=cfg.layout, template=cfg.template), **tokens)
    else:
        held_out = [_held_out(i, every=cfg.val_every) for i in range(len(records))]
        held = [r for r, out in zip(records, held_out) if out]
        kept = [r for r, out in zip(records, held_out) if not out]
        train, val = tokenize_records(iter(kept), **tokens), tokenize_records(iter(held), **tokens)
    for name, part in (("train", train), ("validation", val)):
        if not part.records:
            raise ValueError(f"data.instructions: no {name} records left (of {cfg.train if name == 'train' else cfg.val or cfg.train}"
                             f"; {part.dropped} had no room for a response in data.seq_len={seq_len})")  # fmt: skip
    return InstructionData(train=train, val=val)
