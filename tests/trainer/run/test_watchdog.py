"""The hang watchdog (trainer/run/components/watchdog.py) on 2 gloo processes: rank 1 blocks at the start of
step 5 (test-only ``faults.hang_rank``), before the step's first collective, so rank 0 waits in it. Within the
timeout plus slack both ranks write their report, rank 1's stack shows the injected frame, and the job exits
non-zero (the workers with code 86). Restarted by ``launch.local --max-restarts 1``, the run resumes from its
newest checkpoint and ends with the uninterrupted run's final loss (slow)."""

from __future__ import annotations

import os
import re
import subprocess
import time
from pathlib import Path

import pytest

from launch.harness import LAYOUTS, REPO, layout_overrides, run_layout
from launch.local import RESTART_ENV, build_command
from trainer.run.components.watchdog import EXIT_HANG
from trainer.run.config import WatchdogConfig
from trainer.run.loop import Progress
from trainer.run.records import TrainResult

HANG = ("faults.hang_rank=1", "faults.hang_step=5", "watchdog.timeout_s=3", "watchdog.poll_s=0.5",
        "watchdog.grace_s=2", "checkpoint.every_steps=2")  # fmt: skip


def test_allowance_follows_the_phase():
    from trainer.run.components.watchdog import HangWatchdog

    progress = Progress()
    dog = HangWatchdog(WatchdogConfig(), progress=progress, run_dir=Path("/unused"), rank=0, device=None)
    assert dog.allowance_s() == 1800.0  # no step finished yet
    progress.step_done(2.0)
    assert dog.allowance_s() == 600.0  # the floor: 20 x 2 s is less
    progress.step_done(45.0)
    assert dog.allowance_s() == 900.0  # 20 x the slowest step
    progress.enter("checkpoint")
    assert dog.allowance_s() == 3600.0
    fixed = HangWatchdog(WatchdogConfig(timeout_s=42.0), progress=progress, run_dir=Path("/unused"), rank=0,
                         device=None)  # fmt: skip
    progress.enter("forward")
    assert fixed.allowance_s() == 42.0


def hang_command(workdir: Path, run_dir: Path, *, steps: int, max_restarts: int = 0) -> list[str]:
    overrides = layout_overrides(LAYOUTS["fsdp2"], workdir=workdir, steps=steps, run_dir=run_dir, extra=HANG)
    return build_command(nproc=2, overrides=overrides, max_restarts=max_restarts)


def run_command(cmd: list[str], *, workdir: Path, timeout_s: int) -> tuple[subprocess.CompletedProcess, float]:
    env = {**os.environ, **RESTART_ENV, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    started = time.monotonic()
    proc = subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True, timeout=timeout_s)
    return proc, time.monotonic() - started


def test_a_hung_rank_is_reported_by_every_rank_and_the_job_exits(tmp_path):
    run_dir = tmp_path / "run"
    proc, elapsed = run_command(hang_command(tmp_path, run_dir, steps=8), workdir=tmp_path, timeout_s=300)
    assert proc.returncode != 0, proc.stdout[-2000:]
    assert re.search(rf"exitcode\s*:\s*{EXIT_HANG}", proc.stderr), proc.stderr[-2000:]  # torchrun's failure report
    reports = {rank: (run_dir / "hang" / f"rank{rank}.txt").read_text() for rank in (0, 1)}
    assert "step 5, phase data: no progress for" in reports[1]
    assert "in injected_hang" in reports[1] and "injected_hang" not in reports[0]
    # rank 0 waits in the step's first collective (the global token count), its main thread's stack says so
    assert "step 5, phase forward" in reports[0] and "in global_token_count" in reports[0]
    assert all("in _watch" in report for report in reports.values())  # every thread: the watchdog's own too
    log = (run_dir / "train_rank1.log").read_text()
    assert "hang: no progress for" in log and "step 5, phase data" in log
    # Start-up (~5 s), four steps, 3 s allowance, 0.5 s polls, 2 s grace: well under a minute.
    assert elapsed < 60, elapsed


@pytest.mark.slow
def test_restarted_after_a_hang_the_run_ends_as_the_uninterrupted_one(tmp_path, reference_run):
    run_dir = tmp_path / "run"
    proc, _ = run_command(hang_command(tmp_path, run_dir, steps=10, max_restarts=1), workdir=tmp_path, timeout_s=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (run_dir / "hang" / "rank1.txt").is_file()
    resumed = TrainResult.read(run_dir)
    assert resumed.first_step == 5  # from the step-4 checkpoint
    uninterrupted = run_layout(LAYOUTS["fsdp2"], workdir=tmp_path, steps=10, run_name="uninterrupted",
                               extra=("checkpoint.every_steps=2",))  # fmt: skip
    assert resumed.losses[-1] == TrainResult.read(uninterrupted).losses[-1]


def test_a_process_group_timeout_below_the_watchdog_is_named(caplog):
    from trainer.run.train import _check_timeouts

    with caplog.at_level("WARNING"):
        _check_timeouts(WatchdogConfig(), pg_timeout_s=7200.0)  # the defaults: 3600 s at most, below 7200
        assert not caplog.records
        _check_timeouts(WatchdogConfig(), pg_timeout_s=600.0)
    assert "parallel.pg_timeout_s=600 is not above the hang watchdog's longest allowance (3600 s)" in caplog.text
