"""The code sandbox: every hazard a model-written program can be ends as a failed sample with a reason, the
evaluator carries on, and the run directory (denied to the program) is left exactly as it was."""

import os
from pathlib import Path

import pytest

from evaluation.sandbox import Limits, run_program, run_programs

LIMITS = Limits(timeout_s=4, cpu_s=1, memory_mb=256, file_mb=1)

# name -> (program, a fragment of the expected reason). {run} is the run directory the program must not touch.
HAZARDS = {
    "infinite loop": ("while True:\n    pass\n", "CPU time limit (1s) exceeded"),
    "sleeps forever": ("import time\nwhile True:\n    time.sleep(0.5)\n", "timed out after 4s"),
    "memory bomb": ("blocks = []\nwhile True:\n    blocks.append(bytearray(10**7))\n", "MemoryError"),
    "writes outside": ("open('{run}/planted.txt', 'w').write('x')\n", "writing {run}/planted.txt"),
    "deletes outside": ("import os\nos.remove('{run}/metrics.jsonl')\n", "os.remove on {run}/metrics.jsonl"),
    "removes the tree": ("import shutil\nshutil.rmtree('{run}')\n", "shutil.rmtree on {run}"),
    "reads the run": ("print(open('{run}/metrics.jsonl').read())\n", "reading {run}/metrics.jsonl"),
    "lists the run": ("import os\nprint(os.listdir('{run}'))\n", "listing {run}"),
    "kills its parent": ("import os, signal\nos.kill(os.getppid(), signal.SIGKILL)\n", "os.kill is not allowed"),
    "forks": ("import os\nif os.fork() == 0:\n    while True:\n        pass\n", "os.fork is not allowed"),
    "shell": ("import os\nos.system('rm -rf {run}')\n", "os.system is not allowed"),
    "subprocess": ("import subprocess\nsubprocess.run(['rm', '-rf', '{run}'])\n", "import _posixsubprocess"),
    "ctypes": ("import ctypes\nctypes.CDLL(None).kill(0, 9)\n", "import ctypes is not allowed"),
    "floods stdout": ("while True:\n    print('x' * 1000)\n", "File too large"),
    "exits early": ("import sys\nsys.exit(0)\nassert False\n", "exited (0) before its tests finished"),
    "exits hard": ("import os\nos._exit(0)\nassert False\n", "exited with status 0 before its tests finished"),
    "fails a test": ("def add(a, b):\n    return a - b\nassert add(2, 2) == 4, 'add(2, 2)'\n", "AssertionError: add(2, 2)"),
}


def _snapshot(root: Path) -> dict[str, tuple[bytes, int]]:
    return {str(p.relative_to(root)): (p.read_bytes(), p.stat().st_mtime_ns) for p in root.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory):
    run = tmp_path_factory.mktemp("run")
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 2.5}\n')
    (run / "checkpoints").mkdir()
    (run / "checkpoints" / "meta.json").write_text("{}")
    before = _snapshot(run)
    programs = [source.format(run=run) for source, _ in HAZARDS.values()]
    executions = run_programs(programs, limits=LIMITS, deny=[run], workers=2)
    return run, before, dict(zip(HAZARDS, executions))


@pytest.mark.parametrize("hazard", list(HAZARDS))
def test_a_hazard_is_a_failed_sample_with_its_reason(outcomes, hazard):
    run, _, executions = outcomes
    execution = executions[hazard]
    assert not execution.passed
    assert HAZARDS[hazard][1].format(run=run) in execution.reason


def test_the_run_directory_is_untouched_and_the_evaluator_survives(outcomes):
    run, before, _ = outcomes
    assert _snapshot(run) == before
    assert sorted(os.listdir(run)) == ["checkpoints", "metrics.jsonl"]
    assert run_program("assert sum(range(4)) == 6\n", limits=LIMITS).passed  # still here, still working


def test_a_correct_program_passes_and_may_use_its_own_directory():
    program = ("import os, json\njson.dump({'a': 1}, open('scratch.json', 'w'))\n"
               "assert json.load(open('scratch.json')) == {'a': 1}\nassert os.environ['HOME'] == os.getcwd()\n")  # fmt: skip
    assert run_program(program, limits=LIMITS).reason == "passed"


def test_a_syntax_error_is_a_failed_sample():
    execution = run_program("def f(:\n", limits=LIMITS)
    assert not execution.passed and "SyntaxError" in execution.reason
