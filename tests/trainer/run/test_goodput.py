"""Where a run directory's time went (trainer/run/goodput.py): a hand-made record of two attempts, the
Young/Daly interval, and a real run interrupted and resumed, read back through the command and its PNG."""

from __future__ import annotations

import json
import math

import matplotlib.image
import pytest

from conf.schema import to_config
from launch.runs import main as runs_main
from launch.train import train
from tests.conftest import compose_config
from trainer.run.goodput import (
    EVENTS_FILE, LLAMA3_FAILURES_PER_GPU_HOUR, expected_goodput, goodput, job_mtbf_s, young_daly_interval_s,
)  # fmt: skip
from trainer.run.loop import Component, Control, StepOutcome


def write_events(run_dir, events):
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / EVENTS_FILE).write_text("".join(json.dumps(e) + "\n" for e in events) + '{"event": "progr')


def seconds(train, checkpoint=0.0, evaluation=0.0, rollback=0.0, other=0.0):
    return {"train": train, "checkpoint": checkpoint, "eval": evaluation, "rollback": rollback, "other": other}


def test_two_attempts_by_hand(tmp_path):
    """Attempt 1 starts at t=0, its loop at 100; by t=1100 it trained steps 1-100 in 900 s (9 s a step) and
    saved 50 s of checkpoints; it dies. Attempt 2 starts at 1300, resumes after step 80's checkpoint, loops
    from 1400 and ends at 1600 after 180 s of training and 10 s of evaluation."""
    write_events(tmp_path, [
        {"event": "attempt", "process_start": 0.0, "loop_start": 100.0, "resumed_step": 0},
        {"event": "progress", "time": 600.0, "step": 50, "seconds": seconds(450.0, checkpoint=25.0)},
        {"event": "progress", "time": 1100.0, "step": 100, "seconds": seconds(900.0, checkpoint=50.0)},
        {"event": "attempt", "process_start": 1300.0, "loop_start": 1400.0, "resumed_step": 80},
        {"event": "progress", "time": 1600.0, "step": 100, "seconds": seconds(180.0, evaluation=10.0)},
    ])  # fmt: skip
    found = goodput(tmp_path)  # the cut-off last line (a crash mid-write) is skipped
    assert found.attempts == 2 and found.total_s == 1600.0
    expected = {"productive": (900.0 - 180.0) + 180.0, "startup": 100.0, "restarts": 1400.0 - 1100.0,
                "recomputed": 900.0 - 720.0, "checkpoint": 50.0, "eval": 10.0, "rollback": 0.0}  # fmt: skip
    for key, value in expected.items():
        assert found.seconds[key] == pytest.approx(value), key
    assert found.seconds["other"] == pytest.approx(1600.0 - sum(expected.values()))  # the unrecorded gaps
    assert found.goodput == pytest.approx(900.0 / 1600.0)


def test_young_daly_for_the_llama_65b_cluster():
    """2,048 GPUs at Llama 3's rate fail every ~24.8 h; with a 60 s save the interval is ~55 min."""
    assert LLAMA3_FAILURES_PER_GPU_HOUR == pytest.approx(1.973e-5, rel=1e-3)
    mtbf = job_mtbf_s(gpus=2048, failures_per_gpu_hour=LLAMA3_FAILURES_PER_GPU_HOUR)
    assert mtbf / 3600 == pytest.approx(24.75, rel=1e-3)
    interval = young_daly_interval_s(save_s=60.0, mtbf_s=mtbf)
    assert interval == pytest.approx(math.sqrt(2 * 60.0 * mtbf)) and interval / 60 == pytest.approx(54.5, rel=1e-2)
    kept = expected_goodput(save_s=60.0, interval_s=interval, mtbf_s=mtbf, restart_s=600.0)
    assert kept == pytest.approx(1 - 60 / interval - (interval / 2 + 600) / mtbf)
    # the optimum: a shorter or longer interval keeps less
    for other in (interval / 2, interval * 2):
        assert expected_goodput(save_s=60.0, interval_s=other, mtbf_s=mtbf, restart_s=600.0) < kept


class CrashAt(Component):
    """Fails the run after the given step (a dying node, in-process)."""

    def __init__(self, step: int):
        self.step = step

    def step_end(self, outcome: StepOutcome, control: Control) -> None:
        if outcome.step == self.step:
            raise RuntimeError("injected crash")


def test_a_crashed_and_resumed_run_accounts_for_its_restart(tiny_overrides, tmp_path, capsys):
    overrides = [*tiny_overrides, "trainer.max_steps=8", "trainer.eval_every=4", "logging.wandb_mode=disabled",
                 "checkpoint.every_steps=4", "goodput.record_every_s=0.001"]  # fmt: skip
    run_dir = tmp_path / "run"
    with pytest.raises(RuntimeError, match="injected crash"):
        train(to_config(compose_config(overrides)), run_dir=run_dir, components=[lambda built: CrashAt(6)])
    result = train(to_config(compose_config(overrides)), run_dir=run_dir)  # resumes after step 4
    assert result.first_step == 5
    found = goodput(run_dir)
    assert found.attempts == 2 and found.seconds["restarts"] > 0 and found.seconds["recomputed"] > 0
    assert found.seconds["checkpoint"] > 0 and found.seconds["eval"] > 0
    assert 0 < found.goodput < 1 and sum(found.seconds.values()) == pytest.approx(found.total_s)
    assert result.goodput["attempts"] == 2
    assert json.loads((run_dir / "summary.json").read_text())["goodput"]["goodput"] == pytest.approx(found.goodput)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["goodput/goodput"] for r in records if "goodput/goodput" in r] == [pytest.approx(found.goodput)]

    assert runs_main(["goodput", str(run_dir)]) == 0
    printed = capsys.readouterr().out
    assert f"goodput {found.goodput:.1%}" in printed and "recomputed" in printed and "over 2 attempt(s)" in printed
    image = matplotlib.image.imread(run_dir / "goodput.png")
    assert image.shape[0] > 100 and image.shape[1] > 100
