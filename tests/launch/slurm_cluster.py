"""A real Slurm cluster on this machine: munge, a controller and two node daemons (n1, n2), from Debian's
packages, configured under a temporary directory. For tests only; needs root.

The facts this relies on (what works here, and how) are in ../shared/ENVIRONMENT.md.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Optional

PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge")


def _run(*cmd: str, env: Optional[dict] = None, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=check, capture_output=True, text=True, env=env)


def ensure_packages() -> None:
    if all(shutil.which(b) for b in ("slurmctld", "slurmd", "sbatch", "munged")):
        return
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    _run("apt-get", "update", env=env)
    _run("apt-get", "install", "-y", "--no-install-recommends", *PACKAGES, env=env)


MUNGE_PID_FILE = Path("/run/munge/munged.pid")


def ensure_munge() -> bool:
    """munged running with a key; leaves an already-working munge alone. True when this call started it."""
    if _run("bash", "-c", "munge -n | unmunge", check=False).returncode == 0:
        return False
    for d in ("/run/munge", "/var/log/munge", "/var/lib/munge", "/etc/munge"):
        os.makedirs(d, exist_ok=True)
        shutil.chown(d, user="munge", group="munge")
    key = Path("/etc/munge/munge.key")
    if not key.exists():
        _run("mungekey", "--create", f"--keyfile={key}")
        shutil.chown(key, user="munge", group="munge")
        key.chmod(0o400)
    _run("runuser", "-u", "munge", "--", "/usr/sbin/munged")
    for _ in range(50):
        if _run("bash", "-c", "munge -n | unmunge", check=False).returncode == 0:
            return True
        time.sleep(0.1)
    raise RuntimeError("munged did not start")


class LocalSlurm:
    def __init__(self, root: Path, *, nodes: tuple[str, ...] = ("n1", "n2"), ctld_port: int = 6917,
                 node_port: int = 6921, gpus_per_node: int = 0):  # fmt: skip
        """``ctld_port`` and ``node_port`` (the first node's; the others count up from it) let two clusters
        run side by side, e.g. two test files in parallel. ``gpus_per_node`` > 0 declares that many GPUs
        per node as a count-only GRES (no device files: jobs can ask for GPUs and get none that work, which
        is what a misconfigured GPU node looks like)."""
        self.root = Path(root)
        self.nodes = nodes
        self.ctld_port = ctld_port
        self.node_port = node_port
        self.gpus_per_node = gpus_per_node
        self.conf = self.root / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        self._started_munge = False

    def _write_conf(self) -> None:
        host = socket.gethostname()
        (self.root / "state").mkdir(parents=True, exist_ok=True)
        for node in self.nodes:
            (self.root / "spool" / node).mkdir(parents=True, exist_ok=True)
        lines = [
            "ClusterName=llamatest", "SlurmctldHost=localhost", f"SlurmctldPort={self.ctld_port}",
            "SlurmUser=root", "SlurmdUser=root", "AuthType=auth/munge", "CredType=cred/munge",
            "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none", "MpiDefault=none",
            "SelectType=select/cons_tres", "SelectTypeParameters=CR_Core", "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none", "ReturnToService=2", "MinJobAge=600",
            f"StateSaveLocation={self.root}/state", f"SlurmdSpoolDir={self.root}/spool/%n",
            f"SlurmctldPidFile={self.root}/slurmctld.pid", f"SlurmdPidFile={self.root}/slurmd.%n.pid",
            f"SlurmctldLogFile={self.root}/slurmctld.log", f"SlurmdLogFile={self.root}/slurmd.%n.log",
        ]  # fmt: skip
        gres = f" Gres=gpu:{self.gpus_per_node}" if self.gpus_per_node else ""
        if self.gpus_per_node:
            lines.append("GresTypes=gpu")
            # Slurm counts a GPU only with a device file; /dev/null serves (nothing opens it).
            line = f"NodeName={','.join(self.nodes)} Name=gpu File=/dev/null\n"
            (self.root / "gres.conf").write_text(line * self.gpus_per_node)
        for index, node in enumerate(self.nodes):
            lines.append(f"NodeName={node} NodeHostname={host} NodeAddr=127.0.0.1 Port={self.node_port + index} CPUs=1 "
                         f"RealMemory=8000{gres}")  # fmt: skip
        lines.append("PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES")
        self.conf.write_text("\n".join(lines) + "\n")

    def start(self) -> None:
        ensure_packages()
        self._started_munge = ensure_munge()
        self._write_conf()
        _run("slurmctld", "-f", str(self.conf), "-i", env=self.env)
        for node in self.nodes:
            _run("slurmd", "-f", str(self.conf), "-N", node, env=self.env)
        deadline = time.time() + 60
        while time.time() < deadline:
            out = _run("sinfo", "-h", "-N", "-o", "%N %t", env=self.env, check=False).stdout.split()
            states = dict(zip(out[::2], out[1::2]))
            if all(states.get(node) == "idle" for node in self.nodes):
                return
            time.sleep(1)
        raise RuntimeError(f"slurm nodes did not come up: {states}\n{self.logs()}")

    def sbatch(self, script: Path, *args: str, nodes: int, env: dict, cwd: Path, output: Path,
               extra: tuple[str, ...] = ()) -> str:  # fmt: skip
        job_env = {**self.env, **env}
        cmd = ["sbatch", "--parsable", f"-N{nodes}", "--export=ALL", f"--output={output}", *extra, str(script), *args]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=job_env, cwd=cwd).stdout
        return out.strip().split(";")[0]

    def job_state(self, job_id: str) -> str:
        out = _run("scontrol", "show", "job", job_id, env=self.env, check=False).stdout
        match = re.search(r"JobState=(\w+)", out)
        return match.group(1) if match else "UNKNOWN"

    def wait(self, job_id: str, *, timeout_s: float, until: tuple[str, ...] = ("COMPLETED", "FAILED", "CANCELLED",
             "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE", "PREEMPTED")) -> str:  # fmt: skip
        deadline = time.time() + timeout_s
        state = "UNKNOWN"
        while time.time() < deadline:
            state = self.job_state(job_id)
            if state in until:
                return state
            time.sleep(2)
        _run("scancel", job_id, env=self.env, check=False)
        raise TimeoutError(f"job {job_id} still {state} after {timeout_s} s\n{self.logs()}")

    def logs(self) -> str:
        return "\n".join(f"== {p.name}\n{p.read_text()[-2000:]}" for p in sorted(self.root.glob("*.log")))

    def stop(self) -> None:
        """Stops the daemons this object started, by the PIDs in their pid files."""
        pid_files = [*self.root.glob("slurmd.*.pid"), self.root / "slurmctld.pid"]
        if self._started_munge:
            pid_files.append(MUNGE_PID_FILE)
        for pid_file in pid_files:
            try:
                os.kill(int(pid_file.read_text().strip()), signal.SIGTERM)
            except (FileNotFoundError, ProcessLookupError, ValueError):
                pass
        time.sleep(1)
