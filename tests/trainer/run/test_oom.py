"""Out of memory (trainer/run/oom.py, launch/train.py): an injected ``torch.OutOfMemoryError`` at step 3
(test-only ``faults.oom_step``) leaves the rank's report and the planner's prediction for the layout, and the
command ends with a message pointing to both. On CPU there is no allocator history to snapshot; the report
says so (the CUDA path: make gpu-check)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from conf.schema import to_config
from launch.train import train
from tests.conftest import compose_config
from trainer.run.oom import TrainingOutOfMemory

REPO = Path(__file__).resolve().parents[3]


def test_the_report_and_the_prediction_are_written(tiny_overrides, tmp_path):
    cfg = to_config(compose_config([*tiny_overrides, "trainer.max_steps=5", "trainer.eval_every=0",
                                    "logging.wandb_mode=disabled", "faults.oom_step=3"]))  # fmt: skip
    with pytest.raises(TrainingOutOfMemory, match=r"out of memory at step 3 \(phase data\).*prediction.txt") as caught:
        train(cfg, run_dir=tmp_path / "run")
    report = (tmp_path / "run" / "oom" / "rank0.txt").read_text()
    assert "out of memory at step 3, phase data" in report and "Tried to allocate 20.00 GiB" in report
    assert "no allocator snapshot on cpu" in report and caught.value.snapshot is None
    prediction = (tmp_path / "run" / "oom" / "prediction.txt").read_text()
    assert "no CUDA device here: priced on the planner's default cluster" in prediction
    assert "memory per GPU" in prediction and "GiB" in prediction and ("fits" in prediction or "NOT FIT" in prediction)


def test_the_command_points_to_both(tiny_overrides, tmp_path):
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "launch.train", *tiny_overrides, "trainer.max_steps=5", "trainer.eval_every=0",
           "logging.wandb_mode=disabled", "faults.oom_step=2", f"hydra.run.dir={run_dir}"]  # fmt: skip
    proc = subprocess.run(cmd, cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "launch.train: out of memory at step 2" in proc.stderr
    assert str(run_dir / "oom" / "rank0.txt") in proc.stderr and str(run_dir / "oom" / "prediction.txt") in proc.stderr
    assert "python -m launch.plan --search" in proc.stderr
