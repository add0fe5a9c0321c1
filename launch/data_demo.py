"""``make data-demo``: LLaMA's data pipeline end to end on generated samples, on this machine.

1. ``data.preprocess.samples`` writes a small raw sample of each of the seven sources (``<root>/raw/<source>/``).
2. Each source's recipe (``conf/preprocessing/preprocess/<source>.yaml``) runs on datatrove's local executor
   (``<root>/clean/<source>/clean/*.jsonl`` and its ``stats.json``).
3. ``launch.prepare`` tokenizes the cleaned sources with the paper's sampling weights (Table 1), trains the
   tokenizer, writes the shards and ``index.json`` (``<root>/cache``).

    python -m launch.data_demo [--root outputs/data_demo] [--tasks 2]
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from data.preprocess.samples import SOURCES, write_samples

# LLaMA Table 1, sampling proportions in percent (conf/data/llama_mixture.yaml).
WEIGHTS = {"common_crawl": 67.0, "c4": 15.0, "github": 4.5, "wikipedia": 4.5, "books": 4.5, "arxiv": 2.5,
           "stack_exchange": 2.0}  # fmt: skip


def preprocess_source(source: str, *, raw: Path, out: Path, tasks: int, workers: int) -> dict:
    """Runs one source's recipe through Hydra, as ``python -m launch.preprocess preprocess=<source>`` would."""
    from hydra import compose, initialize_config_module

    from conf.schema import to_config
    from data.preprocess.pipeline import run_preprocess

    overrides = [f"preprocess={source}", f"raw_root={raw}", f"output_root={out}", f"executor.tasks={tasks}",
                 f"executor.workers={workers}"]  # fmt: skip
    with initialize_config_module(config_module="conf.preprocessing", version_base="1.3"):
        cfg = to_config(compose(config_name="preprocess", overrides=overrides))
    layout = run_preprocess(cfg)
    return json.loads(layout.stats.read_text())


def tokenize_overrides(clean: Path, *, cache: Path) -> list[str]:
    sources = [f"+data.sources.{s}={{paths: [{clean / s / 'clean'}], format: jsonl, weight: {WEIGHTS[s]}}}"
               for s in SOURCES]  # fmt: skip
    return ["~data.sources.python_stdlib", *sources, f"data.cache_dir={cache}", "data.tokenizer.vocab_size=2000",
            "data.progress=false", "data.val_fraction=0.05"]  # fmt: skip


def run_demo(root: Path, *, tasks: int = 2, workers: int = 1) -> dict:
    """Samples -> seven cleaned sources -> token shards under ``root`` (replacing an earlier demo there)."""
    from launch.prepare import main as prepare

    shutil.rmtree(root, ignore_errors=True)
    write_samples(root / "raw")
    reports = {s: preprocess_source(s, raw=root / "raw", out=root / "clean", tasks=tasks, workers=workers)
               for s in SOURCES}  # fmt: skip
    prepare(["--stage", "all", *tokenize_overrides(root / "clean", cache=root / "cache")])
    index = json.loads(next((root / "cache" / "shards").glob("*/index.json")).read_text())
    return {"reports": reports, "index": index}


def summary(result: dict) -> str:
    rows = ["", f"{'source':<16} {'raw docs':>9} {'clean docs':>10} {'train tokens':>13} {'weight':>7}"]
    for source, report in result["reports"].items():
        steps = report["steps"]
        rows.append(f"{source:<16} {steps[0]['docs_in']:>9} {steps[-1]['docs_out']:>10} "
                    f"{result['index']['num_tokens']['train'][source]:>13} {result['index']['weights'][source]:>7.3f}")  # fmt: skip
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m launch.data_demo", description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=Path("outputs/data_demo"))
    parser.add_argument("--tasks", type=int, default=2, help="datatrove tasks per stage")
    parser.add_argument("--workers", type=int, default=2, help="tasks run at once")
    args = parser.parse_args()
    result = run_demo(args.root.resolve(), tasks=args.tasks, workers=args.workers)
    print(summary(result))
    print(f"\nper-step reports: {args.root}/clean/<source>/stats.json; shards and index: {args.root}/cache/shards/")


if __name__ == "__main__":
    main()
