"""Running model-written programs against their tests, isolated from the evaluator (HumanEval, MBPP: §3.5).

Every program runs in a process of its own (a fresh ``python -I``, not a fork of the evaluator: it shares
no memory with the model and inherits no open files), in a new session, in a temporary directory that is
deleted afterwards, with a scrubbed environment (``HOME`` and ``TMPDIR`` inside that directory), under:

- a wall-clock ``timeout_s`` (the whole process group is killed), a CPU-time limit and an address-space
  limit (``RLIMIT_CPU``, ``RLIMIT_AS``), a file-size limit and no core files;
- an audit hook (evaluation/sandbox_guard.py) that refuses new processes, signals, sockets, writes outside
  the temporary directory and reading the denied paths (the run directory, the checkpoint).

A sample passes only when the program ran to its end (the guard then writes a nonce the program never
sees); every other ending is a failed sample with a one-line reason (the exception, "timed out after
10s", "CPU time limit", ...), and the evaluator carries on.

What this is and is not: a guard against the mistakes a language model's programs make (infinite loops,
memory blow-ups, stray file writes, ``os.system``), enforced by the kernel (limits, process group) and by
the interpreter (the audit hook). The audit hook is not a security boundary against a program written to
escape it; run untrusted evaluations inside a container as well. That is why execution is opt-in
(``eval.allow_code_execution``), as in lm-evaluation-harness (``HF_ALLOW_CODE_EVAL``) and human-eval.

Why not human-eval's ``check_correctness`` or evaluate's ``code_eval`` (which wraps it): both run the
program in a ``multiprocessing`` fork of the evaluator (with our model's memory mapped into it) and limit
it by disabling functions in that process; ``code_eval`` is also fetched from the Hugging Face Hub at run
time, and neither reports why a sample failed.
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

GUARD = Path(__file__).with_name("sandbox_guard.py")
REASON_BYTES = 4096


@dataclass
class Limits:
    """``eval.execution``: the limits every program runs under."""

    timeout_s: float = 10.0
    """Wall-clock seconds per program (the process group is killed after it)."""
    cpu_s: int = 10
    memory_mb: int = 1024
    """Address space; a Python interpreter alone maps about 30 MB."""
    file_mb: int = 16
    """The largest file the program (or its output) may write."""

    def __post_init__(self) -> None:
        if self.timeout_s <= 0 or self.cpu_s < 1 or self.memory_mb < 64 or self.file_mb < 1:
            raise ValueError("eval.execution limits: timeout_s > 0, cpu_s >= 1, memory_mb >= 64 and file_mb >= 1")


@dataclass(frozen=True)
class Execution:
    passed: bool
    reason: str
    """"passed", or why not: the program's exception, a limit, a refused operation."""


_SIGNALS = {signal.SIGXCPU: "CPU time limit ({cpu_s}s) exceeded", signal.SIGXFSZ: "file size limit ({file_mb} MB) exceeded",
            signal.SIGKILL: "killed", signal.SIGSEGV: "crashed (segmentation fault)"}  # fmt: skip


def _tail(path: Path) -> str:
    with path.open("rb") as handle:
        handle.seek(max(0, path.stat().st_size - REASON_BYTES))
        lines = handle.read().decode("utf-8", "replace").strip().splitlines()
    return lines[-1] if lines else ""


def _reason(returncode: int, stderr: Path, limits: Limits) -> str:
    if returncode < 0:
        number = -returncode
        message = _SIGNALS.get(number, f"killed by signal {signal.Signals(number).name}" if number in signal.valid_signals() else f"killed by signal {number}")  # noqa: E501
        return message.format(cpu_s=limits.cpu_s, file_mb=limits.file_mb)
    return _tail(stderr) or f"exited with status {returncode} before its tests finished"


def run_program(source: str, *, limits: Limits = Limits(), deny: Sequence[str | Path] = ()) -> Execution:
    """Run ``source`` (a program and its tests) in the sandbox; whether it ran to its end, and why not."""
    with tempfile.TemporaryDirectory(prefix="llama-sandbox-") as tmp:
        work = Path(tmp) / "work"  # the program's directory; the streams stay beside it, out of its listing
        work.mkdir()
        (work / "program.py").write_text(source, encoding="utf-8")
        nonce = secrets.token_hex(16)
        read_end, write_end = os.pipe()
        command = [sys.executable, "-I", str(GUARD), "--program", str(work / "program.py"), "--dir", str(work),
                   "--memory-mb", str(limits.memory_mb), "--cpu-s", str(limits.cpu_s), "--file-mb", str(limits.file_mb),
                   "--result-fd", str(write_end), *[a for d in deny for a in ("--deny", str(d))]]  # fmt: skip
        env = {"PATH": "/usr/bin:/bin", "HOME": str(work), "TMPDIR": str(work), "LANG": "C.UTF-8",
               "PYTHONHASHSEED": "0", "PYTHONDONTWRITEBYTECODE": "1"}  # fmt: skip
        stdout, stderr = Path(tmp) / "stdout", Path(tmp) / "stderr"
        try:
            with stdout.open("wb") as out, stderr.open("wb") as err:
                process = subprocess.Popen(command, cwd=work, env=env, stdin=subprocess.PIPE, stdout=out, stderr=err,
                                           pass_fds=(write_end,), start_new_session=True)  # fmt: skip
            os.close(write_end)
            write_end = -1
            try:
                process.stdin.write(f"{nonce}\n".encode())
                process.stdin.close()
            except BrokenPipeError:
                pass  # the guard died before reading it: the return code says why
            timed_out = False
            try:
                process.wait(timeout=limits.timeout_s)
            except subprocess.TimeoutExpired:
                timed_out = True
                os.killpg(process.pid, signal.SIGKILL)  # the group leader is not reaped yet: its id is still ours
                process.wait()
            result = b""
            while chunk := os.read(read_end, 64):
                result += chunk
        finally:
            os.close(read_end)
            if write_end >= 0:
                os.close(write_end)
        if timed_out:
            return Execution(passed=False, reason=f"timed out after {limits.timeout_s:g}s")
        if process.returncode == 0 and result.decode(errors="replace") == nonce:
            return Execution(passed=True, reason="passed")
        return Execution(passed=False, reason=_reason(process.returncode, stderr, limits))


def run_programs(sources: Sequence[str], *, limits: Limits = Limits(), deny: Sequence[str | Path] = (),
                 workers: int = 0) -> list[Execution]:  # fmt: skip
    """``run_program`` over many sources, ``workers`` at a time (0: one per CPU core), results in order."""
    workers = workers or os.cpu_count() or 1
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(lambda source: run_program(source, limits=limits, deny=deny), sources))
