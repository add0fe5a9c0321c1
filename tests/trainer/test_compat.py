"""compat.py: the version shims work on the torch installed here (and, through make test-compat, others);
the spellings of older versions still work; and no other module reaches the version-dependent APIs."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import compat
from tests.distributed import run_workers

REPO = Path(__file__).resolve().parents[2]


def _collectives_worker(rank: int, world_size: int, old_spelling: bool) -> None:
    if old_spelling:  # what torch 2.11 / 2.12 offer
        compat._ALL_GATHER, compat._REDUCE_SCATTER = dist.all_gather_into_tensor, dist.reduce_scatter_tensor
    group = dist.group.WORLD
    x = torch.full((2, 3), float(rank + 1))
    gathered = torch.empty(2 * world_size, 3)
    compat.all_gather_single(gathered, x, group=group, async_op=True).wait()
    assert torch.equal(gathered, torch.cat([torch.full((2, 3), float(r + 1)) for r in range(world_size)]))
    full = torch.arange(world_size * 4, dtype=torch.float32).reshape(world_size * 2, 2) * (rank + 1)
    out = torch.empty(2, 2)
    compat.reduce_scatter_single(out, full, group=group)
    scale = sum(r + 1 for r in range(world_size))
    expected = torch.arange(world_size * 4, dtype=torch.float32).reshape(world_size * 2, 2)[2 * rank : 2 * rank + 2]
    assert torch.equal(out, expected * scale)


@pytest.mark.parametrize("old_spelling", [False, True], ids=["this_torch", "torch_2_11_names"])
def test_sequence_collectives(old_spelling):
    run_workers(_collectives_worker, world_size=2, args=(old_spelling,))


def _mesh_worker(rank: int, world_size: int) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (1, world_size), mesh_dim_names=("a", "b"))
    flat = compat.flatten_mesh(mesh, "ab")
    assert flat.size() == world_size and flat.mesh_dim_names == ("ab",)
    module = fully_shard(torch.nn.Linear(4, 4), mesh=flat)
    assert compat.set_unshard_async_op(module, True)


def test_mesh_flattening_and_fsdp_async_unshard():
    run_workers(_mesh_worker, world_size=2)


def test_missing_fsdp_setter_warns_and_keeps_going():
    with pytest.warns(UserWarning, match="prefetches synchronously"):
        assert not compat.set_unshard_async_op(object(), True)


def test_checkpoint_wrapper_keeps_parameter_names():
    inner = torch.nn.Linear(3, 2)
    wrapped = compat.checkpoint_wrapper(inner, preserve_rng_state=False)
    assert list(wrapped.state_dict()) == list(inner.state_dict())
    x = torch.randn(4, 3, requires_grad=True)
    wrapped(x).sum().backward()
    assert x.grad is not None


# Version-dependent spellings that only compat.py may use (a call elsewhere would dodge make test-compat).
_PRIVATE = (
    r"\._flatten\(",
    r"_set_unshard_async_op",
    r"dist\.(all_gather_single|reduce_scatter_single|all_gather_into_tensor|reduce_scatter_tensor)\b",
    r"checkpoint\._traverse",
    r"algorithms\._checkpoint",
    r"aten\._scaled_dot_product\w*\(",
    r"_get_acs_underlying_tensor",
    r"_dump_nccl_trace",
    r"_record_memory_history",
    r"_dump_snapshot",
)


def test_version_dependent_calls_live_in_compat_only():
    offenders = []
    for path in sorted(REPO.glob("*/**/*.py")) + sorted(REPO.glob("*.py")):
        rel = path.relative_to(REPO)
        if rel.parts[0].startswith(".") or rel.name == "compat.py" or rel.parts[0] == "tests":
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#", 1)[0]
            if any(re.search(p, code) for p in _PRIVATE):
                offenders.append(f"{rel}:{number}: {line.strip()}")
    assert not offenders, "call these through compat.py:\n" + "\n".join(offenders)
