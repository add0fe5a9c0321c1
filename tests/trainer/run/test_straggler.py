"""The straggler monitor (trainer/run/components/straggler.py) on 2 gloo processes: a rank whose device is
made 4x slower (test-only ``faults.slow_rank``: each of its probe matmuls runs 4 times) is named, with its
host, in the metrics, the warning and summary.json; a balanced run logs a ratio near 1."""

from __future__ import annotations

import json
import socket

from launch.harness import LAYOUTS, run_layout
from model.config import ModelArgs
from trainer.run.components.straggler import probe_shape
from trainer.run.records import TrainResult

MONITOR = ("straggler.every_steps=2",)


def straggler_records(run_dir) -> list[dict]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if "train/straggler_ratio" in r]


def test_probe_shape_follows_the_model_with_a_floor_and_a_cap():
    assert probe_shape(ModelArgs(), tokens=256) == (1024, 512, 512)  # the debug model: the floor
    seven_b = ModelArgs(dim=4096, n_heads=32, vocab_size=32000, multiple_of=256)
    assert probe_shape(seven_b, tokens=2 * 2048) == (4096, 4096, 11008)
    assert probe_shape(seven_b, tokens=8 * 2048)[0] == 4096


def test_a_slowed_rank_is_named_and_a_balanced_run_is_near_one(tmp_path):
    slow = run_layout(LAYOUTS["fsdp2"], workdir=tmp_path, steps=6, run_name="slow",
                      extra=(*MONITOR, "faults.slow_rank=1", "faults.slow_factor=4"))  # fmt: skip
    records = straggler_records(slow)
    assert [r["step"] for r in records] == [2, 4, 6]
    # Against the median of two ranks (their mean), a 4x slower one is at 2 x 4 / (1 + 4) = 1.6.
    assert all(r["train/straggler_rank"] == 1 and 1.4 < r["train/straggler_ratio"] < 1.8 for r in records), records
    summary = TrainResult.read(slow)
    assert [(s["step"], s["rank"], s["host"]) for s in summary.stragglers] == [(2, 1, socket.gethostname()),
                                                                              (4, 1, socket.gethostname()),
                                                                              (6, 1, socket.gethostname())]  # fmt: skip
    assert "straggler at step 2: rank 1 on" in (slow / "train_rank0.log").read_text()

    balanced = run_layout(LAYOUTS["fsdp2"], workdir=tmp_path, steps=6, run_name="balanced", extra=MONITOR)
    # Two single-threaded processes on two cores: the same matmul within noise, below the warning threshold.
    ratios = [r["train/straggler_ratio"] for r in straggler_records(balanced)]
    assert len(ratios) == 3 and all(1.0 <= r < 1.2 for r in ratios), ratios
    assert TrainResult.read(balanced).stragglers == []
