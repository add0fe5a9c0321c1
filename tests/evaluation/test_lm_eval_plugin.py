"""The .pth hook that lets the bare ``lm_eval`` command find ``llama_pretrain`` (evaluation/lm_eval_plugin.py).

Each check runs a fresh interpreter started with ``-S`` (no site-packages .pth processed), given the
environment's packages as plain path entries, then processes only the temporary site directory the
installer wrote: exactly what interpreter start does with the installed line. The end-to-end run of the
real ``lm_eval`` command is in test_harness.py.
"""

from __future__ import annotations

import subprocess
import sys
import sysconfig
from pathlib import Path

from evaluation import lm_eval_plugin

REPO = Path(__file__).resolve().parents[2]


def _fresh_python(code: str, site_dir: Path, cwd: Path) -> subprocess.CompletedProcess:
    prelude = (f"import sys; sys.path.append({sysconfig.get_paths()['purelib']!r}); import site; "
               f"site.addsitedir({str(site_dir)!r}); ")  # fmt: skip
    return subprocess.run([sys.executable, "-S", "-c", prelude + code], cwd=cwd, capture_output=True, text=True,
                          timeout=300)  # fmt: skip


def test_the_installed_line_registers_ours_after_lm_evals_own_models(tmp_path):
    path = lm_eval_plugin.install(tmp_path)
    assert path.name == lm_eval_plugin.PTH_NAME and path.read_text().startswith("import ")
    proc = _fresh_python(
        "assert 'lm_eval' not in sys.modules, 'the hook imported lm-eval at start'; "
        "from lm_eval.api.registry import get_model; "  # get_model imports lm_eval.models: the hooked module
        "print(get_model('llama_pretrain').__name__, get_model('hf').__name__)", tmp_path, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["LlamaPretrainLM", "HFLM"]  # ours added, lm-eval's own still there


def test_without_the_line_lm_eval_does_not_know_our_model(tmp_path):
    proc = _fresh_python("from lm_eval.api.registry import get_model; get_model('llama_pretrain')", tmp_path,
                         cwd=REPO)  # fmt: skip
    assert proc.returncode != 0 and "llama_pretrain" in proc.stderr  # so the test above can fail


def test_a_stale_line_is_silent_and_uninstall_removes_it(tmp_path):
    lm_eval_plugin.install(tmp_path)
    # cwd outside the repository and -S: our package is not importable, as after `pip uninstall`
    proc = _fresh_python("print('started')", tmp_path, cwd=tmp_path)
    assert proc.returncode == 0 and proc.stdout.strip() == "started"
    assert proc.stderr == ""
    assert lm_eval_plugin.uninstall(tmp_path) == tmp_path / lm_eval_plugin.PTH_NAME
    assert not (tmp_path / lm_eval_plugin.PTH_NAME).exists() and lm_eval_plugin.uninstall(tmp_path) is None
