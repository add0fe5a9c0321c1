"""Launch training on this machine: one process, or N under torchrun.

    python -m launch.local                       # one process, no torchrun
    python -m launch.local --nproc 2             # FSDP over 2 processes
    python -m launch.local --nproc 4 parallel.tp=2 trainer.max_steps=50
    python -m launch.local --nproc 2 --max-restarts 3   # a rank that dies restarts the group from a checkpoint

Every argument after the options is a Hydra override passed to ``launch.train``. All ranks are given
the same ``hydra.run.dir`` (each rank's Hydra would otherwise stamp its own time into the name, and the
ranks could disagree by a second).

Before any worker starts, the composed config is checked against the process count (the parallel layout,
the model's divisibility, the sequence length, the GPUs present), so a bad layout is one message here
instead of one per rank under torchrun's failure report.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

RESTART_ENV = {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
"""What torchrun's restarts need (torch >= 2.5): workers restarted by --max-restarts otherwise share the
agent's rendezvous store with the dead generation and can read its stale addresses, then fail in gloo's
connectFullMesh or hang (pytorch/pytorch#135712). Measured here: 1 of 3 SIGKILL trials never recovered
without it, 5 of 5 recovered bitwise with it."""


def default_run_dir() -> str:
    return time.strftime("outputs/%Y-%m-%d/%H-%M-%S")


def build_command(*, nproc: int, overrides: list[str], python: str = sys.executable, max_restarts: int = 0,
                  rendezvous: tuple[str, ...] = ()) -> list[str]:  # fmt: skip
    """The command that trains with ``overrides`` on ``nproc`` processes here: the one place that spells
    torchrun's command line (the launcher, the layout harness, the benchmarks and tests use it).

    Args:
        rendezvous: torchrun's rendezvous arguments for a multi-node run (``--nnodes``, ``--rdzv-*``, ...);
            empty: ``--standalone``, a rendezvous on a free local port, so several jobs can share the machine.
    """
    if nproc == 1 and max_restarts == 0 and not rendezvous:
        return [python, "-m", "launch.train", *overrides]
    restarts = [f"--max-restarts={max_restarts}"] if max_restarts else []
    return [python, "-m", "torch.distributed.run", *(rendezvous or ("--standalone",)), f"--nproc-per-node={nproc}",
            *restarts, "-m", "launch.train", *overrides]  # fmt: skip


def check_layout(*, nproc: int, overrides: list[str]) -> None:
    """Compose the config the workers will run and check it against ``nproc`` processes; raises ValueError
    (or Hydra's own error for a bad override) with the message a user needs."""
    from hydra import compose, initialize_config_module

    from conf.schema import to_config
    from trainer.parallel.dims import ParallelDims

    # Hydra's own run/sweep settings do not change the config; the search path does (user config groups).
    kept = [o for o in overrides if not o.startswith("hydra.") or o.startswith("hydra.searchpath")]
    with initialize_config_module(config_module="conf", version_base="1.3"):
        cfg = to_config(compose(config_name="config", overrides=kept))
    ParallelDims.for_run(cfg.parallel, world_size=nproc, model=cfg.model, seq_len=cfg.data.seq_len)
    if cfg.trainer.device.value != "cpu":
        import torch

        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if gpus and nproc > gpus:
            raise ValueError(f"--nproc {nproc} processes but {gpus} GPU(s) visible: one process per GPU; use --nproc "
                             f"{gpus} (or trainer.device=cpu)")  # fmt: skip


def _explain(err: BaseException) -> str:
    """The error and its causes, one line each (Hydra puts the precise reason, e.g. the unknown key, in the cause)."""
    lines = []
    while err is not None:
        text = str(err).strip()
        if text and text not in lines:
            lines.append(text)
        err = err.__cause__
    from trainer.parallel.config import RENAMED_KEYS

    renamed = [f"{old} is now {new}" for old, new in RENAMED_KEYS.items() if old in "\n".join(lines)]
    if renamed:  # a config written before parallel.* was split by concern
        lines.append("renamed keys: " + "; ".join(renamed))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nproc", type=int, default=1, help="processes on this machine (default 1)")
    parser.add_argument("--max-restarts", type=int, default=0,
                        help="restart all workers up to N times when one fails; they resume from the newest "
                             "checkpoint (set checkpoint.every_steps / every_minutes to bound lost work)")  # fmt: skip
    parser.add_argument("--no-check", action="store_true", help="skip the config check before starting")
    args, overrides = parser.parse_known_args(argv)
    if args.nproc < 1:
        parser.error(f"--nproc must be >= 1, got {args.nproc}")
    if args.max_restarts < 0:
        parser.error(f"--max-restarts must be >= 0, got {args.max_restarts}")
    if not args.no_check and not any(o in ("-m", "--multirun") for o in overrides):
        try:
            check_layout(nproc=args.nproc, overrides=overrides)
        except Exception as err:  # ValueError from the checks, Hydra's ConfigCompositionException, ...
            print(f"error: {_explain(err)}", file=sys.stderr)
            sys.exit(2)
    if not any(o.startswith("hydra.run.dir=") for o in overrides):
        overrides = [*overrides, f"hydra.run.dir={default_run_dir()}"]
    command = build_command(nproc=args.nproc, overrides=overrides, max_restarts=args.max_restarts)
    if args.max_restarts:
        os.environ.update(RESTART_ENV)
    print("+", " ".join(command), flush=True)
    # exec: signals (Ctrl-C, Slurm's) reach torchrun / the trainer directly.
    os.execv(command[0], command)


if __name__ == "__main__":
    main()
