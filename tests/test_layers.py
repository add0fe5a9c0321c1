"""The floors of the codebase (docs/architecture.md), checked by import-linter's contracts in setup.cfg.

The contracts hold for the tree as it is, and break, naming the import, when a package imports one on a
floor above its own: a copy of the tree with one deliberate back-import per rule is linted too, so the
check cannot pass by checking nothing.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("model", "data", "trainer", "evaluation", "planner", "conf", "launch", "bench")
LINT = ("import sys\nfrom importlinter.cli import lint_imports\n"
        "sys.exit(lint_imports(config_filename='setup.cfg', no_cache=True, no_logo=True))")  # fmt: skip


def lint(root: Path) -> subprocess.CompletedProcess:
    """``lint-imports`` on the tree at ``root`` (its packages found first on the path)."""
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run([sys.executable, "-c", LINT], cwd=root, env=env, capture_output=True, text=True, timeout=120)


def test_the_tree_keeps_its_floors():
    proc = lint(REPO)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "2 kept, 0 broken" in proc.stdout


def copy_tree(dest: Path) -> Path:
    for package in PACKAGES:
        shutil.copytree(REPO / package, dest / package, ignore=shutil.ignore_patterns("__pycache__", "*.yaml"))
    for name in ("setup.cfg", "compat.py", "structured.py"):
        shutil.copy(REPO / name, dest / name)
    return dest


@pytest.mark.parametrize(
    "module, back_import, contract",
    [
        ("trainer/run/step.py", "from conf.schema import Config", "Floors"),  # trainer -> the root config
        ("model/llama.py", "from trainer.parallel.dims import ParallelDims", "Floors"),  # model -> trainer
        ("evaluation/lm.py", "from planner.search import search", "Floors"),  # siblings on one floor
        ("trainer/parallel/build.py", "from trainer.run.step import train_step", "Trainer rooms"),  # room -> run
    ],
)
def test_a_back_import_breaks_the_contract(tmp_path, module, back_import, contract):
    root = copy_tree(tmp_path)
    path = root / module
    path.write_text(path.read_text() + f"\n{back_import}  # deliberate back-import\n")
    proc = lint(root)
    assert proc.returncode != 0, proc.stdout
    importer = module.removesuffix(".py").replace("/", ".")
    imported = back_import.split()[1]
    broken = proc.stdout.split("Broken contracts", 1)[-1]
    assert f"{contract}" in broken and importer in broken and imported in broken, proc.stdout
