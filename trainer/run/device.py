"""Device, precision, peak FLOP/s and memory readings."""

from __future__ import annotations

import logging
import os
import re
import time
from dataclasses import dataclass
from typing import Optional

import psutil
import torch

from trainer.run.config import Device, Precision

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class GpuPeak:
    """Dense (no sparsity) peaks from the vendor's data sheet, FLOP/s."""

    pattern: str
    """Regular expression searched in ``torch.cuda.get_device_name()``; word boundaries keep "L4" from
    matching "L40S"."""
    bf16: float
    """bf16 tensor cores; TF32 runs at half this rate on every GPU listed."""
    fp32: float
    """Plain fp32 (CUDA cores), what an fp32 matmul reaches with TF32 off."""


# Order matters where names nest: the first match wins ("H100 PCIe" before "H100").
GPU_PEAKS = (
    GpuPeak(r"\bGH200\b", bf16=989e12, fp32=67e12),
    GpuPeak(r"\bH200\b", bf16=989e12, fp32=67e12),
    GpuPeak(r"\bH100 PCIe\b", bf16=756e12, fp32=51e12),
    GpuPeak(r"\bH100 NVL\b", bf16=835e12, fp32=60e12),
    GpuPeak(r"\bH100\b", bf16=989e12, fp32=67e12),
    GpuPeak(r"\bA100\b", bf16=312e12, fp32=19.5e12),
    GpuPeak(r"\bA10G?\b", bf16=125e12, fp32=31.2e12),  # A10's sheet; AWS publishes none for the A10G
    GpuPeak(r"\bL40S\b", bf16=362e12, fp32=91.6e12),
    GpuPeak(r"\bL40\b", bf16=181e12, fp32=90.5e12),
    GpuPeak(r"\bL4\b", bf16=121e12, fp32=30.3e12),
)


def gpu_peak(name: str) -> Optional[GpuPeak]:
    """The data-sheet entry for a GPU called ``name`` (as ``torch.cuda.get_device_name`` reports it), if known."""
    return next((peak for peak in GPU_PEAKS if re.search(peak.pattern, name)), None)


def resolve_device(device: Device, *, local_rank: int = 0) -> torch.device:
    """The device of this process: on CUDA, the GPU of its local rank (and made current)."""
    if device == Device.cuda and not torch.cuda.is_available():
        raise ValueError("trainer.device=cuda but no CUDA device is visible; use trainer.device=auto or cpu")
    if device == Device.cpu or not torch.cuda.is_available():
        return torch.device("cpu")
    count = torch.cuda.device_count()
    if local_rank >= count:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        raise ValueError(
            f"this process has LOCAL_RANK={local_rank}, but only {count} CUDA device(s) are visible"
            f"{f' (CUDA_VISIBLE_DEVICES={visible})' if visible is not None else ''}: start at most {count} "
            f"processes per node (--nproc / NPROC / --nproc-per-node {count}), one per GPU"
        )
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


def configure_matmul_precision(*, device: torch.device, tf32: bool) -> None:
    """On CUDA, let fp32 matmuls use TF32 tensor cores (``trainer.tf32``), or keep them full fp32.

    Set explicitly either way: torch's default (full fp32) runs fp32 matmuls ~8x below the TF32 rate on
    A100/H100, and MFU must divide by the rate the matmuls can actually reach (``peak_flops``). bf16
    compute is unaffected. Nothing changes on CPU, where the same switch would reach oneDNN's matmuls.
    """
    if device.type == "cuda":
        torch.backends.cuda.matmul.fp32_precision = "tf32" if tf32 else "ieee"


def resolve_dtype(precision: Precision, *, device: torch.device) -> torch.dtype:
    """Compute dtype: bf16 on CUDA, fp32 on CPU unless set (bf16 matmul is ~50x slower on AVX2 CPUs)."""
    if precision == Precision.auto:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return torch.bfloat16 if precision == Precision.bf16 else torch.float32


def measure_cpu_matmul_flops(*, shape: tuple[int, int, int] = (2048, 2048, 2048), repeats: int = 3,
                             dtype: torch.dtype = torch.float32) -> float:  # fmt: skip
    """Best-of-``repeats`` FLOP/s of an (m, k) @ (k, n) matmul, ``shape`` = (m, k, n), on the CPU with the
    current thread count.

    On a CPU there is no data-sheet peak that the BLAS reaches, so MFU is taken against this measured
    figure: "what fraction of a large, well-shaped matmul's speed does training reach".
    """
    m, k, n = shape
    a = torch.randn(m, k, dtype=dtype)
    b = torch.randn(k, n, dtype=dtype)
    a @ b  # warm-up: thread pool start, page faults
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * m * k * n / best


def gpu_peak_flops(name: str, *, dtype: torch.dtype, tf32: bool) -> Optional[float]:
    """A GPU's data-sheet peak for matmuls in ``dtype`` (fp32: TF32 at half the bf16 rate, or plain fp32
    with ``tf32`` off); None for a GPU not in ``GPU_PEAKS``."""
    peak = gpu_peak(name)
    if peak is None:
        return None
    if dtype in (torch.bfloat16, torch.float16):
        return peak.bf16
    return peak.bf16 / 2 if tf32 else peak.fp32


def peak_flops(*, device: torch.device, dtype: torch.dtype, override: Optional[float],
               tf32: bool = True) -> Optional[float]:  # fmt: skip
    """Peak FLOP/s that MFU divides by: the override, a GPU's data sheet, or the CPU measured now.

    None for a GPU whose peak is not known: training goes on and MFU is not reported (a warning says
    how to set it), rather than a metric stopping a run.
    """
    if override is not None:
        return override
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        peak = gpu_peak_flops(name, dtype=dtype, tf32=tf32)
        if peak is None:
            logger.warning(
                "no data-sheet peak FLOP/s known for GPU '%s': MFU is not reported. Set trainer.peak_flops "
                "to its dense %s peak (FLOP/s per GPU) to report it.", name, dtype,
            )  # fmt: skip
        return peak
    return measure_cpu_matmul_flops(dtype=dtype)


def peak_rss_bytes() -> int:
    """The most resident memory this process has held since it started (its exec, not its fork).

    Linux's ``VmHWM``. ``getrusage().ru_maxrss`` would be wrong for a process started by a large parent:
    it also counts the parent's memory that the child held between fork and exec.
    """
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    import resource  # not Linux: the best figure there is

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # bytes on macOS


def memory_stats(device: torch.device) -> dict[str, float]:
    """GiB: the process RSS now and its peak so far; on CUDA also the allocator's peak since the last reset."""
    stats = {"rss_gib": psutil.Process().memory_info().rss / 2**30, "peak_rss_gib": peak_rss_bytes() / 2**30}
    if device.type == "cuda":
        stats["cuda_max_allocated_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        torch.cuda.reset_peak_memory_stats(device)
    return stats
