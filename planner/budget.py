"""A whole training run priced from one step's estimate (the LLaMA paper's section 6): steps, days,
GPU-hours, energy and carbon, and what failures and checkpoints add to the wall-clock time."""

from __future__ import annotations

import math
from dataclasses import dataclass

from planner.config import ClusterConfig
from planner.estimate import Estimate
from trainer.run.goodput import expected_goodput, job_mtbf_s, young_daly_interval_s


@dataclass(frozen=True)
class Budget:
    """A training run of ``tokens`` tokens at the estimated step time (the LLaMA paper's section 6 formula),
    and what failures add to it."""

    steps: int
    days: float
    """Failure-free: steps x step time."""
    gpu_hours: float
    mwh: float
    tco2eq: float
    checkpoint_save_s: float = 0.0
    """One save of the model and AdamW state (12 bytes per parameter) at the cluster's write bandwidth."""
    mtbf_hours: float = 0.0
    """The job's mean time between failures at ``cluster.failures_per_gpu_hour``."""
    checkpoint_interval_s: float = 0.0
    """Young/Daly: sqrt(2 x save x MTBF)."""
    expected_goodput: float = 1.0
    """Share of the wall-clock time kept at that interval (saves, recomputed work and restarts excluded)."""

    @property
    def days_with_failures(self) -> float:
        return self.days / self.expected_goodput if self.expected_goodput > 0 else math.inf


CHECKPOINT_BYTES_PER_PARAM = 12
"""fp32 weights and AdamW's two fp32 moments (what trainer/checkpoint saves)."""


def budget(est: Estimate, *, tokens: float, cluster: ClusterConfig, params: int) -> Budget:
    steps = math.ceil(tokens / est.global_batch_tokens)
    seconds = steps * est.time.total
    gpu_hours = seconds / 3600 * est.world_size
    mwh = gpu_hours * cluster.gpu_power_w / 1e6 * cluster.pue
    nodes = max(1, est.world_size // cluster.gpus_per_node)
    save_s = CHECKPOINT_BYTES_PER_PARAM * params / (nodes * cluster.checkpoint_write_gbps * 1e9)
    mtbf_s = job_mtbf_s(gpus=est.world_size, failures_per_gpu_hour=cluster.failures_per_gpu_hour)
    interval_s = young_daly_interval_s(save_s=save_s, mtbf_s=mtbf_s)
    kept = expected_goodput(save_s=save_s, interval_s=interval_s, mtbf_s=mtbf_s, restart_s=cluster.restart_minutes * 60)
    return Budget(steps=steps, days=seconds / 86400, gpu_hours=gpu_hours, mwh=mwh, tco2eq=mwh * cluster.kg_co2_per_kwh,
                  checkpoint_save_s=save_s, mtbf_hours=mtbf_s / 3600, checkpoint_interval_s=interval_s,
                  expected_goodput=kept)  # fmt: skip
