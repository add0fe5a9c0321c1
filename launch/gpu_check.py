"""One command that proves the GPU path on a CUDA machine: ``make gpu-check`` (``make test-gpu`` runs stage 2 only).

    python -m launch.gpu_check [--wheels gpu_wheels] [--out gpu_check] [--tests-only] [--no-bench]

Stages, each with a time limit, all on the GPU in bf16 (docs/gpu.md has the procedure and the figures):
1. environment: the GPU, torch, CUDA; the Python to run with (below);
2. tests: ``pytest -m gpu`` (tests/gpu/: the CUDA attention kernels against SDPA, every hand-written op
   against autograd, one training step per single-GPU layout and AC policy, compile off and on);
3. train: the trainer end to end (``python -m launch.train``: data, model, loop, validation, checkpoint,
   offline wandb) on one GPU under autocast and with FSDP over one rank, every AC policy, compile off/on;
4. bench: the GPU table of ``make bench`` (~1B model, seq 2048: tokens/s, MFU against the data sheet,
   peak allocated memory next to the activation-memory formula), one repetition.
Then ``<out>/gpu_check.json`` and ``<out>/gpu_check.md`` (device, torch, CUDA, date, commit, every figure).
Exit 0 only if every stage passed; 2 where there is no CUDA device (nothing is tested then).

The machine's own Python and CUDA torch are used; nothing is downloaded. What that Python lacks
(hydra-core, omegaconf, wandb, pytest-timeout on a stock GPU image) is installed from the wheel folder of
``make gpu-wheels`` (``--no-index``) into a virtualenv that sees the machine's packages
(``--system-site-packages``), so its torch stays the one that runs.

This module imports only the standard library at the top: it must start where hydra is missing.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parents[1]
NEEDED_MODULES = ("hydra", "omegaconf", "wandb", "pytest_timeout")
WHEELS_REQUIREMENTS = "requirements.txt"  # written by launch.gpu_wheels
NO_CUDA_EXIT = 2

TESTS = ("tests/gpu", "tests/model/test_layers.py")
# The trainer runs of stage 3: (name, overrides). Autocast is what a single-GPU `precision=auto` run does;
# fsdp_one_rank is the multi-GPU code path (bf16 parameters through FSDP) on one device.
TRAIN_COMMON = ("model=small", "data.seq_len=256", "trainer.micro_batch_size=16", "trainer.device=cuda",
                "trainer.precision=bf16", "trainer.eval_every=30", "trainer.eval_steps=2", "logging.log_every=5",
                "logging.wandb_mode=offline", "optim.warmup_steps=5", "checkpoint.save_on_signal=false")  # fmt: skip
TRAIN_RUNS = (
    ("autocast_selective", ("parallel.ac.mode=selective",)),
    ("autocast_full_compile", ("parallel.ac.mode=full", "parallel.compile=true")),
    ("fsdp1_none", ("parallel.fsdp.one_rank=true", "parallel.ac.mode=none")),
    ("fsdp1_selective", ("parallel.fsdp.one_rank=true", "parallel.ac.mode=selective")),
    ("fsdp1_full", ("parallel.fsdp.one_rank=true", "parallel.ac.mode=full")),
    ("fsdp1_every_k", ("parallel.fsdp.one_rank=true", "parallel.ac.mode=every_k")),
    ("fsdp1_selective_compile", ("parallel.fsdp.one_rank=true", "parallel.ac.mode=selective",
                                 "parallel.compile=true")),  # fmt: skip
)


class NoCuda(RuntimeError):
    """There is no CUDA device: nothing on the GPU path can be checked here."""


@dataclass
class Interpreter:
    """How every stage starts Python: the executable and what goes in front of PYTHONPATH."""

    python: str
    pythonpath: list[str] = field(default_factory=list)

    def env(self, **extra: str) -> dict[str, str]:
        path = os.pathsep.join([str(REPO), *self.pythonpath, os.environ.get("PYTHONPATH", "")])
        return {**os.environ, "PYTHONPATH": path, "PYTHONUNBUFFERED": "1", **extra}


@dataclass
class StageResult:
    name: str
    ok: bool
    seconds: float
    details: dict = field(default_factory=dict)
    error: Optional[str] = None


# --- stage 1: environment ----------------------------------------------------------------------------------------


def cuda_environment() -> dict:
    """The GPU and software this check runs on; raises NoCuda where torch sees no GPU (or is missing)."""
    try:
        import torch
    except ImportError as err:
        raise NoCuda(f"{sys.executable} cannot import torch ({err}): set GPU_PY to the Python of the CUDA torch") from err

    if not torch.cuda.is_available():
        raise NoCuda(
            f"no CUDA device is visible to torch {torch.__version__} (built for CUDA {torch.version.cuda}): "
            "gpu-check and test-gpu need a GPU. On a CPU machine, `make test` runs everything that can run here."
        )
    props = torch.cuda.get_device_properties(0)
    return {
        "device": torch.cuda.get_device_name(0),
        "capability": f"sm{props.major}{props.minor}",
        "memory_gib": round(props.total_memory / 2**30, 1),
        "gpus_visible": torch.cuda.device_count(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version(),
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "commit": _commit(),
    }


def _commit() -> str:
    """The commit under test: $GPU_CHECK_COMMIT (a copied working tree has no .git), else git's answer."""
    if os.environ.get("GPU_CHECK_COMMIT"):
        return os.environ["GPU_CHECK_COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              check=True).stdout.strip()  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def missing_modules(python: str, *, pythonpath: tuple[str, ...] = ()) -> list[str]:
    """Which of NEEDED_MODULES ``python`` cannot import."""
    code = f"import importlib.util, json; print(json.dumps([m for m in {list(NEEDED_MODULES)!r} if importlib.util.find_spec(m) is None]))"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([*pythonpath, os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([python, "-c", code], capture_output=True, text=True, check=True, env=env).stdout
    return json.loads(out)


def prepare_interpreter(*, python: str, wheels: Optional[Path], workdir: Path) -> Interpreter:
    """``python`` itself if it has what the stages import; else a virtualenv over it with the wheels installed.

    The virtualenv sees ``python``'s own packages (``--system-site-packages``), so the machine's CUDA torch,
    transformers and numpy are used as they are; pip adds only what is missing, from ``wheels`` alone.
    """
    missing = missing_modules(python)
    if not missing:
        return Interpreter(python=python)
    if wheels is None or not (wheels / WHEELS_REQUIREMENTS).is_file():
        raise RuntimeError(
            f"{python} cannot import {', '.join(missing)} and no wheel folder was found at {wheels}: on a machine "
            "with network run `make gpu-wheels` (GPU_PYVER=<this machine's Python>), copy gpu_wheels/ into the "
            "repository here, then `make gpu-check`"
        )
    venv = workdir / "venv"
    subprocess.run([python, "-m", "venv", "--system-site-packages", str(venv)], check=True, capture_output=True)
    venv_python = str(venv / "bin" / "python")
    proc = subprocess.run([venv_python, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--no-index",
                           "--find-links", str(wheels), "-r", str(wheels / WHEELS_REQUIREMENTS)],
                          capture_output=True, text=True)  # fmt: skip
    if proc.returncode != 0:
        raise RuntimeError(f"installing from {wheels} failed (offline):\n{proc.stderr[-3000:]}")
    still = missing_modules(venv_python)
    if still:
        raise RuntimeError(f"after installing {wheels}, {venv_python} still cannot import {still}")
    return Interpreter(python=venv_python)


# --- stages 2-4 -------------------------------------------------------------------------------------------------


def _run(cmd: list[str], *, interp: Interpreter, log: Path, timeout_s: int) -> int:
    """Run ``cmd`` from the repository root, output to ``log``; the exit code (124 on timeout)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as out:
        try:
            return subprocess.run(cmd, cwd=REPO, env=interp.env(), stdout=out, stderr=subprocess.STDOUT,
                                  timeout=timeout_s).returncode  # fmt: skip
        except subprocess.TimeoutExpired:
            out.write(f"\n[gpu_check] stopped after {timeout_s} s\n")
            return 124


def _tail(log: Path, lines: int = 25) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:]) if log.exists() else ""


def junit_counts(path: Path) -> dict:
    """passed / failed / errors / skipped and the failed tests' names, from pytest's JUnit XML."""
    root = ET.parse(path).getroot()
    counts = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0, "failures": [], "skip_reasons": []}
    for case in root.iter("testcase"):
        name = f"{case.get('classname')}::{case.get('name')}"
        if case.find("failure") is not None:
            counts["failed"] += 1
            counts["failures"].append(f"{name}: {(case.find('failure').get('message') or '')[:300]}")
        elif case.find("error") is not None:
            counts["errors"] += 1
            counts["failures"].append(f"{name}: {(case.find('error').get('message') or '')[:300]}")
        elif case.find("skipped") is not None:
            counts["skipped"] += 1
            counts["skip_reasons"].append(f"{name}: {case.find('skipped').get('message')}")
        else:
            counts["passed"] += 1
    return counts


def all_tests_passed(counts: dict) -> bool:
    """Every test ran and passed, except ones skipped for an optional package (flash-attn); none for want of CUDA."""
    no_cuda = [r for r in counts["skip_reasons"] if "CUDA device" in r]
    return counts["failed"] == 0 and counts["errors"] == 0 and counts["passed"] > 0 and not no_cuda


def run_tests(interp: Interpreter, *, out: Path, timeout_s: int) -> StageResult:
    started, xml, log = time.perf_counter(), out / "gpu_tests.xml", out / "gpu_tests.log"
    code = _run([interp.python, "-m", "pytest", "-m", "gpu", *TESTS, "-q", "-rs", "-p", "no:cacheprovider",
                 f"--junitxml={xml}"], interp=interp, log=log, timeout_s=timeout_s)  # fmt: skip
    counts = junit_counts(xml) if xml.exists() else {"passed": 0, "failed": 0, "errors": 1, "skipped": 0,
                                                     "failures": [], "skip_reasons": []}  # fmt: skip
    ok = code == 0 and all_tests_passed(counts)
    return StageResult("tests", ok, time.perf_counter() - started, counts, None if ok else _tail(log))


def _run_summary(run_dir: Path) -> dict:
    """Loss, throughput, MFU and memory of one trainer run, from its summary.json and metrics.jsonl."""
    from trainer.run.records import TrainResult, namespace_values  # standard library only: no hydra needed

    summary, metrics = TrainResult.read(run_dir), namespace_values(run_dir, "train")
    return {"first_loss": summary.losses[0], "last_loss": summary.losses[-1],
            "val_losses": {str(k): v for k, v in summary.val_losses.items()}, "tokens_per_sec": summary.tokens_per_sec,
            "mfu": max(metrics.get("mfu", [float("nan")])),
            "peak_allocated_gib": max(metrics.get("cuda_max_allocated_gib", [float("nan")])),
            "wall_time_s": summary.wall_time_s, "checkpoint": (run_dir / "checkpoints").is_dir()}  # fmt: skip


def train_run_ok(details: dict) -> bool:
    first, last = details["first_loss"], details["last_loss"]
    return math.isfinite(first) and math.isfinite(last) and last < first and details["checkpoint"]


def run_training(interp: Interpreter, *, out: Path, steps: int, timeout_s: int) -> StageResult:
    started, runs, failures = time.perf_counter(), {}, []
    for name, overrides in TRAIN_RUNS:
        run_dir = out / "train" / name
        cmd = [interp.python, "-m", "launch.train", *TRAIN_COMMON, f"trainer.max_steps={steps}",
               f"data.cache_dir={out / 'cache'}", f"hydra.run.dir={run_dir}", *overrides]  # fmt: skip
        code = _run(cmd, interp=interp, log=out / "train" / f"{name}.log", timeout_s=timeout_s)
        if code == 0:
            runs[name] = _run_summary(run_dir)
            if not train_run_ok(runs[name]):
                failures.append(f"{name}: loss {runs[name]['first_loss']} -> {runs[name]['last_loss']}")
        else:
            runs[name] = {"exit": code}
            failures.append(f"{name} (exit {code}):\n{_tail(out / 'train' / f'{name}.log')}")
    ok = not failures
    return StageResult("train", ok, time.perf_counter() - started, runs, "\n\n".join(failures) or None)


def run_bench(interp: Interpreter, *, out: Path, steps: int, timeout_s: int) -> StageResult:
    started, log = time.perf_counter(), out / "bench.log"
    results = REPO / "bench" / "results" / "train_speed_gpu.json"
    before = results.stat().st_mtime if results.exists() else None
    code = _run([interp.python, "-m", "bench.train_speed", "--repeats", "1", "--steps", str(steps), "--workdir",
                 str(out / "bench")], interp=interp, log=log, timeout_s=timeout_s)  # fmt: skip
    fresh = results.exists() and results.stat().st_mtime != before
    details = json.loads(results.read_text()) if fresh else {}
    ok = code == 0 and fresh
    return StageResult("bench", ok, time.perf_counter() - started, details, None if ok else _tail(log))


# --- summary ----------------------------------------------------------------------------------------------------


def write_summary(*, environment: dict, stages: list[StageResult], out: Path) -> tuple[Path, Path]:
    """``gpu_check.json`` (everything) and ``gpu_check.md`` (the tables a reader wants) in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    payload = {"environment": environment, "ok": all(s.ok for s in stages), "stages": [asdict(s) for s in stages]}
    json_path = out / "gpu_check.json"
    json_path.write_text(json.dumps(payload, indent=1))
    md_path = out / "gpu_check.md"
    md_path.write_text(summary_markdown(environment=environment, stages=stages))
    return json_path, md_path


def summary_markdown(*, environment: dict, stages: list[StageResult]) -> str:
    env = environment
    lines = [f"# gpu-check: {'PASSED' if all(s.ok for s in stages) else 'FAILED'}", "",
             f"{env['device']} ({env['capability']}, {env['memory_gib']} GiB), torch {env['torch']}, CUDA "
             f"{env['cuda']}, Python {env['python']}; {env['date']}, commit {env['commit']}.", "",
             "| stage | result | seconds |", "|---|---|---|"]  # fmt: skip
    lines += [f"| {s.name} | {'ok' if s.ok else 'FAILED'} | {s.seconds:.0f} |" for s in stages]
    for stage in stages:
        lines += ["", f"## {stage.name}", ""]
        if stage.name == "tests" and stage.details:
            d = stage.details
            lines.append(f"{d['passed']} passed, {d['failed']} failed, {d['errors']} errors, {d['skipped']} skipped.")
            lines += [f"- skipped: {r}" for r in d["skip_reasons"]] + [f"- FAILED: {f}" for f in d["failures"]]
        elif stage.name == "train" and stage.details:
            lines += ["| run | loss first -> last | val loss | tokens/s | MFU | peak allocated GiB | wall s |",
                      "|---|---|---|---|---|---|---|"]  # fmt: skip
            for name, d in stage.details.items():
                if "exit" in d:
                    lines.append(f"| {name} | exit {d['exit']} | | | | | |")
                    continue
                val = ", ".join(f"{v:.3f}" for v in d["val_losses"].values())
                lines.append(f"| {name} | {d['first_loss']:.3f} -> {d['last_loss']:.3f} | {val} | "
                             f"{d['tokens_per_sec']:,.0f} | {d['mfu']:.1%} | {d['peak_allocated_gib']:.2f} | "
                             f"{d['wall_time_s']:.0f} |")  # fmt: skip
        elif stage.name == "bench" and stage.details:
            lines += [stage.details.get("table", ""), "", stage.details.get("memory_table", "")]
        if stage.error:
            lines += ["", "```", stage.error.strip(), "```"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=REPO / "gpu_check", help="summary, logs and run directories")
    parser.add_argument("--wheels", type=Path, default=REPO / "gpu_wheels", help="folder of `make gpu-wheels`")
    parser.add_argument("--tests-only", action="store_true", help="stage 2 only (make test-gpu)")
    parser.add_argument("--no-bench", action="store_true", help="skip stage 4")
    parser.add_argument("--train-steps", type=int, default=30)
    parser.add_argument("--bench-steps", type=int, default=5)
    args = parser.parse_args(argv)
    try:
        environment = cuda_environment()
    except NoCuda as err:
        print(f"gpu_check: {err}", file=sys.stderr)
        return NO_CUDA_EXIT
    args.out.mkdir(parents=True, exist_ok=True)
    interp = prepare_interpreter(python=sys.executable, wheels=args.wheels, workdir=args.out)
    environment["interpreter"] = interp.python
    print(f"gpu_check on {environment['device']}, torch {environment['torch']}; output in {args.out}", flush=True)
    stages = [run_tests(interp, out=args.out, timeout_s=300)]
    print(f"  tests: {'ok' if stages[-1].ok else 'FAILED'} ({stages[-1].seconds:.0f} s)", flush=True)
    if not args.tests_only:
        stages.append(run_training(interp, out=args.out, steps=args.train_steps, timeout_s=240))
        print(f"  train: {'ok' if stages[-1].ok else 'FAILED'} ({stages[-1].seconds:.0f} s)", flush=True)
        if not args.no_bench:
            stages.append(run_bench(interp, out=args.out, steps=args.bench_steps, timeout_s=420))
            print(f"  bench: {'ok' if stages[-1].ok else 'FAILED'} ({stages[-1].seconds:.0f} s)", flush=True)
    json_path, md_path = write_summary(environment=environment, stages=stages, out=args.out)
    print(md_path.read_text())
    print(f"written {json_path} and {md_path}")
    return 0 if all(s.ok for s in stages) else 1


if __name__ == "__main__":
    sys.exit(main())
