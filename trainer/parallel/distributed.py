"""Process-group set-up from torchrun's environment, and the few collectives the loop and evaluation need."""

from __future__ import annotations

import gc
import logging
import math
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Iterable, Literal, Optional

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistEnv:
    """This process's place in the job, read once from torchrun's environment variables."""

    rank: int
    local_rank: int
    world_size: int

    @property
    def is_rank0(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_environ(cls) -> DistEnv:
        return cls(
            rank=int(os.environ.get("RANK", 0)),
            local_rank=int(os.environ.get("LOCAL_RANK", 0)),
            world_size=int(os.environ.get("WORLD_SIZE", 1)),
        )


def init_distributed(env: DistEnv, *, device: torch.device, timeout_s: float = 7200.0, one_rank: bool = False) -> None:
    """Join the process group (NCCL on CUDA, gloo on CPU) when there is more than one process.

    Args:
        timeout_s: how long a collective may wait (``parallel.pg_timeout_s``).
        one_rank: a lone process (no torchrun) starts a process group of one, for FSDP on one device
            (``parallel.fsdp.one_rank``); it needs no rendezvous, so an in-memory store serves.
    """
    if dist.is_initialized() or (env.world_size == 1 and not one_rank):
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    # device_id binds NCCL's communicator to this GPU eagerly (no lazy init on the first collective).
    device_id = device if device.type == "cuda" else None
    timeout = timedelta(seconds=timeout_s)
    if env.world_size == 1 and "MASTER_ADDR" not in os.environ:
        dist.init_process_group(backend=backend, timeout=timeout, device_id=device_id, store=dist.HashStore(),
                                rank=0, world_size=1)  # fmt: skip
    else:
        dist.init_process_group(backend=backend, timeout=timeout, device_id=device_id)
    logger.info("joined %s process group: rank %d of %d", backend, env.rank, env.world_size)


def shutdown_distributed() -> None:
    # Destroy explicitly: an implicit teardown at interpreter exit sometimes aborts gloo
    # ("terminate called without an active exception", shared/ENVIRONMENT.md). Collect first: a work
    # handle still referenced from a reference cycle (a module's hooks, an autograd context) would
    # otherwise outlive the group and be destroyed during interpreter finalisation, which is what aborts
    # (pytorch/pytorch#179291 describes the mechanism).
    if dist.is_initialized():
        gc.collect()
        dist.destroy_process_group()


def dp_sum(value: torch.Tensor, *, dp_mesh: Optional[DeviceMesh]) -> torch.Tensor:
    """Sum ``value`` over the data-parallel ranks (those that see different data); identity for one process."""
    if dp_mesh is None:
        return value
    out = value.clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM, group=dp_mesh.get_group())
    return out


def clip_grad_norm_(parameters: Iterable[torch.nn.Parameter], *, max_norm: float,
                    pp_mesh: Optional[DeviceMesh] = None) -> torch.Tensor:  # fmt: skip
    """Clip to ``max_norm`` by the true global L2 norm over every shard; returns the norm before clipping.

    With FSDP and TP the gradients are DTensors whose local pieces are shards; the norm of the stacked
    per-tensor norms is itself a DTensor whose full value (``full_tensor``) reduces the sharded axes and
    leaves the replicated ones alone. Pipeline stages hold different parameters: their squared norms are
    summed over ``pp_mesh``. ``max_norm=inf`` only measures.
    """
    params = [p for p in parameters if p.grad is not None]
    grads = [p.grad for p in params]
    total = torch.nn.utils.get_total_norm(grads, norm_type=2.0, foreach=True)
    if isinstance(total, DTensor):
        total = total.full_tensor()
    if pp_mesh is not None:
        squared = total.double().square()
        dist.all_reduce(squared, group=pp_mesh.get_group())
        total = squared.sqrt().to(total.dtype)
    if math.isfinite(max_norm):
        torch.nn.utils.clip_grads_with_norm_(params, max_norm=max_norm, total_norm=total, foreach=True)
    return total


def agree(values: dict[str, int], *, op: Literal["max", "min"] = "max",
          device: torch.device = torch.device("cpu")) -> dict[str, int]:  # fmt: skip
    """Each value replaced by its maximum (or minimum) over all ranks, in one all-reduce; unchanged for one
    process. A decision that differed between ranks (save, stop, how many batches or tokens are left) would
    pair their collectives wrongly and deadlock; with ``max`` a flag is true everywhere when it is true on any.

    Args:
        device: where the all-reduce runs: the process group's device (CUDA under NCCL).
    """
    tensor = torch.tensor([int(v) for v in values.values()], dtype=torch.int64, device=device)
    if dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.MIN)
    return dict(zip(values, tensor.tolist()))
