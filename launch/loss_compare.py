"""Train the debug model under several parallel layouts and compare losses and final weights.

    python -m launch.loss_compare                      # all layouts, 10 steps
    python -m launch.loss_compare --layouts single fsdp2 tp2 --steps 12

Every layout (launch/harness.py, which the tests and benchmarks share) trains the same global batch from
the same initial weights on the same data, so the losses must agree up to floating-point summation order. Prints a table of the losses side by side and
exits non-zero when a layout disagrees with the single-process reference:
- loss: relative difference <= 1e-5 at every step (observed ~1e-6 in fp32);
- weights: per tensor, ||w - w_ref|| / ||w_ref|| <= 1e-4. Adam divides by sqrt(v), which amplifies
  summation-order noise where gradients are tiny (rare embedding rows: observed 2e-5), so weights get a
  looser bound than losses.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from launch.harness import LAYOUTS, final_weights, losses, run_layout

LOSS_RTOL = 1e-5
WEIGHT_RTOL = 1e-4
DEFAULT_LAYOUTS = ("single", "fsdp2", "tp2", "fsdp2_tp2", "hsdp2x2", "pp2", "pp2_gpipe_m4", "pp2_fsdp2", "pp2_hsdp2", "pp2_tp2")


def compare(run_dirs: dict[str, Path], *, reference: str = "single") -> tuple[str, bool]:
    """The side-by-side table and whether every layout agrees with ``reference``."""
    by_name = {name: losses(d) for name, d in run_dirs.items()}
    weights = {name: final_weights(d) for name, d in run_dirs.items()}
    names = list(run_dirs)
    lines = ["step  " + "  ".join(f"{n:>12}" for n in names)]
    for step in range(len(by_name[reference])):
        lines.append(f"{step + 1:>4}  " + "  ".join(f"{by_name[n][step]:>12.7f}" for n in names))
    ok = True
    lines.append("")
    for name in names:
        if name == reference:
            continue
        loss_rel = max(abs(a - b) / abs(b) for a, b in zip(by_name[name], by_name[reference]))
        ref_w = weights[reference]
        weight_rel = max(float((weights[name][k] - ref_w[k]).norm() / ref_w[k].norm()) for k in ref_w)
        agrees = loss_rel <= LOSS_RTOL and weight_rel <= WEIGHT_RTOL and len(by_name[name]) == len(by_name[reference])
        ok &= agrees
        lines.append(f"{name:>24} vs {reference}: max loss rel diff {loss_rel:.2e} (<= {LOSS_RTOL:.0e}), "
                     f"max weight rel diff {weight_rel:.2e} (<= {WEIGHT_RTOL:.0e})  {'OK' if agrees else 'MISMATCH'}")  # fmt: skip
    return "\n".join(lines), ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layouts", nargs="+", default=list(DEFAULT_LAYOUTS), choices=sorted(LAYOUTS))
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--workdir", type=Path, default=None, help="keep run directories here (default: a temp dir)")
    args = parser.parse_args(argv)
    names = ["single", *[n for n in args.layouts if n != "single"]]
    with tempfile.TemporaryDirectory() as tmp:
        workdir = (args.workdir or Path(tmp)).resolve()
        workdir.mkdir(parents=True, exist_ok=True)
        run_dirs = {}
        for name in names:
            print(f"training layout {name} ...", flush=True)
            run_dirs[name] = run_layout(LAYOUTS[name], workdir=workdir, steps=args.steps)
        table, ok = compare(run_dirs)
    print(table)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
