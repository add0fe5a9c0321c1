"""Every call whose spelling or existence depends on the torch version, in one place.

Supported: torch >= 2.11, < 2.16 (``setup.cfg``); ``make test-compat TORCH=<version>`` runs the suites that
exercise these shims under another torch (docs/compat.md has the results). Each shim says which versions
need it. Private torch APIs are reached only from here, so a torch upgrade that moves one breaks one
function instead of a training run.

A top-level module rather than part of ``trainer/``: ``model/`` (which may not import the trainer) calls
the attention kernels below, and ``trainer/`` the rest.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import warnings
from typing import Any, Iterator

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh

logger = logging.getLogger(__name__)

# --- attention kernels ---------------------------------------------------------------------------------------
# The fused flash kernels behind F.scaled_dot_product_attention, called directly so that model.ops can
# write their backward. Private aten ops; their schemas are identical in 2.11, 2.13 and 2.15
# (torch/_meta_registrations.py). Layout (B, H, T, D); causal, no dropout, default scale.

aten = torch.ops.aten


def flash_attention_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
    """-> o (B, H, T, D), lse (B, H, T) in >= fp32, and what the CUDA backward needs besides (a tuple).

    CPU: any float dtype, k/v may have fewer heads than q. CUDA: fp16/bf16, sm80+, D <= 256, equal heads
    (``model.attention.core_supports`` decides when it may be called).
    """
    if q.is_cuda:
        o, lse, cum_q, cum_k, max_q, max_k, seed, offset, _ = aten._scaled_dot_product_flash_attention(
            q, k, v, 0.0, True, False
        )
        return o, lse, (cum_q, cum_k, max_q, max_k, seed, offset)
    o, lse = aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, True)
    return o, lse, ()


def flash_attention_backward(do, q, k, v, o, lse, extras: tuple):
    """-> dq, dk, dv shaped as q, k, v; the inputs as ``flash_attention_forward`` took and returned them."""
    if q.is_cuda:
        cum_q, cum_k, max_q, max_k, seed, offset = extras
        dq, dk, dv = aten._scaled_dot_product_flash_attention_backward(
            do, q, k, v, o, lse, cum_q, cum_k, max_q, max_k, 0.0, True, seed, offset
        )
        return dq, dk, dv
    return aten._scaled_dot_product_flash_attention_for_cpu_backward(do, q, k, v, o, lse, 0.0, True)


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """The plain tensor holding ``t``'s memory: a DTensor's local shard, the result inside the wrapper that
    functional collectives return (``AsyncCollectiveTensor``, e.g. a TP embedding's output), else ``t``.

    ``_get_acs_underlying_tensor`` is private (2.11-2.15).
    """
    if hasattr(t, "to_local"):
        t = t.to_local()
    if hasattr(t, "_get_acs_underlying_tensor"):
        t = t._get_acs_underlying_tensor()
    return t


# --- collectives --------------------------------------------------------------------------------------

# torch 2.13 added all_gather_single / reduce_scatter_single and deprecated the *_into_tensor / *_tensor
# names (a FutureWarning on every call); 2.11 and 2.12 have only the old names. Same arguments in both.
_ALL_GATHER = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_REDUCE_SCATTER = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def all_gather_single(output: torch.Tensor, input: torch.Tensor, *, group, async_op: bool = False):
    """Concatenate every rank's ``input`` along dim 0 into ``output`` (torch >= 2.13 name, any version)."""
    return _ALL_GATHER(output, input, group=group, async_op=async_op)


def reduce_scatter_single(output: torch.Tensor, input: torch.Tensor, *, group, async_op: bool = False):
    """Sum ``input`` over ranks and keep this rank's dim-0 block in ``output`` (torch >= 2.13 name, any version)."""
    return _REDUCE_SCATTER(output, input, op=dist.ReduceOp.SUM, group=group, async_op=async_op)


# --- device mesh ----------------------------------------------------------------------------------------


def flatten_mesh(mesh: DeviceMesh, name: str) -> DeviceMesh:
    """One mesh axis named ``name`` made of all of ``mesh``'s axes (``DeviceMesh._flatten``).

    Private in 2.11-2.15 (torchtitan uses it the same way); no public spelling exists yet.
    """
    return mesh._flatten(name)


# --- fake process group (the planner's rehearsal) -----------------------------------------------------------


@contextlib.contextmanager
def fake_process_group(*, world_size: int, rank: int = 0) -> Iterator[None]:
    """This process joins a world of ``world_size`` as ``rank`` through torch's ``fake`` backend: every
    collective returns at once without moving data, so the real parallelisation code runs (on the meta
    device) at any world size in one process.

    The backend and its ``FakeStore`` live in ``torch.testing._internal.distributed.fake_pg`` in 2.11-2.15
    (importing it registers the backend); torchtitan's dry runs use the same.
    """
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        raise RuntimeError("a process group is already initialised in this process; the rehearsal needs its own")
    hook = sys.excepthook  # init_process_group wraps it to prefix tracebacks with the rank; undo that after
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world_size)
    try:
        yield
    finally:
        dist.destroy_process_group()
        sys.excepthook = hook


def local_shard_shape(global_shape: tuple[int, ...], *, mesh_shape: tuple[int, ...], coordinate: list[int],
                      placements: tuple) -> tuple[int, ...]:  # fmt: skip
    """The local shape that the DTensor placements give the rank at ``coordinate`` of a mesh of
    ``mesh_shape``: what any rank holds, asked from one process.

    ``torch.distributed.tensor._utils._compute_local_shape_and_global_offset`` (private; same arguments
    in 2.11-2.15): the function DTensor itself uses, strided shards (FSDP over TP) included.
    """
    from torch.distributed.tensor._utils import _compute_local_shape_and_global_offset

    shape, _ = _compute_local_shape_and_global_offset(global_shape, mesh_shape, coordinate, placements)
    return tuple(shape)


