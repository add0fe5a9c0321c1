"""Fault tolerance (slow; `make test-faults`): preemption signals and killed ranks.

The Slurm side of preemption (signal -> checkpoint -> requeue -> resume) is in
tests/launch/test_preemption.py.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch

from launch.harness import GLOBAL_BATCH, LAYOUTS, checkpoints, common_overrides, final_weights, losses, run_layout
from tests.conftest import PINNED_SCHEDULE
from trainer.run.records import TrainResult

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[3]


def test_sigusr2_saves_and_stops_then_the_run_resumes(tmp_path):
    """The preemption path in one process: the signal arrives mid-run, the step finishes, a checkpoint is
    written, the process exits 0, and the resumed run ends with the uninterrupted run's losses."""
    run_dir = tmp_path / "signalled"
    overrides = [*common_overrides(cache_dir=tmp_path / "cache", steps=400), *PINNED_SCHEDULE, "trainer.micro_batch_size=8",
                 f"hydra.run.dir={run_dir}"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "launch.train", *overrides], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    metrics = run_dir / "metrics.jsonl"
    deadline = time.time() + 120
    while not (metrics.exists() and metrics.read_text().count("\n") >= 2) and time.time() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGUSR2)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out[-3000:]
    summary = TrainResult.read(run_dir)
    assert summary.stopped_by_signal and "stop signal received" in out
    stopped_at = len(summary.losses)
    assert 2 <= stopped_at < 400
    assert checkpoints(run_dir) == [f"step_{stopped_at:08d}"]
    # Resume to 3 steps past the stop; an uninterrupted run of that length must give the same losses.
    end = stopped_at + 3
    extra = (*PINNED_SCHEDULE, f"trainer.max_steps={end}")
    resumed = run_layout(LAYOUTS["single"], workdir=tmp_path, steps=end, run_name="signalled", extra=extra)
    straight = run_layout(LAYOUTS["single"], workdir=tmp_path, steps=end, run_name="signalled_ref", extra=extra)
    assert losses(resumed) == losses(straight)[stopped_at:]


KILL_STEPS = 30
"""~0.3 s a step with a checkpoint every 2: long enough that a kill after step 5 lands well before the end."""
KILL_EXTRA = (f"optim.decay_steps={KILL_STEPS}", "checkpoint.every_steps=2")


def wait_for_steps(metrics: Path, *, steps: int, proc: subprocess.Popen, timeout_s: float) -> None:
    deadline = time.time() + timeout_s
    while not (metrics.exists() and metrics.read_text().count("\n") >= steps):
        assert proc.poll() is None, f"training exited ({proc.returncode}) before step {steps}"
        assert time.time() < deadline, f"no step {steps} in {metrics} after {timeout_s} s"
        time.sleep(0.1)


def worker_with_rank(agent_root: int, rank: int) -> psutil.Process:
    """The training worker of ``rank`` among the descendants of ``agent_root`` (the torchrun agent's are
    its children; their environment says which rank each is)."""
    for child in psutil.Process(agent_root).children(recursive=True):
        try:
            if child.environ().get("RANK") == str(rank) and "TORCHELASTIC_RUN_ID" in child.environ():
                return child
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    raise AssertionError(f"no worker of rank {rank} under process {agent_root}")


@pytest.fixture(scope="module")
def uninterrupted_fsdp2(tmp_path_factory) -> Path:
    """FSDP over 2 processes for KILL_STEPS steps, never interrupted (also builds the shared data cache)."""
    workdir = tmp_path_factory.mktemp("kill_reference")
    return run_layout(LAYOUTS["fsdp2"], workdir=workdir, steps=KILL_STEPS, run_name="uninterrupted", extra=KILL_EXTRA)


@pytest.mark.parametrize("victim", [0, 1])
def test_sigkilled_rank_is_restarted_by_the_launcher_and_resumes_bitwise(uninterrupted_fsdp2, tmp_path, victim):
    """One FSDP rank, at a random step, is SIGKILLed; ``launch.local --max-restarts 1`` (torchrun underneath,
    with what restarts need set by the launcher) restarts the whole group, which resumes from the newest
    complete checkpoint and ends with the uninterrupted run's losses and weights, bit for bit (same layout,
    same arithmetic: only the recomputed steps are repeated)."""
    workdir = uninterrupted_fsdp2.parent
    run_dir = tmp_path / "killed"
    layout = LAYOUTS["fsdp2"]
    kill_after = random.Random(victim).randint(4, 12)
    overrides = [*common_overrides(cache_dir=workdir / "cache", steps=KILL_STEPS), *KILL_EXTRA,
                 f"trainer.micro_batch_size={GLOBAL_BATCH // layout.dp}", f"hydra.run.dir={run_dir}"]  # fmt: skip
    # timeout -k: a torchrun whose workers hang in a gloo collective can outlive a plain timeout. The
    # environment does not set TORCH_DISABLE_SHARE_RDZV_TCP_STORE: the launcher must (pytorch#135712).
    cmd = ["timeout", "-k", "10", "300", sys.executable, "-m", "launch.local", f"--nproc={layout.nproc}",
           "--max-restarts=1", *overrides]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "TORCH_DISABLE_SHARE_RDZV_TCP_STORE"}
    env.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    log_path = tmp_path / "torchrun.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_for_steps(run_dir / "metrics.jsonl", steps=kill_after, proc=proc, timeout_s=180)
            victim_proc = worker_with_rank(proc.pid, victim)
            victim_proc.send_signal(signal.SIGKILL)
            killed_after = (run_dir / "metrics.jsonl").read_text().count("\n")
            proc.wait(timeout=320)
        finally:
            if proc.poll() is None:  # SIGTERM: `timeout` passes it on, and torchrun stops its workers
                proc.terminate()
                proc.wait(timeout=60)
    out = log_path.read_text()
    assert proc.returncode == 0, out[-4000:]
    assert killed_after < KILL_STEPS, "the run ended before the kill landed: raise KILL_STEPS"

    summary, reference = TrainResult.read(run_dir), TrainResult.read(uninterrupted_fsdp2)
    first = summary.first_step
    # The restarted group resumed from a checkpoint saved before the kill, not from scratch.
    assert 2 < first <= killed_after + 1 and (first - 1) % 2 == 0, (first, killed_after)
    # torchrun saw the kill and started a second generation of workers, which resumed.
    assert "failed (exitcode: -9)" in out and out.count("joined gloo process group: rank 0 of 2") == 2, out[-4000:]
    assert f"resumed from {run_dir / 'checkpoints' / f'step_{first - 1:08d}'}" in out
    assert summary.losses == reference.losses[first - 1 :]
    final, expected = final_weights(run_dir), final_weights(uninterrupted_fsdp2)
    assert final.keys() == expected.keys()
    assert all(torch.equal(final[k], expected[k]) for k in expected), "final weights differ from the uninterrupted run"
    print(f"killed rank {victim} after step {killed_after}; resumed at step {first}; "
          f"final loss {summary.losses[-1]!r} vs uninterrupted {reference.losses[-1]!r}")
