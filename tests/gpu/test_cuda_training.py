"""One GPU, bf16, every layout that fits on it and every AC policy, compile off and on (``make test-gpu``).

The harness is tests/trainer/parallel/test_bf16.py's (the same debug-sized model, batches and tolerances against the
fp32 run): one process under autocast, and FSDP over one rank (NCCL) with bf16 parameters. On CUDA the AC
policies are not bitwise equal (the flash backward's atomic adds reorder sums), so they are compared with a
tolerance of their own: 1e-2 relative on gradients, 1e-3 on losses (one bf16 step is 3.9e-3; a reordered
fp32 sum rounds to the same bf16 value or a neighbour).
"""

from __future__ import annotations

import pytest
import torch

from tests.gpu.conftest import GPU
from tests.trainer.parallel.test_bf16 import check_against_fp32, fp32_reference, run_layout
from trainer.parallel.config import ACMode

pytestmark = GPU

MODE_GRAD_RTOL = 1e-2
MODE_LOSS_RTOL = 1e-3


def _modes_agree(records: dict, *, label: str) -> None:
    (first_mode, (first_grads, first_losses)), *rest = records.items()
    for mode, (grads, losses) in rest:
        for name, g in grads.items():
            err = ((g - first_grads[name]).norm() / first_grads[name].norm()).item()
            assert err <= MODE_GRAD_RTOL, (label, mode, first_mode, name, err)
        for a, b in zip(losses, first_losses):
            assert abs(a - b) <= MODE_LOSS_RTOL * b, (label, mode, first_mode, losses, first_losses)


@pytest.fixture(scope="module")
def reference():
    before = torch.backends.cuda.matmul.fp32_precision
    torch.backends.cuda.matmul.fp32_precision = "ieee"  # the fp32 reference without TF32
    try:
        return fp32_reference(torch.device("cuda", torch.cuda.current_device()))
    finally:
        torch.backends.cuda.matmul.fp32_precision = before


def test_one_gpu_autocast_every_policy(cuda, reference):
    records = run_layout(world_size=1, tp=1, fsdp_one_rank=False, dtype=torch.bfloat16, device=cuda)
    check_against_fp32(records, reference=reference, label="cuda autocast")
    _modes_agree(records, label="cuda autocast")


def test_one_gpu_fsdp_every_policy(cuda, reference, nccl_one_rank):
    records = run_layout(world_size=1, tp=1, fsdp_one_rank=True, dtype=torch.bfloat16, device=cuda)
    check_against_fp32(records, reference=reference, label="cuda fsdp1")
    _modes_agree(records, label="cuda fsdp1")


@pytest.mark.parametrize("fsdp", [False, True], ids=["autocast", "fsdp1"])
def test_one_gpu_compiled(cuda, reference, fsdp, request):
    if fsdp:
        request.getfixturevalue("nccl_one_rank")
    modes = (ACMode.selective, ACMode.full)
    records = run_layout(world_size=1, tp=1, fsdp_one_rank=fsdp, dtype=torch.bfloat16, device=cuda, modes=modes,
                         compile=True)  # fmt: skip
    check_against_fp32(records, reference=reference, label=f"cuda compiled {'fsdp1' if fsdp else 'autocast'}")
    _modes_agree(records, label="cuda compiled")
