"""A sentencepiece tokenizer with LLaMA's settings: loading, identity, and atomic training."""

from __future__ import annotations

import functools
import hashlib
import io
import os
from pathlib import Path
from typing import Any, Iterable, Iterator

import sentencepiece as spm

# LLaMA's sentencepiece BPE recipe (Touvron et al. 2023, section 2.1): digits split one per
# token, unknown UTF-8 falls back to bytes, text is kept verbatim (identity normalisation, no
# whitespace collapsing) so code indentation survives a round trip.
LLAMA_TRAINER_SETTINGS: dict[str, Any] = dict(
    model_type="bpe",
    byte_fallback=True,
    split_digits=True,
    normalization_rule_name="identity",
    add_dummy_prefix=True,
    remove_extra_whitespaces=False,
    allow_whitespace_only_pieces=True,
    unk_id=0,
    bos_id=1,
    eos_id=2,
    pad_id=-1,
)


def file_sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes: the identity of a tokenizer."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class Tokenizer:
    """Encodes text to ids and back with a sentencepiece model file."""

    def __init__(self, path: str | os.PathLike):
        if not Path(path).is_file():
            raise ValueError(
                f"data.tokenizer.path: {path} does not exist; "
                "point it at a sentencepiece tokenizer.model, or set it to null to train one"
            )
        self.path = str(path)
        self.sha256 = file_sha256(path)
        self._sp = spm.SentencePieceProcessor(model_file=self.path)
        self.vocab_size: int = self._sp.vocab_size()
        self.bos_id: int = self._sp.bos_id()
        self.eos_id: int = self._sp.eos_id()

    def encode(self, text: str, *, bos: bool = False, eos: bool = False) -> list[int]:
        """Token ids of ``text``, optionally wrapped in BOS/EOS."""
        ids = self._sp.encode(text)
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def decode(self, ids: Iterable[int]) -> str:
        return self._sp.decode([int(i) for i in ids])


@functools.lru_cache(maxsize=4)
def cached_tokenizer(path: str) -> Tokenizer:
    """One Tokenizer per model file per process (workers tokenize many shards with the same one)."""
    return Tokenizer(path)


def train_tokenizer(*, lines: Iterable[str], out_path: Path, tok_cfg: Any) -> None:
    """Trains a BPE model on ``lines`` and publishes it at ``out_path`` atomically.

    The model is trained in memory and written to a per-process temporary name that is renamed
    into place, so a crash never leaves a file that a later run would take for a finished
    tokenizer. Training in memory also keeps file paths out of the model's trainer spec: the same
    data and settings give byte-identical models (and so the same sha256) in any cache_dir.
    """
    model = io.BytesIO()
    # sentencepiece turns an exception raised by the iterator into RuntimeError("INTERNAL: <type>: <text>"),
    # which loses which record of which file was bad (data.sources.BadRecordError names it); keep the original.
    failure: list[BaseException] = []

    def sentences() -> Iterator[str]:
        try:
            yield from lines
        except Exception as err:
            failure.append(err)
            raise

    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=sentences(),
            model_writer=model,
            vocab_size=tok_cfg.vocab_size,
            character_coverage=tok_cfg.character_coverage,
            input_sentence_size=tok_cfg.max_sentences,
            shuffle_input_sentence=True,
            max_sentence_length=tok_cfg.max_sentence_length,
            num_threads=tok_cfg.num_threads,
            # Small corpora cannot always fill the requested vocabulary; use what they support
            # (vocab_size is read back from the model) instead of failing.
            hard_vocab_limit=False,
            minloglevel=2,
            **LLAMA_TRAINER_SETTINGS,
        )
    except RuntimeError:
        if failure:
            raise failure[0] from None
        raise
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp_path = out_path.with_name(f".{out_path.name}.tmp-{os.getpid()}")
    tmp_path.write_bytes(model.getvalue())
    os.replace(tmp_path, out_path)
