"""Train the debug model under several parallel layouts and compare losses and final weights.

    python -m launch.loss_compare                      # all layouts, 10 steps
    python -m launch.loss_compare --layouts single fsdp2 tp2 --steps 12

Every layout trains the same global batch from the same initial weights on the same data, so the
losses must agree up to floating-point summation order. Prints a table of the losses side by side and
exits non-zero when a layout disagrees with the single-process reference:
- loss: relative difference <= 1e-5 at every step (observed ~1e-6 in fp32);
- weights: per tensor, ||w - w_ref|| / ||w_ref|| <= 1e-4. Adam divides by sqrt(v), which amplifies
  summation-order noise where gradients are tiny (rare embedding rows: observed 2e-5), so weights get a
  looser bound than losses.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

LOSS_RTOL = 1e-5
WEIGHT_RTOL = 1e-4
GLOBAL_BATCH = 8


@dataclass(frozen=True)
class Layout:
    name: str
    nproc: int
    overrides: tuple[str, ...] = ()
    dp: int = 1
    """Data-parallel degree; the micro-batch is GLOBAL_BATCH / (dp * accumulation)."""
    accum: int = 1


LAYOUTS = {
    layout.name: layout
    for layout in (
        Layout("single", nproc=1),
        Layout("fsdp2", nproc=2, dp=2),
        Layout("tp2", nproc=2, overrides=("parallel.tp=2",)),
        Layout("fsdp2_tp2", nproc=4, overrides=("parallel.tp=2",), dp=2),
        Layout("hsdp2x2", nproc=4, overrides=("parallel.dp_replicate=2",), dp=4),
        Layout("fsdp2_accum2", nproc=2, dp=2, accum=2),
        Layout("fsdp2_accum2_sync_each", nproc=2, dp=2, accum=2, overrides=("parallel.defer_grad_sync=false",)),
    )
}
DEFAULT_LAYOUTS = ("single", "fsdp2", "tp2", "fsdp2_tp2", "hsdp2x2")


def common_overrides(*, cache_dir: Path, steps: int) -> list[str]:
    """The debug model on a small slice of the stdlib corpus; CPU, fp32, no wandb."""
    return [
        "model=debug", "model.vocab_size=512", "data.tokenizer.vocab_size=512",
        "data.sources.python_stdlib.max_files=12", f"data.cache_dir={cache_dir}", "data.seq_len=64",
        "data.val_fraction=0.2", "data.progress=false", "trainer.device=cpu", "trainer.precision=fp32",
        f"trainer.max_steps={steps}", "trainer.eval_every=0", "trainer.peak_flops=1e11", "trainer.save_final_model=true",
        "optim.warmup_steps=3", "optim.lr=3e-3", "logging.log_every=1", "logging.wandb_mode=disabled",
    ]  # fmt: skip


def run_layout(layout: Layout, *, workdir: Path, steps: int, run_name: str | None = None,
               extra: tuple[str, ...] = (), timeout_s: int = 600) -> Path:  # fmt: skip
    """Train one layout in a subprocess (torchrun for several processes); returns its run directory.

    ``run_name`` (default: the layout's name) picks the run directory; training again in the same one
    resumes from its newest checkpoint. ``extra`` overrides come last.
    """
    run_dir = workdir / (run_name or layout.name)
    micro = GLOBAL_BATCH // (layout.dp * layout.accum)
    overrides = [*common_overrides(cache_dir=workdir / "cache", steps=steps), *layout.overrides,
                 f"trainer.micro_batch_size={micro}", f"trainer.grad_accum_steps={layout.accum}",
                 f"hydra.run.dir={run_dir}", *extra]  # fmt: skip
    if layout.nproc == 1:
        cmd = [sys.executable, "-m", "trainer.train", *overrides]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={layout.nproc}",
               "-m", "trainer.train", *overrides]  # fmt: skip
    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": f"{repo}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True, timeout=timeout_s)
    if proc.returncode != 0:
        raise RuntimeError(f"layout {layout.name} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    return run_dir


def compare(run_dirs: dict[str, Path], *, reference: str = "single") -> tuple[str, bool]:
    """The side-by-side table and whether every layout agrees with ``reference``."""
    losses = {name: json.loads((d / "summary.json").read_text())["losses"] for name, d in run_dirs.items()}
    weights = {name: torch.load(d / "final_model.pt", weights_only=True) for name, d in run_dirs.items()}
    names = list(run_dirs)
    lines = ["step  " + "  ".join(f"{n:>12}" for n in names)]
    for step in range(len(losses[reference])):
        lines.append(f"{step + 1:>4}  " + "  ".join(f"{losses[n][step]:>12.7f}" for n in names))
    ok = True
    lines.append("")
    for name in names:
        if name == reference:
            continue
        loss_rel = max(abs(a - b) / abs(b) for a, b in zip(losses[name], losses[reference]))
        ref_w = weights[reference]
        weight_rel = max(float((weights[name][k] - ref_w[k]).norm() / ref_w[k].norm()) for k in ref_w)
        agrees = loss_rel <= LOSS_RTOL and weight_rel <= WEIGHT_RTOL and len(losses[name]) == len(losses[reference])
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
