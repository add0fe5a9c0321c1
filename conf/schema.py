"""The root config: one typed sub-config per component. Hydra's YAML groups compose on top of it.

Each component receives only its own sub-config (``cfg.model`` for the model, ``cfg.data`` for the data
pipeline, ...); only the entry point sees the root.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import ConfigKeyError

from data.config import DataConfig
from data.preprocess.config import PreprocessConfig
from evaluation.config import EvalConfig, EvaluateConfig
from model.config import ModelArgs
from planner.config import ClusterConfig, PlanSettings
from trainer.checkpoint.config import CheckpointConfig
from trainer.parallel.config import ParallelConfig
from trainer.run.config import (
    GoodputConfig, LoggingConfig, OptimConfig, ProfileConfig, SpikeConfig, StragglerConfig, TrainerConfig,
    WatchdogConfig,
)  # fmt: skip
from trainer.run.faults import FaultConfig


@dataclass
class Config:
    model: ModelArgs = field(default_factory=ModelArgs)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    profile: ProfileConfig = field(default_factory=ProfileConfig)
    """No config group: ``profile.step=5 profile.steps=2`` on the command line turns it on."""
    spike: SpikeConfig = field(default_factory=SpikeConfig)
    """No config group: the loss-spike guard (``spike.action=rollback``, thresholds; docs/operations.md)."""
    straggler: StragglerConfig = field(default_factory=StragglerConfig)
    """No config group: the straggler monitor (``straggler.every_steps``, ``straggler.warn_ratio``)."""
    watchdog: WatchdogConfig = field(default_factory=WatchdogConfig)
    """No config group: the hang watchdog (``watchdog.timeout_s``, ...; docs/operations.md)."""
    goodput: GoodputConfig = field(default_factory=GoodputConfig)
    """No config group: where the run's time goes (``<run_dir>/events.jsonl``, ``launch.runs goodput``)."""
    faults: FaultConfig = field(default_factory=FaultConfig)
    """Test-only deterministic fault injection (trainer/run/faults.py); empty in every real run."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """Task evaluation during training: off unless ``eval.every_steps`` (``eval.tasks``, the demo tasks by
    default); ``python -m launch.evaluate`` evaluates checkpoints afterwards."""


@dataclass
class PlanConfig(Config):
    """The planner's root (``conf/plan.yaml``, ``python -m launch.plan``): the training config it plans,
    plus the cluster and the questions asked."""

    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    plan: PlanSettings = field(default_factory=PlanSettings)


def register_schema() -> None:
    """Make the schemas available to the defaults lists as the ``schema`` group: ``train`` (``config.yaml``)
    and ``plan`` (``plan.yaml``, which includes ``config.yaml`` and overrides its schema)."""
    store = ConfigStore.instance()
    store.store(group="schema", name="train", node=Config, package="_global_")
    store.store(group="schema", name="plan", node=PlanConfig, package="_global_")
    store.store(group="schema", name="evaluate", node=EvaluateConfig, package="_global_")
    store.store(group="schema", name="preprocess", node=PreprocessConfig, package="_global_")


def to_config(cfg: DictConfig) -> Config:  # a PlanConfig / EvaluateConfig for the planner's / evaluation's
    """Turn a composed DictConfig into dataclasses, running each one's ``__post_init__`` validation.

    Hydra's ``+key=value`` adds a key even where the schema has none, and ``to_object`` would then drop
    it without a word; such keys are refused here instead, naming the key.
    """
    cfg = cfg.copy()
    with open_dict(cfg):
        cfg.pop("hydra", None)  # present only when composed with return_hydra_config
    _reject_unknown_keys(cfg, prefix="")
    config = OmegaConf.to_object(cfg)
    if isinstance(config, Config):
        config.data.check()  # what needs the whole data config (at least one source), before any process starts
    return config


def _reject_unknown_keys(node: DictConfig, *, prefix: str) -> None:
    """Every key of a dataclass-typed node must be one of the dataclass's fields (dict nodes, such as
    ``data.sources``, take any key)."""
    node_type = OmegaConf.get_type(node)
    known = {f.name for f in dataclasses.fields(node_type)} if dataclasses.is_dataclass(node_type) else None
    for key in node:
        path = f"{prefix}{key}"
        if known is not None and key not in known:
            raise ConfigKeyError(f"Key '{key}' not in '{node_type.__name__}' (full_key: {path})")
        child = node._get_node(key)
        if isinstance(child, DictConfig) and not child._is_none():
            _reject_unknown_keys(child, prefix=f"{path}.")
