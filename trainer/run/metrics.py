"""Metrics: one ``log`` call writes the console line, a JSONL record and the wandb point.

Every metric is one series under its namespace (``train/loss``, ``train/lr``, ``val/loss``, ...), with the
optimizer step as x-axis and the training tokens seen so far (``tokens``) logged beside it as the
alternative x-axis a dashboard can switch to. The console line keeps its ``train[step/max]`` prefix.

A run resumed from a checkpoint continues the same JSONL file and the same wandb run (its id is in the
checkpoint). The steps between that checkpoint and the interruption were logged by the run that died and
are trained again; they are not logged a second time, so no series has a step twice.

Only the process that owns the logger writes (rank 0 once training is distributed); the others get
``enabled=False`` and every call is a no-op.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from trainer.run.config import LoggingConfig, WandbMode
from trainer.run.records import METRICS_FILE, read_records

logger = logging.getLogger(__name__)

TOKENS = "tokens"
"""The alternative x-axis: training tokens consumed (all ranks) when the record was logged."""


def logged_steps(path: Path) -> dict[str, int]:
    """The last step logged per namespace (``train``, ``val``) in a metrics.jsonl; {} if there is none."""
    last: dict[str, int] = {}
    if not path.is_file():
        return last
    for record in read_records(path.parent):
        for key in record:
            if "/" in key:
                namespace = key.split("/", 1)[0]
                last[namespace] = max(last.get(namespace, 0), int(record["step"]))
    return last


def _set_aside(path: Path) -> Optional[Path]:
    """Rename an existing file to ``<name>.<n>`` (first free n) so that a fresh run does not append to it."""
    if not path.exists():
        return None
    n = 1
    while path.with_name(f"{path.name}.{n}").exists():
        n += 1
    target = path.with_name(f"{path.name}.{n}")
    path.rename(target)
    return target


def system_metrics_enabled(setting: Optional[bool], *, device_type: str) -> bool:
    """``logging.system_metrics``: None means on with CUDA (GPU utilisation, memory, power), off on CPU."""
    return device_type == "cuda" if setting is None else setting


@dataclass(frozen=True)
class SinkContext:
    """What a sink may need to start: the run's directory and config, where it resumes, the device."""

    cfg: LoggingConfig
    run_dir: Path
    run_config: dict[str, Any]
    resumed: bool
    wandb_id: Optional[str]
    system_metrics: bool


class JsonlSink:
    """``<run_dir>/metrics.jsonl``: one JSON object per record, the file ``trainer.run.records`` and the tools read."""

    def __init__(self, ctx: SinkContext):
        self.path = ctx.run_dir / METRICS_FILE
        if not ctx.resumed and (old := _set_aside(self.path)) is not None:
            logger.warning("%s held an earlier run's metrics; moved to %s", self.path, old.name)
        self._file = self.path.open("a", buffering=1)  # line-buffered: a crash loses no record

    def write(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps(record) + "\n")

    def close(self) -> None:
        self._file.close()


class WandbSink:
    """A wandb run (offline by default), continued on resume; its id goes into checkpoints."""

    def __init__(self, ctx: SinkContext):
        self.run = _init_wandb(ctx.cfg, run_dir=ctx.run_dir, run_config=ctx.run_config, run_id=ctx.wandb_id,
                               system_metrics=ctx.system_metrics)  # fmt: skip

    def write(self, record: dict[str, Any]) -> None:
        self.run.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])

    def close(self) -> None:
        self.run.finish()


SINKS: dict[str, Callable[[SinkContext], Any]] = {"jsonl": JsonlSink, "wandb": WandbSink}
"""The backends ``logging.sinks`` names; a new one is a class with ``write(record)`` and ``close()``, here."""


