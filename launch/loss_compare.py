"""Train the debug model under several parallel layouts and compare losses and final weights.

    python -m launch.loss_compare                      # all layouts, 10 steps, fp32
    python -m launch.loss_compare --layouts single fsdp2 tp2 --steps 12
    python -m launch.loss_compare --precision bf16     # every layout in bf16 against the fp32 references

Every layout (launch/harness.py, which the tests and benchmarks share) trains the same global batch from
the same initial weights on the same data, so the losses must agree up to floating-point summation order. Prints a table of the losses side by side and
exits non-zero when a layout disagrees with its one-process reference (``Layout.reference``: the same model):
- loss: relative difference <= 1e-5 at every step (observed ~1e-6 in fp32);
- weights: per tensor, ||w - w_ref|| / ||w_ref|| <= 1e-4. Adam divides by sqrt(v), which amplifies
  summation-order noise where gradients are tiny (rare embedding rows: observed 2e-5), so weights get a
  looser bound than losses.
In bf16 each layout (the references too) is compared with the fp32 reference: loss within 3e-3, the bound
of tests/trainer/parallel/test_bf16.py (bf16 rounds at 2^-9 per op; measured up to 6e-4), and weights
within 3e-2 (ten Adam steps of bf16 gradients; measured in the table this prints).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from launch.harness import LAYOUTS, final_weights, losses, run_layout

LOSS_RTOL = 1e-5
WEIGHT_RTOL = 1e-4
BF16_LOSS_RTOL, BF16_WEIGHT_RTOL = 3e-3, 3e-2
DEFAULT_LAYOUTS = ("single", "fsdp2", "tp2", "fsdp2_tp2", "hsdp2x2", "pp2", "pp2_gpipe_m4", "pp2_fsdp2", "pp2_hsdp2", "pp2_tp2",
                   "pp2_zb", "pp2_zb_fsdp2", "pp2_zb_tp2", "pp2_interleaved", "pp2_zbv", "pp2_interleaved_fsdp2",
                   "pp2_interleaved_tp2", "pp2_zbv_hsdp2")  # fmt: skip


def compare(run_dirs: dict[str, Path], *, references: dict[str, Path] | None = None, loss_rtol: float = LOSS_RTOL,
            weight_rtol: float = WEIGHT_RTOL) -> tuple[str, bool]:  # fmt: skip
    """The side-by-side table and whether every layout agrees with its reference (``Layout.reference``, run
    in ``references``; default: ``run_dirs["single"]``, the reference of any name that is not a layout)."""
    references = references if references is not None else {"single": run_dirs["single"]}
    by_name, weights = {n: losses(d) for n, d in run_dirs.items()}, {n: final_weights(d) for n, d in run_dirs.items()}
    ref_losses, ref_weights = {n: losses(d) for n, d in references.items()}, {n: final_weights(d) for n, d in references.items()}
    names = list(run_dirs)
    lines = ["step  " + "  ".join(f"{n:>12}" for n in names)]
    for step in range(max(len(by_name[n]) for n in names)):
        lines.append(f"{step + 1:>4}  " + "  ".join(f"{by_name[n][step]:>12.7f}" if step < len(by_name[n]) else f"{'-':>12}"
                                                   for n in names))  # fmt: skip
    ok = True
    lines.append("")
    for name in names:
        reference = LAYOUTS[name].reference if name in LAYOUTS else "single"
        if run_dirs[name] == references[reference]:
            continue
        want = ref_losses[reference]
        loss_rel = max(abs(a - b) / abs(b) for a, b in zip(by_name[name], want))
        ref_w = ref_weights[reference]
        weight_rel = max(float((weights[name][k].float() - ref_w[k]).norm() / ref_w[k].norm()) for k in ref_w)
        agrees = loss_rel <= loss_rtol and weight_rel <= weight_rtol and len(by_name[name]) == len(want)
        ok &= agrees
        lines.append(f"{name:>24} vs {reference}: max loss rel diff {loss_rel:.2e} (<= {loss_rtol:.0e}), "
                     f"max weight rel diff {weight_rel:.2e} (<= {weight_rtol:.0e})  {'OK' if agrees else 'MISMATCH'}")  # fmt: skip
    return "\n".join(lines), ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layouts", nargs="+", default=list(DEFAULT_LAYOUTS), choices=sorted(LAYOUTS))
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--workdir", type=Path, default=None, help="keep run directories here (default: a temp dir)")
    args = parser.parse_args(argv)
    bf16 = args.precision == "bf16"
    reference_names = sorted({LAYOUTS[n].reference for n in args.layouts})
    with tempfile.TemporaryDirectory() as tmp:
        workdir = (args.workdir or Path(tmp)).resolve()
        workdir.mkdir(parents=True, exist_ok=True)
        references, run_dirs = {}, {}
        for name in reference_names:  # always fp32: what every layout must agree with
            print(f"training reference {name} ...", flush=True)
            references[name] = run_layout(LAYOUTS[name], workdir=workdir, steps=args.steps)
        for name in args.layouts:
            if name in references and not bf16:
                run_dirs[name] = references[name]
                continue
            print(f"training layout {name} ({args.precision}) ...", flush=True)
            run_dirs[name] = run_layout(LAYOUTS[name], workdir=workdir, steps=args.steps, run_name=f"{name}_{args.precision}",
                                        extra=("trainer.precision=bf16",) if bf16 else ())  # fmt: skip
        table, ok = compare(run_dirs, references=references, loss_rtol=BF16_LOSS_RTOL if bf16 else LOSS_RTOL,
                            weight_rtol=BF16_WEIGHT_RTOL if bf16 else WEIGHT_RTOL)  # fmt: skip
    print(table)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
