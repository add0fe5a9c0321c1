"""The model presets as the planner tests use them (the YAML files of conf/model/)."""

from __future__ import annotations

from pathlib import Path

import yaml

from model.config import ModelArgs

CONF = Path(__file__).resolve().parents[2] / "conf" / "model"
PRESETS = {path.stem: ModelArgs(**(yaml.safe_load(path.read_text()) or {})) for path in sorted(CONF.glob("*.yaml"))}