class MetricLogger:
    def __init__(self, cfg: LoggingConfig, *, run_dir: Path, run_config: dict[str, Any], enabled: bool = True,
                 wandb_id: Optional[str] = None, resumed: bool = False, system_metrics: bool = False):  # fmt: skip
        """
        Args:
            wandb_id: the wandb run to continue (from the checkpoint resumed), else a new run.
            resumed: the run continues from a checkpoint; steps already in metrics.jsonl are not logged again.
                Otherwise an existing metrics.jsonl (an earlier run in this directory) is renamed, not appended to.
            system_metrics: let wandb sample GPU utilisation, memory and power (``logging.system_metrics``).
        """
        self.enabled = enabled
        self._sinks: dict[str, Any] = {}
        self._already_logged: dict[str, int] = {}
        self._redone_through = 0
        if not enabled:
            return
        unknown = [name for name in cfg.sinks if name not in SINKS]
        if unknown:
            raise ValueError(f"logging.sinks: unknown {unknown}; choose from {sorted(SINKS)}")
        run_dir.mkdir(parents=True, exist_ok=True)
        if resumed:  # the JSONL file is the record of what was logged before the interruption
            self._already_logged = logged_steps(run_dir / METRICS_FILE)
        ctx = SinkContext(cfg=cfg, run_dir=run_dir, run_config=run_config, resumed=resumed, wandb_id=wandb_id,
                          system_metrics=system_metrics)  # fmt: skip
        for name in cfg.sinks:
            if name == "wandb" and cfg.wandb_mode == WandbMode.disabled:
                continue
            self._sinks[name] = SINKS[name](ctx)

    def log(self, metrics: dict[str, float], *, step: int, tokens: int, namespace: str,
            console: Optional[str] = None) -> None:  # fmt: skip
        """Log ``metrics`` as ``<namespace>/<name>`` at ``step``; ``console`` prefixes the log line."""
        if not self.enabled:
            return
        if step <= max(self._already_logged.get(namespace, 0), self._redone_through):
            return  # logged before: by the run this one resumed from, or before a rollback redid the step
        record = {"step": step, TOKENS: tokens, **{f"{namespace}/{k}": v for k, v in metrics.items()}}
        for sink in self._sinks.values():
            sink.write(record)
        logger.info("%s step %d | %s", console or namespace, step, _format(metrics))

    def redo_through(self, step: int) -> None:
        """Steps up to ``step`` have been logged and are about to be trained again (a loss-spike rollback):
        log none of them a second time, in any namespace."""
        self._redone_through = max(self._redone_through, step)

    def close(self) -> None:
        sinks, self._sinks = self._sinks, {}
        for sink in sinks.values():
            sink.close()

    @property
    def wandb_id(self) -> Optional[str]:
        """The wandb run's id, saved in checkpoints so a resumed run continues the same wandb run."""
        sink = self._sinks.get("wandb")
        return None if sink is None else sink.run.id


def _init_wandb(cfg: LoggingConfig, *, run_dir: Path, run_config: dict[str, Any], run_id: Optional[str],
                system_metrics: bool):  # fmt: skip
    import wandb

    # console="off": wandb would otherwise wrap stdout/stderr. x_disable_stats: without system metrics no
    # sampler thread competes with training for the CPU.
    settings = wandb.Settings(console="off", silent=True, x_disable_stats=not system_metrics)
    try:
        run = wandb.init(
            project=cfg.project,
            entity=cfg.entity,
            group=cfg.group,
            name=cfg.run_name or run_dir.name,
            dir=str(run_dir),
            mode=cfg.wandb_mode.value,
            config=run_config,
            settings=settings,
            id=run_id,
            resume="allow" if run_id else None,
        )
    except Exception as err:  # wandb raises its own UsageError/CommError types
        if cfg.wandb_mode == WandbMode.online:
            raise ValueError(
                f"wandb could not start an online run ({err}). Log in with `wandb login` (or set "
                "WANDB_API_KEY), or use logging.wandb_mode=offline and `wandb sync` the run later."
            ) from err
        raise
    # Step is the default x-axis; declaring tokens lets a chart switch to it. Summaries: the best loss.
    run.define_metric(TOKENS, summary="max")
    for name in ("train/loss", "val/loss", "val/perplexity"):
        run.define_metric(name, summary="min")
    return run


def _format(metrics: dict[str, float]) -> str:
    parts = []
    for key, value in metrics.items():
        if isinstance(value, float) and value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e5):
            parts.append(f"{key} {value:.3e}")
        elif isinstance(value, float) and not math.isfinite(value):
            parts.append(f"{key} {value}")
        elif isinstance(value, float):
            parts.append(f"{key} {value:.4f}")
        else:
            parts.append(f"{key} {value}")
    return " | ".join(parts)
