"""Tensors in and out of DCP (``torch.distributed.checkpoint``), without unpickling arbitrary objects.

The model and optimizer state dicts are keyed by parameter name (``get_model_state_dict`` /
``get_optimizer_state_dict``), so a checkpoint saved under one layout loads under another. DCP's own
``.metadata`` is a pickle: it is read by an unpickler that only builds DCP's metadata records, and the
optimizer's non-tensor entries are read with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import contextlib
import pickle
import warnings
from pathlib import Path
from typing import Any, Iterator, Optional

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import Metadata
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from compat import dcp_finish_metadata, dcp_metadata_stream, dcp_place_loaded_bytes
from model.config import ModelArgs
from trainer.checkpoint.meta import CheckpointError, CheckpointMeta


@contextlib.contextmanager
def single_process_dcp() -> Iterator[None]:
    """Silences DCP's warning that no process group exists when there is none: one process is a layout we
    support, not a mistake (DCP then saves and loads without collectives)."""
    with warnings.catch_warnings():
        if not dist.is_initialized():
            warnings.filterwarnings("ignore", message="torch.distributed is (disabled|unavailable)", category=UserWarning)
        yield



def tensor_state(model: torch.nn.Module, optimizer: Optional[torch.optim.Optimizer], *,
                 flat_optimizer: bool = True) -> dict[str, Any]:  # fmt: skip
    """The model's and the optimizer's state dicts, keyed by parameter name.

    ``flat_optimizer``: the optimizer's hyperparameters keyed per parameter (``param_groups.<name>.lr``), as
    every checkpoint is saved since pipeline parallelism: nested, its param_groups are a list (group 0, 1)
    whose entries name the rank's parameters, and the ranks of different pipeline stages, which hold
    different parameters, would write the same keys (DCP keeps one rank's), so a stage would load another
    stage's groups. False reads checkpoints saved before (``load_tensors`` tells which a checkpoint is)."""
    state = {"model": get_model_state_dict(model)}
    if optimizer is not None:
        # On a fresh optimizer this first creates its state (a zero-lr step), so DCP has tensors to load into.
        options = StateDictOptions(flatten_optimizer_state_dict=flat_optimizer)
        state["optimizer"] = get_optimizer_state_dict(model, optimizer, options=options)
    return state


def _flat_optimizer(path: Path) -> bool:
    """Whether the checkpoint at ``path`` keys its optimizer hyperparameters per parameter (see
    ``tensor_state``) rather than per group (``optimizer.param_groups.0.lr``: checkpoints of 2026-12-05 and
    before)."""
    with single_process_dcp():
        keys = SafeFileSystemReader(path).read_metadata().state_dict_metadata
    return not any(key.startswith("optimizer.param_groups.") and key.split(".")[2].isdigit() for key in keys)


def load_tensors(path: Path, *, model, optimizer: Optional[torch.optim.Optimizer], args: ModelArgs) -> CheckpointMeta:
    """Validate ``path`` against ``args`` and load the model (and optimizer, if given) from it; returns its meta.

    Works with and without a process group (one process: a plain model; several: sharded DTensors)."""
    meta = CheckpointMeta.read(path)
    meta.check_model_matches(args, path=path)
    flat = optimizer is None or _flat_optimizer(path)
    state = tensor_state(model, optimizer, flat_optimizer=flat)
    dcp_load(state, path=path)
    set_model_state_dict(model, state["model"])
    if optimizer is not None:
        set_optimizer_state_dict(model, optimizer, state["optimizer"],
                                 options=StateDictOptions(flatten_optimizer_state_dict=flat))  # fmt: skip
    return meta



class _MetadataUnpickler(pickle.Unpickler):
    """Builds only what a DCP ``.metadata`` holds: DCP's metadata records, torch.Size, dtypes, layouts, paths."""

    _ALLOWED = {
        "torch": {"Size"},
        "torch.serialization": {"_get_layout"},
        "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
        "pathlib": {"PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath", "Path"},
        "collections": {"OrderedDict"},
    }

    def find_class(self, module: str, name: str) -> Any:
        if module == "torch.distributed.checkpoint.metadata" and not name.startswith("__"):
            found = super().find_class(module, name)
            if isinstance(found, type):  # records and enums; never a function
                return found
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        if name in self._ALLOWED.get(module, ()):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not allowed in DCP metadata")


class SafeFileSystemReader(FileSystemReader):
    """DCP's reader, except that ``.metadata`` (a pickle) is read by ``_MetadataUnpickler``.

    Mirrors ``FileSystemReader.read_metadata`` through ``compat`` (its internals are the same in
    torch 2.11-2.15); tensors themselves are already read with ``torch.load(weights_only=True)``.
    """

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        with dcp_metadata_stream(self, rank=kwargs.get("rank")) as stream:
            metadata = _MetadataUnpickler(stream).load()
        return dcp_finish_metadata(self, metadata)


class SafeLoadPlanner(DefaultLoadPlanner):
    """DCP's load planner, except that non-tensor entries (e.g. the optimizer's param_groups: floats and
    tuples) are unpickled with ``weights_only=True``: plain containers and numbers, never arbitrary objects.
    Mirrors ``DefaultLoadPlanner.load_bytes`` through ``compat``."""

    def load_bytes(self, read_item, value) -> None:
        dcp_place_loaded_bytes(self, read_item, torch.load(value, weights_only=True))


def dcp_load(state: dict[str, Any], *, path: Path) -> None:
    reader = SafeFileSystemReader(path)
    try:
        # Read (and vet) the metadata before DCP does: torch 2.11's dcp.load swallows a reader's exception
        # and reports only "metadata is None", which would hide the unpickler's refusal and its reason.
        with single_process_dcp():
            reader.read_metadata()
            dcp.load(state, storage_reader=reader, planner=SafeLoadPlanner())
    # DCP's CheckpointException derives from BaseException, not Exception; it wraps each rank's error.
    except CheckpointException as err:
        causes = "; ".join(f"{type(exc).__name__}: {exc}" for exc, _ in err.failures.values())
        raise CheckpointError(f"checkpoint {path} could not be loaded: {causes}") from err
    except Exception as err:  # an unpickling refusal, a missing .metadata, a key mismatch...
        raise CheckpointError(f"checkpoint {path} could not be loaded: {type(err).__name__}: {err}") from err
