"""The straggler monitor: which rank is slow, and by how much.

Under synchronous data parallelism every rank waits for the slowest at each collective, so one throttled GPU
(or one host whose CPU is shared) slows all 2,048 down while every rank's step time looks the same. The
ranks' own speed is therefore measured apart from the communication that couples them: every
``straggler.every_steps`` steps each rank times the same matmul (the shape of the model's feed-forward
projection on one micro-batch, at least 1024 x 512 x 512) on its own device, and the ranks share the times
in one small all-gather. Rank 0 logs ``train/straggler_ratio`` (the slowest rank's time over the median),
``train/straggler_rank`` and ``train/probe_ms``, adds the slowest rank, its host and the ratio to
``summary.json``'s ``stragglers`` when it exceeds ``straggler.warn_ratio``, and warns naming them.
This is the per-rank GEMM throughput Megatron's straggler detector reports, without its kernel timers.
"""

from __future__ import annotations

import logging
import socket
import statistics
import time

import torch
import torch.distributed as dist

from model.config import ModelArgs
from trainer.run.config import StragglerConfig
from trainer.run.loop import Component, Control, StepOutcome
from trainer.run.metrics import MetricLogger
from trainer.run.records import TrainResult

logger = logging.getLogger(__name__)


def probe_shape(args: ModelArgs, *, tokens: int) -> tuple[int, int, int]:
    """(m, k, n) of the probe matmul: a micro-batch's tokens through the feed-forward's up projection, grown
    to at least 1024 x 512 x 512 (a tiny model's would finish in microseconds, below the timer's noise) and
    capped at 4096 tokens (a few milliseconds on a GPU at 65B widths)."""
    return min(4096, max(1024, tokens)), max(512, args.dim), max(512, args.ffn_hidden_dim)


class StragglerMonitor(Component):
    def __init__(self, cfg: StragglerConfig, *, args: ModelArgs, tokens: int, dtype: torch.dtype,
                 device: torch.device, metrics: MetricLogger, result: TrainResult, repeats: int = 1):  # fmt: skip
        """
        Args:
            tokens: tokens of one micro-batch on this rank (sizes the probe).
            repeats: how many times each probe matmul runs (1; more stands in for a slower device in tests).
        """
        self.cfg, self.device, self.metrics, self.result, self.repeats = cfg, device, metrics, result, repeats
        m, k, n = probe_shape(args, tokens=tokens)
        generator = torch.Generator().manual_seed(0)
        self._a = torch.randn(m, k, generator=generator).to(device=device, dtype=dtype)
        self._b = torch.randn(k, n, generator=generator).to(device=device, dtype=dtype)
        self._hosts: list[str] = []

    def start(self, *, first_step: int) -> None:
        if dist.is_initialized() and dist.get_world_size() > 1:
            self._hosts = [""] * dist.get_world_size()
            dist.all_gather_object(self._hosts, socket.gethostname())

    def step_end(self, outcome: StepOutcome, control: Control) -> None:
        if not self._hosts or not self.cfg.every_steps or outcome.step % self.cfg.every_steps:
            return
        times = self._share(self._probe())
        median = statistics.median(times)
        slowest = max(range(len(times)), key=times.__getitem__)
        ratio = times[slowest] / median
        self.metrics.log({"straggler_ratio": ratio, "straggler_rank": slowest, "probe_ms": median * 1e3},
                         step=outcome.step, tokens=outcome.total_tokens, namespace="train")  # fmt: skip
        if ratio > self.cfg.warn_ratio:
            host = self._hosts[slowest]
            self.result.stragglers.append({"step": outcome.step, "rank": slowest, "host": host, "ratio": ratio})
            logger.warning("straggler at step %d: rank %d on %s takes %.2fx the median rank's time for the same "
                           "matmul (%.2f ms vs %.2f ms); every rank waits for it", outcome.step, slowest, host, ratio,
                           times[slowest] * 1e3, median * 1e3)  # fmt: skip

    def _probe(self) -> float:
        """Seconds of this rank's probe matmul, the best of three after a warm-up."""
        best = float("inf")
        for attempt in range(4):
            self._sync()
            started = time.perf_counter()
            for _ in range(self.repeats):
                self._a @ self._b
            self._sync()
            if attempt:
                best = min(best, time.perf_counter() - started)
        return best

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _share(self, seconds: float) -> list[float]:
        """Every rank's probe time, in rank order (one all-gather of one number per rank)."""
        mine = torch.tensor([seconds], dtype=torch.float64, device=self.device)
        gathered = [torch.zeros_like(mine) for _ in range(dist.get_world_size())]
        dist.all_gather(gathered, mine)
        return [float(t.item()) for t in gathered]
