"""Look at run directories from the command line.

    python -m launch.runs plot RUN_DIR [RUN_DIR ...] [--out loss.png] [--x tokens|step]   # llama-runs plot
    python -m launch.runs goodput RUN_DIR [--out goodput.png]                             # llama-runs goodput

``plot``: training and validation loss against training tokens (the LLaMA paper's Figure 1 plots 7B-65B this
way), read from each run's ``metrics.jsonl`` (``trainer.run.records``). ``goodput``: where the run
directory's time went across all its restarts, as a table and a bar chart (``trainer.run.goodput``,
docs/operations.md).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from trainer.run.goodput import goodput, plot as plot_goodput, table as goodput_table
from trainer.run.records import plot_loss


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    plot = commands.add_parser("plot", help="train/val loss of one or more runs against tokens, as a PNG")
    plot.add_argument("run_dirs", nargs="+", type=Path)
    plot.add_argument("--out", type=Path, default=Path("loss.png"))
    plot.add_argument("--x", choices=("tokens", "step"), default="tokens")
    good = commands.add_parser("goodput", help="where a run directory's time went, restarts included: table and PNG")
    good.add_argument("run_dir", type=Path)
    good.add_argument("--out", type=Path, default=None, help="the bar chart (default: <run_dir>/goodput.png)")
    args = parser.parse_args(argv)
    try:
        if args.command == "plot":
            plot_loss(args.run_dirs, out=args.out, x=args.x)
            print(f"wrote {args.out} ({len(args.run_dirs)} run(s), loss against {args.x})")
        else:
            found = goodput(args.run_dir)
            out = args.out or args.run_dir / "goodput.png"
            plot_goodput(found, out=out)
            print(goodput_table(found))
            print(f"\nwrote {out}")
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
