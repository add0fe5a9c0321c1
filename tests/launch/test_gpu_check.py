"""The CPU-side parts of ``make gpu-check`` / ``make test-gpu`` / ``make gpu-wheels`` (launch/gpu_check.py,
launch/gpu_wheels.py): the refusal without a GPU, the JUnit reading and its pass rule, the reader of trainer
runs, the summary files, and the wheel folder installing offline into a fresh virtualenv."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from launch import gpu_check, gpu_wheels
from launch.gpu_check import StageResult, all_tests_passed, junit_counts, summary_markdown, write_summary

REPO = Path(__file__).resolve().parents[2]
ENVIRONMENT = {"device": "NVIDIA H100 80GB HBM3", "capability": "sm90", "memory_gib": 79.1, "gpus_visible": 1,
               "torch": "2.11.0+cu130", "cuda": "13.0", "cudnn": 91200, "python": "3.12.3",
               "date": "2026-12-01 12:00 UTC", "commit": "abc1234"}  # fmt: skip


def test_refuses_to_pass_without_a_gpu(tmp_path):
    """On a machine without CUDA nothing is tested, so the check fails (exit 2), saying why, and writes nothing."""
    proc = subprocess.run([sys.executable, "-m", "launch.gpu_check", "--out", str(tmp_path / "out"), "--tests-only"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == gpu_check.NO_CUDA_EXIT, proc.stderr
    assert "no CUDA device is visible to torch" in proc.stderr and "make test" in proc.stderr
    assert not (tmp_path / "out").exists()


def test_make_test_gpu_fails_without_a_gpu():
    proc = subprocess.run(["make", "--no-print-directory", "test-gpu", f"GPU_PY={sys.executable}"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode != 0
    assert "no CUDA device is visible" in proc.stderr


def _junit(tmp_path: Path, body: str) -> dict:
    (tmp_path / "test_sample.py").write_text(textwrap.dedent(body))
    xml = tmp_path / "out.xml"
    subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={xml}",
                    str(tmp_path / "test_sample.py")], cwd=tmp_path, capture_output=True)  # fmt: skip
    return junit_counts(xml)


def test_junit_counts_and_the_pass_rule(tmp_path):
    counts = _junit(tmp_path, """
        import pytest
        def test_ok(): pass
        @pytest.mark.skip(reason="needs flash-attn")
        def test_optional(): pass
    """)
    assert (counts["passed"], counts["failed"], counts["skipped"]) == (1, 0, 1)
    assert all_tests_passed(counts)  # an optional package's skip is allowed

    counts = _junit(tmp_path, """
        import pytest
        def test_ok(): pass
        @pytest.mark.skip(reason="needs a CUDA device (torch sees none)")
        def test_gpu(): pass
    """)
    assert not all_tests_passed(counts)  # a skip for want of CUDA means the GPU path went untested

    counts = _junit(tmp_path, """
        def test_ok(): pass
        def test_bad(): assert 1 == 2, "off by one"
    """)
    assert counts["failed"] == 1 and "test_bad" in counts["failures"][0] and not all_tests_passed(counts)


def test_reads_a_real_trainer_run(reference_run):
    """The stage-3 reader against what the trainer writes (here a CPU run of the debug model)."""
    details = gpu_check._run_summary(reference_run("single"))
    assert math.isfinite(details["first_loss"]) and details["last_loss"] < details["first_loss"]
    assert details["checkpoint"] and details["tokens_per_sec"] > 0 and details["mfu"] > 0
    assert math.isnan(details["peak_allocated_gib"])  # no CUDA allocator on CPU
    assert gpu_check.train_run_ok(details)
    assert not gpu_check.train_run_ok({**details, "last_loss": float("nan")})


def test_summary_files(tmp_path):
    stages = [
        StageResult("tests", True, 61.0, {"passed": 40, "failed": 0, "errors": 0, "skipped": 1, "failures": [],
                                          "skip_reasons": ["t::test_flash: needs flash-attn"]}),  # fmt: skip
        StageResult("train", False, 120.0, {
            "fsdp1_full": {"first_loss": 9.1, "last_loss": 6.2, "val_losses": {"30": 6.3}, "tokens_per_sec": 81234.0,
                           "mfu": 0.123, "peak_allocated_gib": 1.5, "wall_time_s": 20.0, "checkpoint": True},
            "autocast_full_compile": {"exit": 1},
        }, error="autocast_full_compile (exit 1):\nTraceback ..."),  # fmt: skip
    ]
    json_path, md_path = write_summary(environment=ENVIRONMENT, stages=stages, out=tmp_path)
    saved = json.loads(json_path.read_text())
    assert saved["ok"] is False and saved["environment"]["commit"] == "abc1234"
    assert [s["name"] for s in saved["stages"]] == ["tests", "train"]
    md = md_path.read_text()
    assert md.startswith("# gpu-check: FAILED")
    for text in ("NVIDIA H100 80GB HBM3 (sm90, 79.1 GiB), torch 2.11.0+cu130, CUDA 13.0", "commit abc1234",
                 "40 passed, 0 failed", "| fsdp1_full | 9.100 -> 6.200 | 6.300 | 81,234 | 12.3% | 1.50 | 20 |",
                 "| autocast_full_compile | exit 1 |", "Traceback"):  # fmt: skip
        assert text in md, text
    assert summary_markdown(environment=ENVIRONMENT, stages=stages[:1]).startswith("# gpu-check: PASSED")


def test_missing_wheels_folder_is_named(tmp_path):
    fresh = tmp_path / "fresh"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(fresh)], check=True)
    with pytest.raises(RuntimeError, match="cannot import hydra, omegaconf, wandb, pytest_timeout .*make gpu-wheels"):
        gpu_check.prepare_interpreter(python=str(fresh / "bin" / "python"), wheels=tmp_path / "none", workdir=tmp_path)


def test_wheel_folder_installs_offline_into_a_fresh_venv(tmp_path):
    """make gpu-wheels' folder (here for this machine's Python) is complete: a virtualenv with nothing but pip
    gets hydra, omegaconf and wandb from it with --no-index, and they import."""
    wheels = tmp_path / "wheels"
    size = gpu_wheels.download(wheels, python_version=f"{sys.version_info.major}.{sys.version_info.minor}")
    assert size <= gpu_wheels.MAX_BYTES
    assert (wheels / gpu_wheels.REQUIREMENTS).read_text().splitlines() == gpu_wheels.pinned(gpu_wheels.PACKAGES)
    assert not any("torch" in p.name or p.name.startswith("nvidia") for p in wheels.iterdir())
    fresh = tmp_path / "fresh"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(fresh)], check=True)
    interp = gpu_check.prepare_interpreter(python=str(fresh / "bin" / "python"), wheels=wheels, workdir=tmp_path)
    assert interp.python != str(fresh / "bin" / "python")  # a virtualenv of its own, over the fresh one
    out = subprocess.run([interp.python, "-c", "import hydra, omegaconf, wandb; print(hydra.__version__, "
                          "omegaconf.__version__, wandb.__version__)"], capture_output=True, text=True, check=True)  # fmt: skip
    assert out.stdout.split() == [p.split("==")[1] for p in gpu_wheels.pinned(("hydra-core", "omegaconf", "wandb"))]
