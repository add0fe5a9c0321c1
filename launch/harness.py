"""Train the debug model under a named parallel layout in a subprocess: the harness that the loss-compare
tool, the tests and the benchmarks share.

Every layout trains the same global batch (``GLOBAL_BATCH`` sequences, split over the data-parallel ranks
and accumulation steps) from the same initial weights on the same data, so their losses must agree up
to floating-point summation order (``launch.loss_compare`` checks that).
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

import torch

from launch.local import build_command
from trainer.run.records import TrainResult

REPO = Path(__file__).resolve().parents[1]
GLOBAL_BATCH = 8
L4 = "model.n_layers=4"


@dataclass(frozen=True)
class Layout:
    name: str
    nproc: int
    overrides: tuple[str, ...] = ()
    dp: int = 1
    """Data-parallel degree; the micro-batch is GLOBAL_BATCH / (dp * accumulation)."""
    accum: int = 1
    reference: str = "single"
    """The one-process layout this one must agree with (the same model)."""


LAYOUTS = {
    layout.name: layout
    for layout in (
        Layout("single", nproc=1),
        Layout("fsdp2", nproc=2, dp=2),
        Layout("tp2", nproc=2, overrides=("parallel.tp=2",)),
        Layout("fsdp2_tp2", nproc=4, overrides=("parallel.tp=2",), dp=2),
        Layout("hsdp2x2", nproc=4, overrides=("parallel.dp_replicate=2",), dp=4),
        Layout("fsdp2_accum2", nproc=2, dp=2, accum=2),
        Layout("fsdp2_accum2_sync_each", nproc=2, dp=2, accum=2, overrides=("parallel.fsdp.defer_grad_sync=false",)),
        Layout("pp2", nproc=2, overrides=("parallel.pp=2",)),
        Layout("pp2_gpipe_m4", nproc=2, overrides=("parallel.pp=2", "parallel.pp_schedule=gpipe", "parallel.pp_microbatches=4")),
        Layout("pp2_fsdp2", nproc=4, overrides=("parallel.pp=2",), dp=2),
        Layout("pp2_hsdp2", nproc=4, overrides=("parallel.pp=2", "parallel.dp_replicate=2"), dp=2),
        Layout("pp2_tp2", nproc=4, overrides=("parallel.pp=2", "parallel.tp=2")),
        Layout("pp2_zb", nproc=2, overrides=("parallel.pp=2", "parallel.pp_schedule=zero_bubble", "parallel.pp_microbatches=4")),
        Layout("pp2_zb_compiled", nproc=2, overrides=("parallel.pp=2", "parallel.pp_schedule=zero_bubble",
                                                      "parallel.pp_microbatches=4", "parallel.compile=true")),  # fmt: skip
        Layout("pp2_zb_fsdp2", nproc=4, overrides=("parallel.pp=2", "parallel.pp_schedule=zero_bubble",
                                                   "parallel.pp_microbatches=4"), dp=2),  # fmt: skip
        Layout("pp2_zb_tp2", nproc=4, overrides=("parallel.pp=2", "parallel.tp=2", "parallel.pp_schedule=zero_bubble",
                                                 "parallel.pp_microbatches=4")),  # fmt: skip
        # Two stages per rank need four blocks: against the same four-block model in one process.
        Layout("single_l4", nproc=1, overrides=(L4,), reference="single_l4"),
        Layout("pp2_interleaved", nproc=2, overrides=(L4, "parallel.pp=2", "parallel.pp_schedule=interleaved_1f1b",
                                                      "parallel.pp_microbatches=4"), reference="single_l4"),  # fmt: skip
        Layout("pp2_zbv", nproc=2, overrides=(L4, "parallel.pp=2", "parallel.pp_schedule=zbv", "parallel.pp_microbatches=4"),
               reference="single_l4"),  # fmt: skip
        # Several stages per rank with FSDP / HSDP (each stage's view an FSDP root of its own) and with TP.
        Layout("pp2_interleaved_fsdp2", nproc=4, overrides=(L4, "parallel.pp=2", "parallel.pp_schedule=interleaved_1f1b",
                                                            "parallel.pp_microbatches=4"), dp=2, reference="single_l4"),  # fmt: skip
        Layout("pp2_interleaved_tp2", nproc=4, overrides=(L4, "parallel.pp=2", "parallel.pp_schedule=interleaved_1f1b",
                                                          "parallel.pp_microbatches=4", "parallel.tp=2"), reference="single_l4"),  # fmt: skip
        Layout("pp2_zbv_hsdp2", nproc=4, overrides=(L4, "parallel.pp=2", "parallel.pp_schedule=zbv", "parallel.pp_microbatches=4",
                                                    "parallel.dp_replicate=2"), dp=2, reference="single_l4"),  # fmt: skip
    )
}


def common_overrides(*, cache_dir: Path, steps: int) -> list[str]:
    """The debug model on a small slice of the stdlib corpus; CPU, fp32, no wandb."""
    return [
        "model=debug", "model.vocab_size=512", "data.tokenizer.vocab_size=512",
        "data.sources.python_stdlib.max_files=12", f"data.cache_dir={cache_dir}", "data.seq_len=64",
        "data.val_fraction=0.2", "data.progress=false", "trainer.device=cpu", "trainer.precision=fp32",
        f"trainer.max_steps={steps}", "trainer.eval_every=0", "trainer.peak_flops=1e11", "trainer.save_final_model=true",
        "optim.warmup_steps=3", "optim.lr=3e-3", "logging.log_every=1", "logging.wandb_mode=disabled",
    ]  # fmt: skip


def layout_overrides(layout: Layout, *, workdir: Path, steps: int, run_dir: Path, extra: tuple[str, ...] = ()) -> list[str]:
    """Everything ``layout`` is trained with, ``extra`` last."""
    micro = GLOBAL_BATCH // (layout.dp * layout.accum)
    return [*common_overrides(cache_dir=workdir / "cache", steps=steps), *layout.overrides,
            f"trainer.micro_batch_size={micro}", f"trainer.grad_accum_steps={layout.accum}",
            f"hydra.run.dir={run_dir}", *extra]  # fmt: skip


def run_layout(layout: Layout, *, workdir: Path, steps: int, run_name: str | None = None,
               extra: tuple[str, ...] = (), timeout_s: int = 600) -> Path:  # fmt: skip
    """Train one layout in a subprocess (torchrun for several processes); returns its run directory.

    ``run_name`` (default: the layout's name) picks the run directory; training again in the same one
    resumes from its newest checkpoint. ``extra`` overrides come last.
    """
    run_dir = workdir / (run_name or layout.name)
    overrides = layout_overrides(layout, workdir=workdir, steps=steps, run_dir=run_dir, extra=extra)
    cmd = build_command(nproc=layout.nproc, overrides=overrides)
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True, timeout=timeout_s)
    if proc.returncode != 0:
        raise RuntimeError(f"layout {layout.name} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    return run_dir


def losses(run_dir: Path) -> list[float]:
    """The training losses of a finished run (its summary.json)."""
    return TrainResult.read(run_dir).losses


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    """The consolidated final weights a run wrote with ``trainer.save_final_model=true``."""
    return torch.load(Path(run_dir) / "final_model.pt", weights_only=True)


def checkpoints(run_dir: Path) -> list[str]:
    """The names of a run's checkpoint directories, sorted."""
    return sorted(p.name for p in (Path(run_dir) / "checkpoints").iterdir())

