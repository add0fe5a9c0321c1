"""Launch training on this machine: one process, or N under torchrun.

    python -m launch.local                       # one process, no torchrun
    python -m launch.local --nproc 2             # FSDP over 2 processes
    python -m launch.local --nproc 4 parallel.tp=2 trainer.max_steps=50

Every argument after the options is a Hydra override passed to ``trainer.train``. All ranks are given
the same ``hydra.run.dir`` (each rank's Hydra would otherwise stamp its own time into the name, and the
ranks could disagree by a second).
"""

from __future__ import annotations

import argparse
import os
import sys
import time


def default_run_dir() -> str:
    return time.strftime("outputs/%Y-%m-%d/%H-%M-%S")


def build_command(*, nproc: int, overrides: list[str], python: str = sys.executable) -> list[str]:
    if not any(o.startswith("hydra.run.dir=") for o in overrides):
        overrides = [*overrides, f"hydra.run.dir={default_run_dir()}"]
    if nproc == 1:
        return [python, "-m", "trainer.train", *overrides]
    # --standalone: a rendezvous on a free local port, so several jobs can share the machine.
    return [python, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            "-m", "trainer.train", *overrides]  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nproc", type=int, default=1, help="processes on this machine (default 1)")
    args, overrides = parser.parse_known_args(argv)
    if args.nproc < 1:
        parser.error(f"--nproc must be >= 1, got {args.nproc}")
    command = build_command(nproc=args.nproc, overrides=overrides)
    print("+", " ".join(command), flush=True)
    # exec: signals (Ctrl-C, Slurm's) reach torchrun / the trainer directly.
    os.execv(command[0], command)


if __name__ == "__main__":
    main()
