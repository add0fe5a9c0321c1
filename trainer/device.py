"""Device, precision, peak FLOP/s and memory readings."""

from __future__ import annotations

import time
from typing import Optional

import psutil
import torch

from trainer.config import Device, Precision

# Dense bf16 tensor-core peaks (no sparsity) from the vendors' data sheets, by a substring of
# torch.cuda.get_device_name(). Order matters: the first match wins ("H100 PCIe" before "H100").
_GPU_PEAK_BF16 = (
    ("H200", 989e12),
    ("H100 PCIe", 756e12),
    ("H100", 989e12),
    ("A100", 312e12),
    ("A10G", 125e12),
    ("L40S", 362e12),
    ("L4", 121e12),
)


def resolve_device(device: Device, *, local_rank: int = 0) -> torch.device:
    """The device of this process: on CUDA, the GPU of its local rank (and made current)."""
    if device == Device.cuda and not torch.cuda.is_available():
        raise ValueError("trainer.device=cuda but no CUDA device is visible; use trainer.device=auto or cpu")
    if device == Device.cpu or not torch.cuda.is_available():
        return torch.device("cpu")
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


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


def peak_flops(*, device: torch.device, dtype: torch.dtype, override: Optional[float]) -> float:
    """Peak FLOP/s that MFU divides by: the override, a GPU's data sheet, or the CPU measured now."""
    if override is not None:
        return override
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, flops in _GPU_PEAK_BF16:
            if key in name:
                # fp32 runs on TF32 tensor cores at half the bf16 rate.
                return flops if dtype == torch.bfloat16 else flops / 2
        raise ValueError(f"unknown GPU '{name}': set trainer.peak_flops to its peak FLOP/s for MFU")
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
