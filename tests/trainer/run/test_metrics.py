"""What a user reads back: metrics.jsonl and the offline wandb run across a restart, the loss-curve PNG,
and when wandb samples system metrics."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from conf.schema import to_config
from launch.runs import main as runs_main
from launch.train import train
from tests.conftest import compose_config
from tests.wandb_file import read_run
from trainer.run import metrics as metrics_mod
from trainer.run.config import LoggingConfig
from trainer.run.metrics import MetricLogger, system_metrics_enabled
from trainer.run.records import plot_loss, series


def _cfg(overrides, *extra):
    return to_config(compose_config([*overrides, "trainer.eval_every=0", "logging.log_every=1", *extra]))


def test_resumed_run_logs_no_step_twice(tiny_overrides, tmp_path):
    """A run dies after step 5 with its newest checkpoint at step 3; the restart trains 4 and 5 again but
    logs them only once: metrics.jsonl and the wandb run (the same id) each hold steps 1..8 exactly once."""
    run = tmp_path / "run"
    common = ("checkpoint.every_steps=3", "checkpoint.save_final=false", "optim.warmup_steps=1",
              "optim.decay_steps=8")  # fmt: skip
    train(_cfg(tiny_overrides, *common, "trainer.max_steps=5"), run_dir=run)  # "dies" after step 5
    resumed = train(_cfg(tiny_overrides, *common, "trainer.max_steps=8"), run_dir=run)
    assert resumed.first_step == 4  # from the checkpoint of step 3

    assert series(run, "train/loss").steps == list(range(1, 9))
    first, second = (read_run(p) for p in sorted((run / "wandb").glob("offline-run-*")))
    assert first.run_id == second.run_id  # one wandb run, continued
    assert [s for s, _ in first.series("train/loss")] == [1, 2, 3, 4, 5]
    assert [s for s, _ in second.series("train/loss")] == [6, 7, 8]
    # The restart's recomputed steps 4 and 5 are those the dead run logged (same arithmetic on CPU).
    assert resumed.losses[:2] == [v for _, v in first.series("train/loss")][3:]


def test_fresh_run_in_a_used_directory_keeps_the_old_metrics(tiny_overrides, tmp_path):
    run = tmp_path / "run"
    cfg = _cfg(tiny_overrides, "trainer.max_steps=2", "optim.warmup_steps=1", "logging.wandb_mode=disabled",
               "checkpoint.resume=null")  # fmt: skip
    train(cfg, run_dir=run)
    before = (run / "metrics.jsonl").read_text()
    train(cfg, run_dir=run)
    assert (run / "metrics.jsonl.1").read_text() == before
    assert series(run, "train/loss").steps == [1, 2]


def test_plot_draws_train_and_val_loss_against_tokens(tiny_overrides, tmp_path):
    runs = []
    for name, batch in (("b4", 4), ("b2", 2)):
        cfg = _cfg(tiny_overrides, "trainer.max_steps=6", "optim.warmup_steps=1", "logging.wandb_mode=disabled",
                   f"trainer.micro_batch_size={batch}", "trainer.eval_every=3", "logging.log_every=2")  # fmt: skip
        train(cfg, run_dir=tmp_path / name)
        runs.append(tmp_path / name)
    out = tmp_path / "plots" / "loss.png"
    fig = plot_loss(runs, out=out)

    import matplotlib.image

    image = matplotlib.image.imread(out)  # what the user opens
    assert image.shape[:2] == (600, 960) and np.ptp(image[..., :3]) > 0.5  # 8 x 5 in at 120 dpi, not blank
    (ax,) = fig.axes
    lines = {line.get_label(): line for line in ax.get_lines()}
    assert set(lines) == {"b4 train", "b4 val", "b2 train", "b2 val"}
    for run in runs:
        train_loss, val_loss = series(run, "train/loss"), series(run, "val/loss")
        assert list(lines[f"{run.name} train"].get_xdata()) == train_loss.tokens
        assert list(lines[f"{run.name} train"].get_ydata()) == train_loss.values
        assert list(lines[f"{run.name} val"].get_xdata()) == val_loss.tokens and len(val_loss.values) == 2
    assert lines["b2 train"].get_xdata()[-1] * 2 == lines["b4 train"].get_xdata()[-1]  # half the tokens
    assert ax.get_xlabel() == "training tokens"

    assert runs_main(["plot", *map(str, runs), "--out", str(tmp_path / "cli.png"), "--x", "step"]) == 0
    assert (tmp_path / "cli.png").stat().st_size > 0


def test_plot_of_a_directory_without_metrics_names_it(tmp_path, capsys):
    assert runs_main(["plot", str(tmp_path), "--out", str(tmp_path / "x.png")]) == 2
    assert f"{tmp_path} has no metrics.jsonl" in capsys.readouterr().err


def test_system_metrics_default_on_cuda_only(monkeypatch, tmp_path):
    assert system_metrics_enabled(None, device_type="cuda") and not system_metrics_enabled(None, device_type="cpu")
    assert system_metrics_enabled(True, device_type="cpu") and not system_metrics_enabled(False, device_type="cuda")
    seen = []

    class _Run:
        id = "x"

        def define_metric(self, *args, **kwargs):
            pass

    import wandb

    monkeypatch.setattr(wandb, "init", lambda **kwargs: seen.append(kwargs["settings"]) or _Run())
    for enabled in (True, False):
        MetricLogger(LoggingConfig(), run_dir=tmp_path / str(enabled), run_config={}, system_metrics=enabled)
    assert [s.x_disable_stats for s in seen] == [False, True]


def test_logged_steps_survive_a_line_cut_short(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text(json.dumps({"step": 4, "train/loss": 1.0}) + "\n" + json.dumps({"step": 5, "val/loss": 2.0})
                    + "\n" + '{"step": 6, "train/lo')  # fmt: skip
    assert metrics_mod.logged_steps(path) == {"train": 4, "val": 5}
    assert metrics_mod.logged_steps(Path(tmp_path / "none.jsonl")) == {}


def test_a_sink_is_one_class_in_the_registry(tmp_path, monkeypatch):
    """A new backend: a class with write(record) and close(), registered in SINKS, named in logging.sinks."""
    received = []

    class ListSink:
        def __init__(self, ctx):
            self.ctx = ctx

        def write(self, record):
            received.append(record)

        def close(self):
            received.append("closed")

    monkeypatch.setitem(metrics_mod.SINKS, "list", ListSink)
    logger = MetricLogger(LoggingConfig(sinks=["list"]), run_dir=tmp_path, run_config={})
    logger.log({"loss": 2.5}, step=3, tokens=96, namespace="train")
    logger.close()
    assert received == [{"step": 3, "tokens": 96, "train/loss": 2.5}, "closed"]
    assert not (tmp_path / "metrics.jsonl").exists()  # only the sinks named are written
    with pytest.raises(ValueError, match=r"logging.sinks: unknown \['tensorbord'\]"):
        MetricLogger(LoggingConfig(sinks=["tensorbord"]), run_dir=tmp_path, run_config={})
