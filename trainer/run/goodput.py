"""Where a run directory's time went, across restarts, and how often to checkpoint.

Rank 0 appends to ``<run_dir>/events.jsonl`` (the goodput component, trainer/run/components/goodput.py): an
``attempt`` record when a process starts its loop (when the process started, when its loop started, the
step it resumed after) and ``progress`` records every ``goodput.record_every_s`` seconds and at the end (the
step reached, and the loop's seconds so far by kind: train, checkpoint, eval, rollback, other). A crash loses
at most the time since the last record, which then counts as part of the restart.

``goodput(run_dir)`` reads them into the time of the whole run directory, first start to last record:

- productive: training steps whose work was kept;
- startup: from the first process's start to its first step (data, model, compile);
- restarts: from a failed attempt's last record to the next attempt's first step (detection, relaunch,
  start-up, loading the checkpoint);
- recomputed: steps a failed attempt trained beyond the checkpoint the next attempt resumed from;
- checkpoint: save stalls; eval: validation and task evaluation; rollback: loss-spike rollbacks (the load
  and the undone steps); other: everything else (metrics, the guards, unaccounted gaps).

Goodput is productive / total. This module needs only the standard library (matplotlib for the chart).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

EVENTS_FILE = "events.jsonl"
CATEGORIES = ("productive", "startup", "restarts", "recomputed", "checkpoint", "eval", "rollback", "other")

LLAMA3_FAILURES_PER_GPU_HOUR = 419 / (54 * 24 * 16384)
"""Llama 3's report: 419 unexpected interruptions in 54 days on 16,384 H100s, ~1.97e-5 per GPU-hour."""


@dataclass
class Goodput:
    seconds: dict[str, float] = field(default_factory=dict)
    """Seconds by category (``CATEGORIES``)."""
    total_s: float = 0.0
    attempts: int = 0

    @property
    def goodput(self) -> float:
        return self.seconds.get("productive", 0.0) / self.total_s if self.total_s > 0 else 0.0

    def as_dict(self) -> dict:
        return {"goodput": self.goodput, "total_s": self.total_s, "attempts": self.attempts, "seconds": self.seconds}


def read_events(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / EVENTS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir} has no {EVENTS_FILE}: not a training run directory, or one written "
                                "before goodput was recorded")  # fmt: skip
    events = []
    for line in path.read_text().splitlines():
        try:
            events.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut short by a crash
            continue
    return events


def _attempts(events: list[dict]) -> list[dict]:
    attempts: list[dict] = []
    for event in events:
        if event.get("event") == "attempt":
            attempts.append({**event, "records": []})
        elif event.get("event") == "progress" and attempts:
            attempts[-1]["records"].append(event)
    return attempts


def _train_at(attempt: dict, step: int) -> float:
    """The attempt's cumulative training seconds when it had finished ``step`` (linear between records)."""
    points = [(attempt["resumed_step"], 0.0)] + [(r["step"], r["seconds"]["train"]) for r in attempt["records"]]
    if step <= points[0][0]:
        return 0.0
    for (s0, t0), (s1, t1) in zip(points, points[1:]):
        if step <= s1:
            return t0 + (t1 - t0) * (step - s0) / max(s1 - s0, 1)
    return points[-1][1]


def goodput(run_dir: Path) -> Goodput:
    """The time of ``run_dir`` from its first process's start to its last record, by category."""
    attempts = _attempts(read_events(run_dir))
    if not attempts:
        raise ValueError(f"{run_dir}/{EVENTS_FILE} has no attempt record")
    seconds = dict.fromkeys(CATEGORIES, 0.0)
    end = attempts[0]["process_start"]
    for index, attempt in enumerate(attempts):
        startup = attempt["loop_start"] - attempt["process_start"]
        if index == 0:
            seconds["startup"] += startup
        else:  # from the failed attempt's last sign of life to this one's loop
            seconds["restarts"] += attempt["loop_start"] - end
        last = attempt["records"][-1] if attempt["records"] else None
        spent = last["seconds"] if last else {}
        train = spent.get("train", 0.0)
        if index + 1 < len(attempts):
            recomputed = max(0.0, train - _train_at(attempt, attempts[index + 1]["resumed_step"]))
            seconds["recomputed"] += recomputed
            train -= recomputed
        seconds["productive"] += train
        for key in ("checkpoint", "eval", "rollback", "other"):
            seconds[key] += spent.get(key, 0.0)
        end = last["time"] if last else attempt["loop_start"]
    total = end - attempts[0]["process_start"]
    seconds["other"] += max(0.0, total - sum(seconds.values()))  # gaps no record covers
    return Goodput(seconds=seconds, total_s=total, attempts=len(attempts))


def young_daly_interval_s(*, save_s: float, mtbf_s: float) -> float:
    """The checkpoint interval that minimises lost time to first order (Young 1974; Daly 2006):
    sqrt(2 x save time x mean time between failures)."""
    return math.sqrt(2.0 * save_s * mtbf_s)


def job_mtbf_s(*, gpus: int, failures_per_gpu_hour: float) -> float:
    """Mean time between failures of a job on ``gpus`` GPUs that fail independently."""
    return 3600.0 / (gpus * failures_per_gpu_hour)


def expected_goodput(*, save_s: float, interval_s: float, mtbf_s: float, restart_s: float) -> float:
    """First-order share of time kept: each interval pays one save, each failure (every ``mtbf_s``) half an
    interval of recomputed work and a restart."""
    return max(0.0, 1.0 - save_s / interval_s - (interval_s / 2.0 + restart_s) / mtbf_s)


def table(result: Goodput) -> str:
    """The categories with their time (hours, or seconds for a run under an hour) and share of the total."""
    unit, scale = ("hours", 3600.0) if result.total_s >= 3600 else ("seconds", 1.0)
    lines = [f"goodput {result.goodput:.1%} of {result.total_s / scale:.2f} {unit} over {result.attempts} attempt(s)",
             "", f"{'where the time went':<20} {unit:>10} {'share':>8}"]  # fmt: skip
    for key in CATEGORIES:
        value = result.seconds.get(key, 0.0)
        share = value / result.total_s if result.total_s else 0.0
        lines.append(f"{key:<20} {value / scale:>10.2f} {share:>8.1%}")
    return "\n".join(lines)


def plot(result: Goodput, *, out: Path, title: Optional[str] = None):
    """One horizontal bar per category (hours; seconds for a run under an hour) into the PNG ``out``; returns
    the (closed) Figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    unit, scale = ("hours", 3600.0) if result.total_s >= 3600 else ("seconds", 1.0)
    fig, ax = plt.subplots(figsize=(8, 4), dpi=120)
    values = [result.seconds.get(key, 0.0) / scale for key in CATEGORIES]
    bars = ax.barh(list(CATEGORIES), values, color=["C2"] + ["C3"] * (len(CATEGORIES) - 1))
    for bar, value in zip(bars, values):
        share = value * scale / result.total_s if result.total_s else 0.0
        ax.annotate(f"{share:.1%}", (bar.get_width(), bar.get_y() + bar.get_height() / 2), xytext=(3, 0),
                    textcoords="offset points", va="center", fontsize=8)  # fmt: skip
    ax.invert_yaxis()
    ax.set_xlabel(unit)
    ax.set_title(title or f"goodput {result.goodput:.1%} of {result.total_s / scale:.2f} {unit} "
                          f"({result.attempts} attempt{'s' if result.attempts != 1 else ''})")  # fmt: skip
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return fig
