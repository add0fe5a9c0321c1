"""launch/slurm.sbatch's set-up, run by bash with stand-ins for srun, scontrol and nvidia-smi (no Slurm
needed): the GPU request and its check, processes per node, the rendezvous port, srun's CPUs, the network
interface. The script on a real (local) Slurm cluster: tests/launch/test_multinode.py and test_preemption.py."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "launch" / "slurm.sbatch"

_FAKES = {
    # srun: record its environment's relevant variables and its arguments, then succeed.
    # With FAKE_HANG: the trainer's hang watchdog ended the run (its reports written, a failed exit).
    "srun": '#!/bin/bash\n{ for v in SRUN_CPUS_PER_TASK NCCL_SOCKET_IFNAME GLOO_SOCKET_IFNAME; do echo "$v=${!v:-}"; done;'
            ' printf "%s\\n" "$@"; } > "$FAKE_OUT/srun"\n'
            'if [[ -n "${FAKE_HANG:-}" ]]; then mkdir -p "$RUN_DIR/hang"; echo report > "$RUN_DIR/hang/rank0.txt"; exit 1; fi\n',
    "scontrol": '#!/bin/bash\nif [[ "$1 $2" == "show hostnames" ]]; then printf "node1\\nnode2\\n"; fi\n'
                'if [[ "$1" == requeue ]]; then echo "$@" > "$FAKE_OUT/requeue"; fi\n',
    "nvidia-smi": '#!/bin/bash\nfor ((i = 0; i < ${FAKE_GPUS:-0}; i++)); do echo "GPU $i: NVIDIA H100 80GB HBM3 (UUID: x)"; done\n',
}


def _run(tmp_path: Path, **env: str) -> tuple[subprocess.CompletedProcess, list[str], dict[str, str]]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name, body in _FAKES.items():
        (bin_dir / name).write_text(body)
        (bin_dir / name).chmod(0o755)
    full_env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "FAKE_OUT": str(tmp_path), "SLURM_JOB_ID": "12345",
                "SLURM_JOB_NUM_NODES": "2", "SLURM_JOB_NODELIST": "node[1-2]", "SLURM_SUBMIT_DIR": str(tmp_path),
                "RUN_DIR": str(tmp_path / "run"), **env}  # fmt: skip
    proc = subprocess.run(["bash", str(SCRIPT), "model=debug"], env=full_env, capture_output=True, text=True,
                          timeout=60)  # fmt: skip
    recorded = (tmp_path / "srun").read_text().splitlines() if (tmp_path / "srun").exists() else []
    srun_env = dict(line.split("=", 1) for line in recorded[:3])
    return proc, recorded[3:], srun_env


def test_gpu_job_runs_one_process_per_gpu_on_cuda(tmp_path):
    proc, args, srun_env = _run(tmp_path, SLURM_GPUS_PER_NODE="a100:2", FAKE_GPUS="2", SLURM_CPUS_PER_TASK="16",
                                NET_IFNAME="ib0")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "--nproc-per-node=2" in args
    assert "--rdzv-endpoint=node1:32345" in args  # 20000 + 12345 mod 40000: differs between jobs
    assert args[-2:] == ["trainer.device=cuda", "model=debug"]  # the user's overrides come last and win
    assert srun_env == {"SRUN_CPUS_PER_TASK": "16", "NCCL_SOCKET_IFNAME": "ib0", "GLOO_SOCKET_IFNAME": "ib0"}
    assert "2 GPU(s) per node" in proc.stdout and "NCCL_SOCKET_IFNAME=ib0" in proc.stdout


def test_gpu_job_without_visible_gpus_stops_before_training(tmp_path):
    proc, args, _ = _run(tmp_path, SLURM_GPUS_PER_NODE="8", FAKE_GPUS="0")
    assert proc.returncode == 1
    assert "asked for 8 GPU(s) per node, but nvidia-smi sees none" in proc.stderr
    assert "--gpus-per-node=0" in proc.stderr  # how to train on CPUs instead
    assert args == []  # srun never ran


@pytest.mark.parametrize("gpus", [None, "0"])
def test_cpu_job_runs_one_process_per_node_without_a_device_override(tmp_path, gpus):
    env = {} if gpus is None else {"SLURM_GPUS_PER_NODE": gpus}
    proc, args, srun_env = _run(tmp_path, **env)
    assert proc.returncode == 0, proc.stderr
    assert "--nproc-per-node=1" in args and "trainer.device=cuda" not in args
    assert srun_env == {"SRUN_CPUS_PER_TASK": "", "NCCL_SOCKET_IFNAME": "", "GLOO_SOCKET_IFNAME": ""}


def test_a_hung_run_is_requeued_a_bounded_number_of_times_keeping_its_reports(tmp_path):
    proc, _, _ = _run(tmp_path, FAKE_HANG="1", SLURM_RESTART_COUNT="1")
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "requeue").read_text().split() == ["requeue", "12345"]
    assert (tmp_path / "run" / "hang" / "job12345-1" / "rank0.txt").is_file()  # kept per attempt
    assert "training hung" in proc.stdout

    (tmp_path / "requeue").unlink()
    proc, _, _ = _run(tmp_path, FAKE_HANG="1", SLURM_RESTART_COUNT="3")  # HANG_REQUEUES=3 done
    assert proc.returncode == 1 and not (tmp_path / "requeue").exists()
    assert "not requeueing (HANG_REQUEUES=3)" in proc.stderr
