"""Shared pieces of the benchmarks: timing statistics, machine description, results files."""

from __future__ import annotations

import json
import platform
import statistics
import subprocess
import time
from pathlib import Path
from typing import Optional, Sequence

import torch
from hydra import compose, initialize_config_module

from conf.schema import Config, to_config
from trainer.run.records import namespace_values

RESULTS = Path(__file__).parent / "results"

MATMUL_OPS = {"aten::mm", "aten::addmm", "aten::bmm"}
"""Profiler names of the matrix-multiply kernels."""


def summarize(samples: list[float]) -> dict[str, float]:
    """Median and spread (min, max) of repeated measurements."""
    return {"median": statistics.median(samples), "min": min(samples), "max": max(samples), "n": len(samples)}


def machine() -> dict[str, object]:
    """What the figures were measured on: host, CPU, threads, torch, commit, date."""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                check=True).stdout.strip()  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "commit": commit,
        "cpu": cpu,
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }


def compose_config(overrides: Sequence[str] = ()) -> Config:
    """The typed config that ``python -m launch.train <overrides>`` would run with."""
    with initialize_config_module(config_module="conf", version_base="1.3"):
        return to_config(compose(config_name="config", overrides=list(overrides)))


def read_metrics(run_dir: Path) -> dict[str, list[float]]:
    """The trainer's per-log training values from ``metrics.jsonl``, by name (``train/step_time_s`` -> ``step_time_s``)."""
    return namespace_values(run_dir, "train")


def run_children(cmds: Sequence[Sequence[str]], *, logs: Sequence[Path], env: Optional[dict[str, str]] = None,
                 cwd: Optional[Path] = None) -> None:  # fmt: skip
    """Start every command at once, each writing its output to its log; wait for all; raise if one failed."""
    procs = []
    for cmd, log in zip(cmds, logs, strict=True):
        with log.open("w") as out:
            procs.append(subprocess.Popen(list(cmd), stdout=out, stderr=subprocess.STDOUT, env=env, cwd=cwd))
    try:
        for cmd, log, proc in zip(cmds, logs, procs):
            if proc.wait() != 0:
                tail = "\n".join(log.read_text().splitlines()[-30:])
                raise RuntimeError(f"benchmark child failed (exit {proc.returncode}, log {log}): {' '.join(cmd)}\n{tail}")
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def write_results(name: str, payload: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps({"machine": machine(), **payload}, indent=1))
    return path
