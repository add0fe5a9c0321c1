"""Run a function in N gloo processes on this machine (CPU), for multi-process unit tests."""

from __future__ import annotations

import os
import socket

import torch.distributed as dist
import torch.multiprocessing as mp

from trainer.parallel.distributed import shutdown_distributed


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, fn, world_size: int, port: int, args: tuple) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        fn(rank, world_size, *args)
    finally:
        # The trainer's teardown: collect reference cycles holding work handles first, else the group's
        # destruction at exit sometimes aborts gloo ("terminate called without an active exception").
        shutdown_distributed()


def run_workers(fn, *, world_size: int, args: tuple = ()) -> None:
    """Calls ``fn(rank, world_size, *args)`` in each of ``world_size`` processes; any failure fails the call.

    ``fn`` must be importable at module level (processes are spawned, not forked).
    """
    mp.spawn(_entry, args=(fn, world_size, _free_port(), args), nprocs=world_size, join=True)
