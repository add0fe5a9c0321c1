"""Preemption on a real Slurm cluster (slow; `make test-multinode`): signal -> checkpoint -> requeue -> resume.

``launch/slurm.sbatch`` runs as a 2-node job on the local cluster of tests/launch/slurm_cluster.py. Mid-run
the batch shell gets SIGUSR2, as Slurm sends it ahead of the time limit (``#SBATCH --signal=B:USR2@300``);
the run must checkpoint the current step, exit, requeue itself under the same job id, resume from that
checkpoint and end with the losses and weights of an uninterrupted FSDP run of the same global batch.
Needs root (daemons), as on the dev and CI machines.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from launch.harness import LAYOUTS, common_overrides, final_weights, losses, run_layout
from launch.loss_compare import LOSS_RTOL, WEIGHT_RTOL
from tests.launch.slurm_cluster import LocalSlurm
from trainer.run.records import TrainResult, series

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
STEPS = 120
"""~0.2 s a step: the job trains for ~25 s, so the signal lands early and most steps run after the resume."""
PINNED = (f"optim.decay_steps={STEPS}",)


def job_fields(slurm: LocalSlurm, job_id: str) -> dict[str, str]:
    out = subprocess.run(["scontrol", "show", "job", job_id], env=slurm.env, capture_output=True, text=True,
                         timeout=30).stdout  # fmt: skip
    return dict(re.findall(r"(\w+)=(\S+)", out))


def wait_for(predicate, *, timeout_s: float, what: str, slurm: LocalSlurm, job_log: Path) -> None:
    deadline = time.time() + timeout_s
    while not predicate():
        if time.time() > deadline:
            log = job_log.read_text() if job_log.exists() else ""
            raise TimeoutError(f"no {what} after {timeout_s} s\n{log[-4000:]}\n{slurm.logs()}")
        time.sleep(0.5)


@pytest.fixture
def slurm(local_slurm):
    return local_slurm(ctld_port=6937, node_port=6941)  # ports of its own: it can run beside test_multinode.py's


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    """FSDP over 2 processes, global batch 8, STEPS steps, never interrupted (also builds the data cache)."""
    workdir = tmp_path_factory.mktemp("preemption")
    return run_layout(LAYOUTS["fsdp2"], workdir=workdir, steps=STEPS, extra=PINNED)


def test_usr2_checkpoints_requeues_and_resumes_to_the_same_loss(uninterrupted, slurm, tmp_path):
    workdir = uninterrupted.parent
    run_dir = tmp_path / "run"
    env = {"PYTHON": sys.executable, "PYTHONPATH": str(REPO), "NPROC_PER_NODE": "1", "RDZV_HOST": "127.0.0.1",
           "RDZV_PORT": "29413", "RUN_DIR": str(run_dir), "OMP_NUM_THREADS": "1", "STOP_TIMEOUT": "60"}  # fmt: skip
    # 2 nodes x 1 process x micro-batch 4 = the reference's global batch of 8.
    overrides = [*common_overrides(cache_dir=workdir / "cache", steps=STEPS), *PINNED, "trainer.micro_batch_size=4"]
    job_log = tmp_path / "job.out"
    # --time bounds a stuck job (its USR2 warning would come at 10 of 15 minutes, long after this run ends).
    job_id = slurm.sbatch(REPO / "launch" / "slurm.sbatch", *overrides, nodes=2, env=env, cwd=workdir,
                          output=job_log, extra=("--time=15", "--gpus-per-node=0"))  # fmt: skip
    metrics = run_dir / "metrics.jsonl"
    logged = lambda: metrics.read_text().count("\n") if metrics.exists() else 0  # noqa: E731
    wait_for(lambda: logged() >= 3, timeout_s=180, what="3 logged steps", slurm=slurm, job_log=job_log)
    signalled_after = logged()
    # What `#SBATCH --signal=B:USR2@300` does 300 s before the time limit: signal the batch shell only.
    subprocess.run(["scancel", "--batch", "--signal=USR2", job_id], env=slurm.env, check=True, timeout=30)

    # The script requeues the job; Slurm holds a requeued job back for ~2 minutes (EligibleTime = requeue
    # + 121 s). On a real cluster that is just queueing; here it is only waiting, so let it start now.
    wait_for(lambda: job_fields(slurm, job_id).get("Restarts") == "1", timeout_s=180, what="requeue",
             slurm=slurm, job_log=job_log)  # fmt: skip
    # Not at once, though: slurmd revokes the first start's job credential at the requeue, with a time
    # stamp in whole seconds, and refuses a start whose credential is not newer ("Killing non-startable
    # batch JobId=1: Job credential revoked", seen once in 4 runs), so let that second pass.
    time.sleep(3)
    if job_fields(slurm, job_id).get("JobState") == "PENDING":
        subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"], env=slurm.env, check=True,
                       timeout=30)  # fmt: skip
    state = slurm.wait(job_id, timeout_s=300)
    log = job_log.read_text()
    fields = job_fields(slurm, job_id)
    assert state == "COMPLETED" and fields["Restarts"] == "1", f"job {job_id} ended {state}:\n{log[-4000:]}"

    # The first start stopped on the signal at the end of a step, after checkpointing it ...
    stop = re.search(r"stop signal received: checkpoint of step (\d+) saved", log)
    assert stop and "got SIGUSR2" in log and "requeueing" in log, log[-4000:]
    stopped_at = int(stop.group(1))
    assert signalled_after <= stopped_at < STEPS, (signalled_after, stopped_at)
    assert (run_dir / "checkpoints" / f"step_{stopped_at:08d}" / "meta.json").is_file()
    # ... and the second start (same job id, same run directory) resumed from that checkpoint.
    assert f"job {job_id} (start 2)" in log and f"resumed from {run_dir / 'checkpoints'}/step_{stopped_at:08d}" in log
    summary = TrainResult.read(run_dir)
    assert summary.first_step == stopped_at + 1 and not summary.stopped_by_signal

    # Every step's loss (both starts together, from metrics.jsonl) and the final weights match the
    # uninterrupted run within launch/loss_compare.py's tolerances. Both are FSDP over two gloo ranks, so
    # they are in fact expected to agree exactly; the tolerance only keeps the test layout-agnostic.
    logged = series(run_dir, "train/loss")
    assert logged.steps == list(range(1, STEPS + 1)), "each step logged exactly once across the two starts"
    reference = losses(uninterrupted)
    loss_rel = max(abs(a - b) / abs(b) for a, b in zip(logged.values, reference))
    ref_w, got_w = final_weights(uninterrupted), final_weights(run_dir)
    weight_rel = max(float((got_w[k] - ref_w[k]).norm() / ref_w[k].norm()) for k in ref_w)
    print(f"job {job_id}: USR2 after step {signalled_after}, checkpoint at step {stopped_at}, resumed at "
          f"{summary.first_step}; final loss {summary.losses[-1]!r} vs uninterrupted {reference[-1]!r}; "
          f"max loss rel diff {loss_rel:.2e}, max weight rel diff {weight_rel:.2e}")  # fmt: skip
    assert summary.losses[-1] == pytest.approx(reference[-1], rel=LOSS_RTOL)
    assert loss_rel <= LOSS_RTOL and weight_rel <= WEIGHT_RTOL
