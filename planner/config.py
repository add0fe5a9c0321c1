"""Typed configs of the planner: the cluster it plans for (``conf/cluster/``) and what it is asked."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from trainer.run.device import gpu_peak
from trainer.run.goodput import LLAMA3_FAILURES_PER_GPU_HOUR


@dataclass
class ClusterConfig:
    """A GPU cluster: the GPU, how many, and the links between them. Presets in ``conf/cluster/``."""

    gpu: str = "A100-SXM4-80GB"
    """GPU name as ``torch.cuda.get_device_name`` reports it; its data-sheet bf16 peak is looked up in
    ``trainer.run.device.GPU_PEAKS`` (the table MFU uses in training) unless ``peak_flops`` is set."""
    gpus: int = 8
    """GPUs in the job: the world size the layout is planned for."""
    gpus_per_node: int = 8
    memory_gib: float = 79.2
    """Device memory as torch reports it (``total_memory``), GiB."""
    peak_flops: Optional[float] = None
    """Dense bf16 peak FLOP/s per GPU; None: from ``gpu``'s data sheet."""
    hbm_gbps: float = 2039.0
    """Device memory bandwidth, GB/s (data sheet): prices the optimizer step."""
    intra_node_gbps: float = 230.0
    """Bus bandwidth a collective reaches between GPUs of one node (NVLink), GB/s per GPU (nccl-tests busbw)."""
    inter_node_gbps: float = 25.0
    """Bus bandwidth per GPU between nodes, GB/s (its share of the node's network: 200 Gb/s HDR = 25)."""
    gemm_efficiency: float = 0.526
    """Achieved fraction of ``peak_flops`` over a step's compute (GEMMs, attention and the element-wise
    work between them): the planner's one calibrated constant per GPU type (docs/planner.md)."""
    gpu_power_w: float = 400.0
    """Power per GPU for the energy estimate (the LLaMA paper uses 400 W for an A100)."""
    pue: float = 1.1
    """Power usage effectiveness of the data centre (LLaMA paper, section 6)."""
    kg_co2_per_kwh: float = 0.385
    """Carbon intensity (the LLaMA paper's US national average)."""
    checkpoint_write_gbps: float = 2.0
    """Write bandwidth to the checkpoint file system per node, GB/s (Llama 3's storage: 2-7 TB/s for ~2,000
    nodes). Prices a save for the checkpoint-interval advice and the expected goodput."""
    restart_minutes: float = 10.0
    """From a failure to training again: detection (the hang watchdog, the process-group timeout), relaunch,
    start-up, loading the checkpoint."""
    failures_per_gpu_hour: float = LLAMA3_FAILURES_PER_GPU_HOUR
    """Unexpected interruptions per GPU-hour; Llama 3's: 419 in 54 days on 16,384 GPUs."""
    memory_reserve_gib: float = 1.5
    """Fixed device memory outside PyTorch's allocator: CUDA context, cuBLAS/NCCL workspaces."""
    fragmentation: float = 0.1
    """Extra fraction of the step's changing memory (activations, gathered parameters, logits) lost to
    the caching allocator's fragmentation."""

    def __post_init__(self) -> None:
        if self.gpus < 1 or self.gpus_per_node < 1:
            raise ValueError(f"cluster.gpus and cluster.gpus_per_node must be >= 1, got {self.gpus}, {self.gpus_per_node}")
        if self.gpus > self.gpus_per_node and self.gpus % self.gpus_per_node:
            raise ValueError(
                f"cluster.gpus={self.gpus} is not a whole number of nodes of cluster.gpus_per_node="
                f"{self.gpus_per_node}: request whole nodes"
            )
        if self.checkpoint_write_gbps <= 0 or self.restart_minutes < 0 or self.failures_per_gpu_hour <= 0:
            raise ValueError("cluster.checkpoint_write_gbps and cluster.failures_per_gpu_hour must be positive, "
                             "cluster.restart_minutes >= 0")  # fmt: skip
        if not 0 < self.gemm_efficiency <= 1:
            raise ValueError(f"cluster.gemm_efficiency must be in (0, 1], got {self.gemm_efficiency}")
        if self.peak_flops is None and gpu_peak(self.gpu) is None:
            raise ValueError(
                f"cluster.gpu='{self.gpu}' is not in trainer.run.device.GPU_PEAKS: set cluster.peak_flops to its "
                "dense bf16 peak (FLOP/s)"
            )

    @property
    def bf16_peak(self) -> float:
        return self.peak_flops if self.peak_flops is not None else gpu_peak(self.gpu).bf16

    @property
    def memory_bytes(self) -> float:
        return self.memory_gib * 2**30


@dataclass
class PlanSettings:
    """What the planner is asked (``plan.*``)."""

    tokens: float = 1.0e12
    """Training tokens the cost estimate is for (LLaMA 7B/13B: 1.0e12; 33B/65B: 1.4e12)."""
    global_batch_tokens: Optional[int] = None
    """Tokens per optimizer step; None: the training config's (micro-batch x accumulation x dp x seq_len).
    The search keeps it fixed and varies the micro-batch (and with it the accumulation)."""
    search: bool = False
    """Enumerate layouts (tp, dp_replicate, activation checkpointing, micro-batch, reshard_after_forward),
    keep those that fit, rank them by predicted throughput (also ``--search``)."""
    top: int = 10
    """Layouts the search prints."""
    out_dir: Optional[str] = None
    """Where the text report and the memory picture go; None: Hydra's run directory."""
