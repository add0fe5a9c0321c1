"""Look at run directories from the command line.

    python -m launch.runs plot RUN_DIR [RUN_DIR ...] [--out loss.png] [--x tokens|step]   # llama-runs plot

The plot shows training and validation loss against training tokens (the LLaMA paper's Figure 1 plots
7B-65B this way), read from each run's ``metrics.jsonl`` (``trainer.run.records``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from trainer.run.records import plot_loss


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    plot = commands.add_parser("plot", help="train/val loss of one or more runs against tokens, as a PNG")
    plot.add_argument("run_dirs", nargs="+", type=Path)
    plot.add_argument("--out", type=Path, default=Path("loss.png"))
    plot.add_argument("--x", choices=("tokens", "step"), default="tokens")
    args = parser.parse_args(argv)
    try:
        plot_loss(args.run_dirs, out=args.out, x=args.x)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {args.out} ({len(args.run_dirs)} run(s), loss against {args.x})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