# --- FSDP2 ------------------------------------------------------------------------------------------------


def set_unshard_async_op(module: Any, enabled: bool) -> bool:
    """Make an FSDP2 module's all-gathers asynchronous when they are prefetched; False if unavailable.

    ``FSDPModule._set_unshard_async_op`` is private in 2.11-2.15 (torch's own tests call it). Without it the
    prefetch still happens, only synchronously, so a missing setter costs overlap, never correctness.
    """
    setter = getattr(module, "_set_unshard_async_op", None)
    if setter is None:
        warnings.warn(
            f"torch {torch.__version__} has no FSDPModule._set_unshard_async_op: FSDP prefetches synchronously "
            "on CPU (correct, less overlap)",
            stacklevel=2,
        )
        return False
    setter(enabled)
    return True


# --- activation checkpointing --------------------------------------------------------------------------------


def checkpoint_wrapper(module: torch.nn.Module, *, preserve_rng_state: bool) -> torch.nn.Module:
    """Non-reentrant activation checkpointing around ``module``, keeping its parameter names.

    ``torch.distributed.algorithms._checkpoint.checkpoint_wrapper`` is a private module path in 2.11-2.15
    (the one torchtitan imports); it strips its own prefix from state-dict keys, which the public
    ``torch.utils.checkpoint`` does not offer as a module wrapper.
    """
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointImpl
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper as wrap

    return wrap(module, checkpoint_impl=CheckpointImpl.NO_REENTRANT, preserve_rng_state=preserve_rng_state)


# --- distributed checkpoint (DCP) internals ------------------------------------------------------------------


@contextlib.contextmanager
def dcp_metadata_stream(reader: Any, *, rank: int | None) -> Iterator[Any]:
    """The open ``.metadata`` file of a ``FileSystemReader``, as its ``read_metadata`` opens it.

    Mirrors ``FileSystemReader.read_metadata`` (identical in 2.11, 2.13 and 2.15): ``_get_metadata_path``
    and ``fs.create_stream`` are internals.
    """
    with reader.fs.create_stream(reader._get_metadata_path(rank), "rb") as stream:
        yield stream


def dcp_finish_metadata(reader: Any, metadata: Any) -> Any:
    """What ``FileSystemReader.read_metadata`` does after unpickling (2.11-2.15): storage meta + load id."""
    from torch.distributed.checkpoint.metadata import StorageMeta

    if getattr(metadata, "storage_meta", None) is None:
        metadata.storage_meta = StorageMeta()
    metadata.storage_meta.load_id = reader.load_id
    return metadata


def dcp_place_loaded_bytes(planner: Any, read_item: Any, value: Any) -> None:
    """Store a loaded non-tensor entry where ``DefaultLoadPlanner.load_bytes`` would (2.11-2.15).

    Uses the planner's ``flatten_state_dict`` / ``mappings`` / ``original_state_dict`` and DCP's private
    ``_traverse.set_element``, the helper the default planner itself calls.
    """
    from torch.distributed.checkpoint._traverse import set_element

    if planner.flatten_state_dict:
        set_element(planner.original_state_dict, planner.mappings[read_item.dest_index.fqn], value)
    else:
        planner.state_dict[read_item.dest_index.fqn] = value


# --- NCCL flight recorder (the hang watchdog's report) ------------------------------------------------------


def nccl_flight_recorder() -> str | None:
    """The NCCL flight recorder's record of this process's recent collectives, as text; None where there is
    none (no NCCL in this build, no NCCL group, or ``TORCH_NCCL_TRACE_BUFFER_SIZE`` unset: the recorder is
    off unless that is > 0). ``torch._C._distributed_c10d._dump_nccl_trace`` (torch 2.3+, private; the
    record's keys have grown between versions, so each entry is written with the keys it has)."""
    dump = getattr(torch._C._distributed_c10d, "_dump_nccl_trace", None)
    if dump is None:
        return None
    import pickle

    try:
        record = pickle.loads(dump())  # this process's own record, made by torch: not untrusted input
    except Exception as err:  # no NCCL group yet, recorder off, a changed format: the report says so
        return f"(no NCCL flight record: {type(err).__name__}: {err})"
    keys = ("record_id", "pg_id", "collective_seq_id", "profiling_name", "state", "input_sizes", "output_sizes",
            "time_created_ns", "time_discovered_started_ns", "time_discovered_completed_ns")  # fmt: skip
    lines = [f"NCCL flight recorder, version {record.get('version', '?')}:"]
    for entry in record.get("entries", []):
        lines.append("  " + ", ".join(f"{k}={entry[k]}" for k in keys if k in entry))
    return "\n".join(lines)


# --- CUDA memory history (the out-of-memory report) -----------------------------------------------------------


def record_cuda_memory_history(*, max_entries: int) -> None:
    """Start recording the CUDA caching allocator's allocations and frees with their Python stacks
    (``torch.cuda.memory._record_memory_history``: private, torch 2.1+; ``stacks="python"`` keeps the cost
    to the Python frames, without C++ unwinding)."""
    torch.cuda.memory._record_memory_history(enabled="all", stacks="python", max_entries=max_entries)


def dump_cuda_memory_snapshot(path) -> None:
    """Write the recorded history and the allocator's state as a pickle that https://pytorch.org/memory_viz
    reads (``torch.cuda.memory._dump_snapshot``: private, torch 2.1+)."""
    torch.cuda.memory._dump_snapshot(str(path))

