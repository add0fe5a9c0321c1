"""Preprocessing on datatrove's Slurm executor, on the local two-node Slurm cluster (slow; `make test-multinode`):
every stage of the GitHub recipe (one-pass steps, then exact dedup's signature / find / filter stages, then the
report) is an sbatch array job depending on the one before; the output equals the local executor's."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from data.preprocess.samples import write_samples

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]


def _preprocess(*overrides: str, env: dict, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "launch.preprocess", "preprocess=github", *overrides], cwd=cwd,
                          env=env, capture_output=True, text=True, timeout=300)  # fmt: skip


def _clean(output: Path) -> dict[str, str]:
    return {p.name: p.read_text() for p in sorted((output / "clean").glob("*.jsonl"))}


def test_the_github_recipe_on_slurm_equals_the_local_executor(local_slurm, tmp_path):
    write_samples(tmp_path / "raw")
    env = {"PYTHONPATH": str(REPO), "PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin"}
    local = _preprocess(f"raw_root={tmp_path / 'raw'}", f"output_root={tmp_path / 'local'}", "executor.tasks=2",
                        "executor.workers=1", env=env, cwd=tmp_path)  # fmt: skip
    assert local.returncode == 0, local.stderr[-3000:]

    slurm = local_slurm(ctld_port=6947, node_port=6951)
    submitted = _preprocess(
        f"raw_root={tmp_path / 'raw'}", f"output_root={tmp_path / 'slurm'}", "executor.kind=slurm", "executor.tasks=2",
        "executor.slurm.partition=debug", "executor.slurm.time=00:10:00", "executor.slurm.mem_per_cpu_gb=1",
        f"executor.slurm.env_command='export PATH={Path(sys.executable).parent}:$PATH'",
        env={**env, **slurm.env}, cwd=tmp_path,
    )  # fmt: skip
    assert submitted.returncode == 0, submitted.stderr[-3000:]
    assert "submitted; when the report job has run" in submitted.stdout
    stats = tmp_path / "slurm" / "github" / "stats.json"
    deadline = time.time() + 300
    while not stats.exists() and time.time() < deadline:
        time.sleep(2)
    logs = "\n".join(p.read_text()[-1500:] for p in sorted((tmp_path / "slurm").rglob("slurm_logs/*.out")))
    assert stats.exists(), f"no report after 300 s\n{logs}\n{slurm.logs()}"

    stages = sorted(p.parent.name for p in (tmp_path / "slurm" / "github" / "work" / "logs").glob("*/launch_script.slurm"))
    assert stages == ["exact_dedup_merge_0", "exact_dedup_signature", "report", "segment_0", "segment_1"]
    job_logs = list((tmp_path / "slurm").rglob("slurm_logs/*.out"))  # written by Slurm, one per array task
    assert {p.parents[1].name for p in job_logs} >= set(stages), job_logs
    assert _clean(tmp_path / "slurm" / "github") == _clean(tmp_path / "local" / "github")
    slurm_steps = json.loads(stats.read_text())["steps"]
    local_steps = json.loads((tmp_path / "local" / "github" / "stats.json").read_text())["steps"]
    assert slurm_steps == local_steps
