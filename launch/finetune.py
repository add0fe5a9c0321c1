"""Instruction finetuning of a pre-trained checkpoint, scored before and after (``make finetune``).

    python -m launch.finetune                             # make train's newest checkpoint, the built-in instructions
    python -m launch.finetune --init-from outputs/<run> --nproc 2 optim.lr=5e-4 trainer.max_steps=400
    python -m launch.finetune --train /data/flan.jsonl --held-out /data/flan_eval.jsonl

1. The built-in synthetic instructions (data/synthetic_instructions.py) are written to ``cache/instructions``
   unless ``--train`` names other records;
2. the held-out records are scored on the starting checkpoint (exact match of the greedy answer to each
   prompt, through evaluation/: the ``instructions`` task format);
3. ``launch.local`` finetunes it with ``experiment=finetune`` (conf/experiment/finetune.yaml) and the given
   Hydra overrides, into ``outputs/finetune/<date>/<time>``;
4. the held-out records are scored again on the finetuned checkpoint, and both scores printed and written
   to ``finetune_report.md`` in the run directory.

The starting checkpoint defaults to the newest pre-training checkpoint under ``outputs/`` (one whose run
did not itself finetune).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

from data.synthetic_instructions import write_instructions
from evaluation.checkpoints import evaluate_checkpoint
from evaluation.config import EvalConfig, EvaluateConfig, TaskConfig
from launch.local import build_command
from trainer.checkpoint.checkpointer import checkpoints_under, complete_checkpoints, newest
from trainer.checkpoint.meta import CheckpointMeta

INSTRUCTIONS_DIR = Path("cache/instructions")


def newest_pretraining_checkpoint(outputs: Path = Path("outputs")) -> Path:
    """The newest complete checkpoint under ``outputs`` whose run trained on the pre-training mixture."""
    pretraining = [s for s in checkpoints_under(outputs)
                   if not ((CheckpointMeta.read(s).config or {}).get("data", {}).get("instructions", {}) or {}).get("train")]  # fmt: skip
    if not pretraining:
        raise ValueError(f"no pre-training checkpoint under {outputs}/: run `make train` first, or pass --init-from")
    return newest(pretraining)


def score(checkpoint: Path, *, held_out: Path, out_dir: Path, max_new_tokens: int) -> dict:
    """Exact match of the greedy answers to the held-out records (overall and per task)."""
    task = TaskConfig(path=str(held_out), format="instructions", max_new_tokens=max_new_tokens)
    cfg = EvaluateConfig(checkpoint=str(checkpoint), eval=EvalConfig(tasks=["held_out"], catalog={"held_out": task}))
    return evaluate_checkpoint(cfg, out_dir=out_dir)[0]["metrics"]


def report(before: dict, after: dict, *, init_from: Path, finetuned: Path) -> str:
    lines = ["| held-out exact match | before | after |", "|---|---|---|"]
    for metric in after:
        lines.append(f"| {metric} | {before.get(metric, 0.0):.3f} | {after[metric]:.3f} |")
    return f"before: {init_from}\nafter: {finetuned}\n\n" + "\n".join(lines) + "\n"


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--init-from", default=None, help="the checkpoint to finetune (default: the newest pre-training one)")
    parser.add_argument("--train", default=None, help="instruction records (default: the built-in synthetic ones)")
    parser.add_argument("--held-out", default=None, help="records to score before and after (instruction layout)")
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for launch.train")
    opts = parser.parse_args(argv)
    if opts.train is None:
        paths = write_instructions(INSTRUCTIONS_DIR)
        train, held_out = paths["train"], Path(opts.held_out or paths["held_out"])
    else:
        if opts.held_out is None:
            parser.error("--train needs --held-out: the records to score before and after")
        train, held_out = Path(opts.train), Path(opts.held_out)
    init_from = Path(opts.init_from) if opts.init_from else newest_pretraining_checkpoint()
    run_dir = Path(time.strftime("outputs/finetune/%Y-%m-%d/%H-%M-%S"))
    before = score(init_from, held_out=held_out, out_dir=run_dir / "eval_before", max_new_tokens=opts.max_new_tokens)
    overrides = ["experiment=finetune", f"checkpoint.init_from={init_from}", f"data.instructions.train={train}",
                 f"hydra.run.dir={run_dir}", *opts.overrides]  # fmt: skip
    subprocess.run(build_command(nproc=opts.nproc, overrides=overrides), check=True)
    finetuned = sorted(complete_checkpoints(run_dir / "checkpoints"))[-1]
    after = score(finetuned, held_out=held_out, out_dir=run_dir / "eval_after", max_new_tokens=opts.max_new_tokens)
    text = report(before, after, init_from=init_from, finetuned=finetuned)
    (run_dir / "finetune_report.md").write_text(text)
    (run_dir / "finetune_report.json").write_text(json.dumps({"before": before, "after": after}, indent=1) + "\n")
    print(text)


if __name__ == "__main__":
    sys.exit(main())
