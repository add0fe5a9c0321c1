"""Fixtures of the GPU tests. Every module here sets ``pytestmark = GPU``: marked ``gpu`` (``make test-gpu``,
excluded from ``make test``) and skipped, with the reason, where torch sees no CUDA device.
``make test-gpu`` itself refuses to run without one, so an all-skipped run cannot pass for a GPU check."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

GPU = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason=f"needs a CUDA device (torch {torch.__version__} sees none)"),
]


@pytest.fixture
def cuda() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device())


@pytest.fixture
def exact_fp32():
    """fp32 matmuls in full precision while the test runs (the fp32 references must not use TF32)."""
    before = torch.backends.cuda.matmul.fp32_precision
    torch.backends.cuda.matmul.fp32_precision = "ieee"
    yield
    torch.backends.cuda.matmul.fp32_precision = before


@pytest.fixture
def nccl_one_rank(cuda):
    """A single-rank NCCL process group in this process (FSDP over one GPU), destroyed afterwards."""
    dist.init_process_group("nccl", store=dist.HashStore(), rank=0, world_size=1, device_id=cuda)
    yield
    dist.destroy_process_group()
