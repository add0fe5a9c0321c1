"""Read run directories (``summary.json``, ``metrics.jsonl``), and draw their loss curves.

``python -m launch.runs plot RUN_DIR ...`` (``llama-runs plot``) is the command line.

The plot shows training and validation loss against training tokens (the LLaMA paper's Figure 1 plots
7B-65B this way), one colour per run, training as a line and validation as dots, read from each run's
``metrics.jsonl``. Runs of different batch sizes compare fairly against tokens, not steps.

This module needs only the standard library (matplotlib is imported when a plot is drawn), so tools that
run where the training stack is not installed (``launch.gpu_check``) can read run directories too.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

METRICS_FILE = "metrics.jsonl"  # trainer.run.metrics writes it
SUMMARY_FILE = "summary.json"  # TrainResult.write writes it


@dataclass
class TrainResult:
    """What a finished run reports; rank 0 writes it to ``<run_dir>/summary.json`` (``write``/``read``)."""

    losses: list[float] = field(default_factory=list)
    """Training loss of every step this process ran (the global batch's mean), from ``first_step`` on."""
    first_step: int = 1
    """1, or the step after the checkpoint this run resumed from."""
    val_losses: dict[int, float] = field(default_factory=dict)
    """Validation loss by step."""
    task_scores: dict[int, dict[str, float]] = field(default_factory=dict)
    """``eval.tasks`` metrics by step (``"<task>/<metric>"``), where ``eval.every_steps`` is set."""
    tokens: int = 0
    """Training tokens consumed, all ranks together."""
    tokens_per_sec: float = 0.0
    """Global throughput over the whole run, evaluation excluded."""
    wall_time_s: float = 0.0
    world_size: int = 1
    checkpoint_stall_s: list[float] = field(default_factory=list)
    """Seconds each checkpoint save held training up."""
    stopped_by_signal: bool = False
    spikes: list[dict] = field(default_factory=list)
    """Every loss spike the guard saw: step, loss, grad_norm, reasons, action, the global ``samples`` of its
    batch and, after a rollback, the ``skipped`` samples."""
    goodput: dict = field(default_factory=dict)
    """Where the run directory's time went, restarts included (``trainer.run.goodput.Goodput.as_dict``)."""
    stragglers: list[dict] = field(default_factory=list)
    """Every time the straggler monitor found a rank slower than ``straggler.warn_ratio`` x the median: step,
    rank, host, ratio."""

    def write(self, run_dir: Path) -> Path:
        path = Path(run_dir) / SUMMARY_FILE
        path.write_text(json.dumps(dataclasses.asdict(self), indent=1))
        return path

    @classmethod
    def read(cls, run_dir: Path) -> TrainResult:
        """The summary of a finished run (JSON turns the val_losses' step keys into strings: turned back)."""
        path = Path(run_dir) / SUMMARY_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{run_dir} has no {SUMMARY_FILE}: the run did not finish (or is not a run directory)")
        fields = json.loads(path.read_text())
        for key in ("val_losses", "task_scores"):
            fields[key] = {int(k): v for k, v in fields.get(key, {}).items()}
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in fields.items() if k in known})


def read_records(run_dir: Path) -> list[dict]:
    """Every record of ``<run_dir>/metrics.jsonl`` in order (a line cut short by a crash is skipped)."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir} has no {METRICS_FILE}: is it a training run directory?")
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


@dataclass(frozen=True)
class Series:
    """One metric over a run: parallel lists of step, tokens and value."""

    steps: list[int]
    tokens: list[int]
    values: list[float]


def series(run_dir: Path, key: str) -> Series:
    """The ``key`` series (``train/loss``, ``val/loss``, ...) of a run, in logging order."""
    picked = [r for r in read_records(run_dir) if key in r]
    return Series(steps=[r["step"] for r in picked], tokens=[r.get("tokens", 0) for r in picked],
                  values=[r[key] for r in picked])  # fmt: skip


def namespace_values(run_dir: Path, namespace: str = "train") -> dict[str, list[float]]:
    """Every metric of a namespace by its short name: ``{"loss": [...], "step_time_s": [...], ...}``."""
    values: dict[str, list[float]] = {}
    for record in read_records(run_dir):
        for key, value in record.items():
            if key.startswith(namespace + "/"):
                values.setdefault(key.split("/", 1)[1], []).append(value)
    return values


def plot_loss(run_dirs: Sequence[Path], *, out: Path, x: str = "tokens", labels: Optional[Sequence[str]] = None):
    """Train (lines) and validation (dots) loss of each run against ``x`` into the PNG ``out``; returns the
    matplotlib Figure (closed: its data stay readable)."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    if x not in ("tokens", "step"):
        raise ValueError(f"x must be 'tokens' or 'step', got {x!r}")
    labels = list(labels) if labels is not None else [Path(d).name or str(d) for d in run_dirs]
    fig, ax = plt.subplots(figsize=(8, 5), dpi=120)
    for index, (run_dir, label) in enumerate(zip(run_dirs, labels, strict=True)):
        colour = f"C{index % 10}"
        train, val = series(run_dir, "train/loss"), series(run_dir, "val/loss")
        if not train.values:
            raise ValueError(f"{run_dir}: metrics.jsonl has no train/loss records")
        ax.plot(getattr(train, "tokens" if x == "tokens" else "steps"), train.values, color=colour,
                label=f"{label} train")  # fmt: skip
        if val.values:
            ax.plot(getattr(val, "tokens" if x == "tokens" else "steps"), val.values, "o", color=colour,
                    label=f"{label} val")  # fmt: skip
    ax.set_xlabel("training tokens" if x == "tokens" else "step")
    ax.set_ylabel("loss (nats per token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return fig
