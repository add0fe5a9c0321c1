"""Tokenization speed per core: our shard writer (``data.shards.tokenize_shard``: read JSONL, split, encode with
BOS/EOS, write the .bin and its sidecar) against sentencepiece's raw encode of the same documents.

One process, one core, the same tokenizer and the same documents already in memory for the raw rates:

* ``raw_loop``: ``sp.encode(text)`` for each document in a Python loop (what any caller pays at least);
* ``raw_batch``: ``sp.encode(texts, num_threads=1)``, sentencepiece's C++ loop over the whole list;
* ``ours``: ``tokenize_shard`` over the JSONL files holding those documents, from disk to shards.

Each is timed ``--repeats`` times, alternating; the best of each is reported (the least disturbed by the
rest of the machine), with the ratio ours / raw for both raw rates. Target (issue 17): >= 0.8.

    python -m bench.tokenize_speed [--megabytes 8 --repeats 3]      # make bench-tokenize
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from bench.common import write_results
from data.config import TokenizerConfig
from data.shards import ShardTask, tokenize_shard
from data.sources import SourceFile, SourceFormat, stdlib_files
from data.tokenizer import Tokenizer, train_tokenizer


def write_corpus(directory: Path, *, megabytes: float) -> tuple[list[SourceFile], list[str]]:
    """The stdlib's .py files as JSONL documents, about ``megabytes`` MB in 4 files; returns them and the texts."""
    texts, size = [], 0
    for path, _ in stdlib_files():
        text = path.read_text(encoding="utf-8", errors="replace")
        if text.strip():
            texts.append(text)
            size += len(text.encode("utf-8"))
        if size >= megabytes * 1e6:
            break
    files = []
    for part in range(4):
        path = directory / f"part-{part}.jsonl"
        path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts[part::4]), encoding="utf-8")
        files.append(SourceFile(str(path), path.name, path.stat().st_size, SourceFormat.jsonl))
    return files, [t for part in range(4) for t in texts[part::4]]


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.tokenize_speed", description=__doc__.splitlines()[0])
    parser.add_argument("--megabytes", type=float, default=8.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--vocab-size", type=int, default=8192)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        files, texts = write_corpus(root, megabytes=args.megabytes)
        lines = [line for text in texts[::3] for line in text.splitlines() if line.strip()]
        train_tokenizer(lines=lines[:200_000], out_path=root / "tok.model",
                        tok_cfg=TokenizerConfig(vocab_size=args.vocab_size, num_threads=2))  # fmt: skip
        tokenizer = Tokenizer(root / "tok.model")
        sp = tokenizer._sp
        task = ShardTask(source="bench", index=0, files=tuple(files), text_field="text", val_fraction=0.0,
                         tokenizer_path=tokenizer.path, tokenizer_sha256=tokenizer.sha256,
                         vocab_size=tokenizer.vocab_size, out_dir=str(root / "shards"))  # fmt: skip
        num_tokens = sum(len(ids) for ids in sp.encode(texts))  # without BOS/EOS: what the raw encode produces
        seconds: dict[str, list[float]] = {"raw_loop": [], "raw_batch": [], "ours": []}
        for _ in range(args.repeats):
            start = time.perf_counter()
            for text in texts:
                sp.encode(text)
            seconds["raw_loop"].append(time.perf_counter() - start)
            start = time.perf_counter()
            sp.encode(texts, num_threads=1)
            seconds["raw_batch"].append(time.perf_counter() - start)
            start = time.perf_counter()
            sidecars = tokenize_shard(task)
            seconds["ours"].append(time.perf_counter() - start)
        assert sidecars["train"]["num_tokens"] == num_tokens + 2 * len(texts)  # the same tokens, plus BOS/EOS

    rates = {name: num_tokens / min(values) for name, values in seconds.items()}
    payload = {
        "documents": len(texts), "megabytes": round(sum(len(t.encode()) for t in texts) / 1e6, 2),
        "tokens": num_tokens, "vocab_size": tokenizer.vocab_size, "repeats": args.repeats,
        "seconds": seconds, "tokens_per_s_per_core": {k: round(v) for k, v in rates.items()},
        "ratio_ours_to_raw_loop": round(rates["ours"] / rates["raw_loop"], 3),
        "ratio_ours_to_raw_batch": round(rates["ours"] / rates["raw_batch"], 3),
    }  # fmt: skip
    path = write_results("tokenize_speed", payload)
    print(f"{payload['documents']} documents, {payload['megabytes']} MB, {num_tokens} tokens, best of {args.repeats}:")
    for name, rate in rates.items():
        print(f"  {name:<10} {rate / 1e6:6.3f} M tokens/s per core  ({min(seconds[name]):.2f} s)")
    print(f"  ours / raw_loop = {payload['ratio_ours_to_raw_loop']:.3f}, ours / raw_batch = "
          f"{payload['ratio_ours_to_raw_batch']:.3f}   -> {path}")  # fmt: skip


if __name__ == "__main__":
    main()
