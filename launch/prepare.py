"""``python -m launch.prepare``: tokenize the training config's data, in one process or as stages across machines.

    python -m launch.prepare data=llama_mixture                       # everything here (what the trainer does)
    python -m launch.prepare --stage tokenizer data=...               # once: resolve files, train the tokenizer
    python -m launch.prepare --stage tokenize --task 3 --num-tasks 64 data=...   # any number of these, anywhere
    python -m launch.prepare --stage index data=...                   # once, after them: check, write index.json

Under a Slurm array (``launch/prepare_slurm.sh`` submits the three stages with dependencies) ``--task`` and
``--num-tasks`` default to the array task. The stages and why they give the same bytes as one process are in
``data/prepare.py``.
"""

from __future__ import annotations

import argparse
import logging
import os

from data.prepare import plan_shards, prepare_data, shards_dir, tokenize_tasks, write_index


STAGES = ("all", "tokenizer", "tokenize", "index")


def _slurm_array_task() -> tuple[int, int]:
    """(task, num_tasks) of a Slurm array job step, or (0, 1) outside one."""
    if "SLURM_ARRAY_TASK_ID" not in os.environ:
        return 0, 1
    first = int(os.environ.get("SLURM_ARRAY_TASK_MIN", "0"))
    return int(os.environ["SLURM_ARRAY_TASK_ID"]) - first, int(os.environ["SLURM_ARRAY_TASK_COUNT"])


def main(argv: list[str] | None = None) -> None:
    """``python -m launch.prepare [--stage S] [--task I --num-tasks N] [overrides]``: the trainer's config
    (``data=llama_mixture data.cache_dir=...``), prepared in one stage or all of them."""
    parser = argparse.ArgumentParser(prog="python -m launch.prepare", description=main.__doc__)
    parser.add_argument("--stage", choices=STAGES, default="all",
                        help="all (default): everything in this process; or one stage of a multi-machine run")  # fmt: skip
    parser.add_argument("--task", type=int, default=None,
                        help="--stage tokenize: this task's number, 0-based (default: the Slurm array task)")  # fmt: skip
    parser.add_argument("--num-tasks", type=int, default=None, help="--stage tokenize: how many tasks in all")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides of the training config")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    from hydra import compose, initialize_config_module

    from conf.schema import to_config

    with initialize_config_module(config_module="conf", version_base="1.3"):
        cfg = to_config(compose(config_name="config", overrides=args.overrides)).data
    if args.stage == "all":
        prepared = prepare_data(cfg)
    elif args.stage == "tokenizer":
        plan = plan_shards(cfg)
        print(f"tokenizer {plan.tokenizer.path} (sha256 {plan.tokenizer.sha256[:12]}): {len(plan.tasks)} shard "
              "groups to tokenize")  # fmt: skip
        return
    elif args.stage == "tokenize":
        default_task, default_count = _slurm_array_task()
        task = default_task if args.task is None else args.task
        num_tasks = default_count if args.num_tasks is None else args.num_tasks
        plan = plan_shards(cfg, train=False)
        mine = tokenize_tasks(cfg, plan=plan, task=task, num_tasks=num_tasks)
        print(f"task {task} of {num_tasks} on {os.environ.get('SLURMD_NODENAME', os.uname().nodename)}: "
              f"{len(mine)} shard groups done")  # fmt: skip
        return
    else:
        prepared = write_index(cfg, plan=plan_shards(cfg, train=False))
    tokens = {split: sum(by_source.values()) for split, by_source in prepared.num_tokens.items()}
    print(f"index {shards_dir(cfg, tokenizer_sha256=prepared.tokenizer_sha256) / 'index.json'}: "
          f"{tokens['train']} train / {tokens['val']} val tokens")  # fmt: skip


if __name__ == "__main__":
    main()
