"""``python -m launch.preprocess``: clean one source (or, ``--config-name llama``, all of LLaMA's) on datatrove.

    python -m launch.preprocess preprocess=github raw_root=/data/raw
    python -m launch.preprocess preprocess=books executor.kind=slurm executor.tasks=256 executor.slurm.partition=cpu

The recipes are ``conf/preprocessing/preprocess/<source>.yaml``; the steps ``data/preprocess/``; docs/data.md
compares them with the paper's section 2.1. On the local executor the run ends when every stage has; on Slurm
it ends when every stage is submitted (each an array job depending on the one before).
"""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="pkg://conf.preprocessing", config_name="preprocess")
def main(cfg: DictConfig) -> None:
    from conf.schema import to_config
    from data.preprocess.config import ExecutorKind
    from data.preprocess.pipeline import run_preprocess

    try:
        config = to_config(cfg)
        layout = run_preprocess(config)
    except (ValueError, FileNotFoundError) as err:  # a recipe, path or record (BadRecordError) that does not work
        print(f"launch.preprocess: {type(err).__name__}: {err}", file=sys.stderr)
        sys.exit(2)
    written = f"{layout.clean}/*.{config.output_format.value}, {layout.stats}"
    if config.executor.kind == ExecutorKind.local:
        print(f"written: {written}")
    else:
        print(f"submitted; when the report job has run: {written}")


if __name__ == "__main__":
    main()
