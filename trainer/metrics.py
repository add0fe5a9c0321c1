"""Metrics: one ``log`` call writes the console line, a JSONL record and the wandb point.

Only the process that owns the logger writes (rank 0 once training is distributed); the others get
``enabled=False`` and every call is a no-op.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any, Optional

from trainer.config import LoggingConfig, WandbMode

logger = logging.getLogger(__name__)


class MetricLogger:
    def __init__(self, cfg: LoggingConfig, *, run_dir: Path, run_config: dict[str, Any], enabled: bool = True,
                 wandb_id: Optional[str] = None):  # fmt: skip
        self.enabled = enabled
        self._wandb_run = None
        self._jsonl = None
        if not enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        self.jsonl_path = run_dir / "metrics.jsonl"
        self._jsonl = self.jsonl_path.open("a", buffering=1)  # line-buffered: a crash loses no record
        if cfg.wandb_mode != WandbMode.disabled:
            self._wandb_run = _init_wandb(cfg, run_dir=run_dir, run_config=run_config, run_id=wandb_id)

    def log(self, metrics: dict[str, float], *, step: int, prefix: str = "train") -> None:
        if not self.enabled:
            return
        record = {"step": step, **{f"{prefix}/{k}": v for k, v in metrics.items()}}
        self._jsonl.write(json.dumps(record) + "\n")
        if self._wandb_run is not None:
            self._wandb_run.log({k: v for k, v in record.items() if k != "step"}, step=step)
        logger.info("%s step %d | %s", prefix, step, _format(metrics))

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        if self._wandb_run is not None:
            self._wandb_run.finish()
            self._wandb_run = None

    @property
    def wandb_id(self) -> Optional[str]:
        """The wandb run's id, saved in checkpoints so a resumed run continues the same wandb run."""
        return None if self._wandb_run is None else self._wandb_run.id


def _init_wandb(cfg: LoggingConfig, *, run_dir: Path, run_config: dict[str, Any], run_id: Optional[str]):
    import wandb

    # console="off": wandb would otherwise wrap stdout/stderr; x_disable_stats: no system-metrics
    # sampler thread competing with training for the CPU.
    settings = wandb.Settings(console="off", silent=True, x_disable_stats=True)
    try:
        return wandb.init(
            project=cfg.project,
            entity=cfg.entity,
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
