"""Multi-node training, really across processes that only meet over a network (slow; `make test-multinode`).

1. Two "nodes" as network namespaces joined by a veth pair, each running torchrun with --nnodes 2 and a
   c10d rendezvous, training the debug model with FSDP across them.
2. A real Slurm controller and two node daemons (Debian's packages, installed if missing), and the
   project's own ``launch/slurm.sbatch`` submitted with ``sbatch -N2``.

Both compare their losses and final weights with a single-process run at the same global batch. Each
test sets up and tears down what it needs; they need root (namespaces, daemons), as on the dev and CI
machines.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from launch.harness import LAYOUTS, common_overrides, run_layout
from launch.local import build_command
from launch.loss_compare import compare

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
STEPS = 10
NODES = (("llmn1", "veth-llmn1", "10.77.0.1"), ("llmn2", "veth-llmn2", "10.77.0.2"))


def sh(*cmd: str) -> None:
    subprocess.run(cmd, check=True, capture_output=True, text=True)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The single-process run every multi-node run must match (also prepares the shared data cache)."""
    workdir = tmp_path_factory.mktemp("multinode")
    return workdir, run_layout(LAYOUTS["single"], workdir=workdir, steps=STEPS)


def node_overrides(workdir: Path, run_dir: Path) -> list[str]:
    # 2 nodes x 1 process x micro-batch 4 = the reference's global batch of 8.
    return [*common_overrides(cache_dir=workdir / "cache", steps=STEPS), "trainer.micro_batch_size=4",
            f"hydra.run.dir={run_dir}"]  # fmt: skip


@pytest.fixture
def two_namespaces():
    (ns1, veth1, ip1), (ns2, veth2, ip2) = NODES
    for ns, _, _ in NODES:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)  # leftovers of an aborted run
    sh("ip", "netns", "add", ns1)
    sh("ip", "netns", "add", ns2)
    try:
        sh("ip", "link", "add", veth1, "type", "veth", "peer", "name", veth2)
        for ns, veth, ip in NODES:
            sh("ip", "link", "set", veth, "netns", ns)
            sh("ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", veth)
            sh("ip", "-n", ns, "link", "set", veth, "up")
            sh("ip", "-n", ns, "link", "set", "lo", "up")
        yield NODES
    finally:
        for ns, _, _ in NODES:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)  # removes the veth pair too


def test_fsdp_across_two_network_namespaces(reference, two_namespaces, tmp_path):
    workdir, reference_run = reference
    run_dir = workdir / "netns"
    endpoint = f"{NODES[0][2]}:29411"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    procs = []
    for index, (ns, veth, ip) in enumerate(two_namespaces):
        # The endpoint's hostname does not resolve to its veth address, so node 0 is told it hosts the
        # rendezvous store (is_host=1); --local-addr and GLOO_SOCKET_IFNAME keep all traffic on the veth.
        host_conf = ["--rdzv-conf", "is_host=1"] if index == 0 else ["--rdzv-conf", "is_host=0"]
        rendezvous = ("--nnodes=2", "--rdzv-backend=c10d", f"--rdzv-endpoint={endpoint}", "--rdzv-id=netns-test",
                      *host_conf, f"--local-addr={ip}")  # fmt: skip
        cmd = ["ip", "netns", "exec", ns, "env", f"GLOO_SOCKET_IFNAME={veth}", "timeout", "-k", "10", "300",
               *build_command(nproc=1, overrides=node_overrides(workdir, run_dir), rendezvous=rendezvous)]  # fmt: skip
        log = open(tmp_path / f"node{index}.log", "w")
        procs.append((subprocess.Popen(cmd, cwd=workdir, env=env, stdout=log, stderr=subprocess.STDOUT), log))
    for proc, log in procs:
        proc.wait(timeout=330)
        log.close()
    logs = [(tmp_path / f"node{i}.log").read_text() for i in range(2)]
    assert all(proc.returncode == 0 for proc, _ in procs), "\n\n".join(log[-3000:] for log in logs)
    assert "[rank0]" in logs[0] and "[rank1]" in logs[1]  # one rank per node
    table, ok = compare({"single": reference_run, "netns_2_nodes": run_dir})
    print(table)
    assert ok, table


def test_slurm_batch_script_trains_across_two_nodes(reference, local_slurm, tmp_path):
    workdir, reference_run = reference
    slurm = local_slurm()
    run_dir = workdir / "slurm_run"
    env = {"PYTHON": sys.executable, "PYTHONPATH": str(REPO), "NPROC_PER_NODE": "1", "RDZV_HOST": "127.0.0.1",
           "RDZV_PORT": "29412", "RUN_DIR": str(run_dir), "OMP_NUM_THREADS": "1"}  # fmt: skip
    overrides = [o for o in node_overrides(workdir, run_dir) if not o.startswith("hydra.run.dir")]
    job_log = tmp_path / "job.out"
    # CPU nodes: the script asks for 8 GPUs per node unless told otherwise on the command line.
    job_id = slurm.sbatch(REPO / "launch" / "slurm.sbatch", *overrides, nodes=2, env=env, cwd=workdir,
                          output=job_log, extra=("--gpus-per-node=0",))  # fmt: skip
    state = slurm.wait(job_id, timeout_s=400)
    log = job_log.read_text()
    assert state == "COMPLETED", f"job {job_id} ended {state}:\n{log[-4000:]}"
    assert "2 nodes (n[1-2])" in log
    assert "[rank0]" in log and "[rank1]" in log and "train[10/10]" in log
    print("\n".join(line for line in log.splitlines() if line.startswith("job ") or "layout dp_replicate" in line))
    table, ok = compare({"single": reference_run, "slurm_2_nodes": run_dir})
    print(table)
    assert ok, table


def test_slurm_gpu_job_without_working_gpus_fails_fast(local_slurm, tmp_path):
    """Nodes that grant GPUs (GRES) the job cannot use: the script stops before any worker starts, naming
    the problem, instead of training on CPUs with gloo."""
    cluster = local_slurm(ctld_port=6927, node_port=6931, gpus_per_node=1)
    job_log = tmp_path / "job.out"
    env = {"PYTHON": sys.executable, "PYTHONPATH": str(REPO), "RUN_DIR": str(tmp_path / "run")}
    job_id = cluster.sbatch(REPO / "launch" / "slurm.sbatch", "model=debug", nodes=2, env=env, cwd=tmp_path,
                            output=job_log, extra=("--gpus-per-node=1",))  # fmt: skip
    state = cluster.wait(job_id, timeout_s=120)
    log = job_log.read_text()
    assert state == "FAILED", log
    assert "asked for 1 GPU(s) per node, but nvidia-smi sees none" in log and "CUDA_VISIBLE_DEVICES=0" in log
    assert "joined" not in log and not (tmp_path / "run").exists()
