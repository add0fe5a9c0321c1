"""Count the bytes autograd keeps for backward, split into activations and parameters.

Every tensor an op saves for backward (``ctx.save_for_backward`` in a hand-written Function, or the
inputs a built-in op's autograd formula keeps) passes through the pack hook of
``torch.autograd.graph.saved_tensors_hooks``. Parameters are saved too, but they live for the whole run
anyway, so an activation-memory budget must leave them out. Built-in ops often save a view of a
parameter (``F.linear`` saves ``W.t()``), which is no longer an ``nn.Parameter``; such views are
recognised by sharing storage with one of the ``params`` passed in.

Counts are per saved tensor: a tensor saved by two ops counts twice, as autograd holds two references
(the memory is allocated once). Counts are ``numel * element_size``, the logical size; a view of a larger
buffer counts only its own elements.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable

import torch
from torch import nn


@dataclass(frozen=True)
class SavedBytes:
    """Bytes saved for backward while a function ran."""

    activations: int
    """Tensors that are neither parameters nor views of one."""
    parameters: int
    """``nn.Parameter`` objects and tensors sharing storage with one of the given parameters."""

    @property
    def total(self) -> int:
        return self.activations + self.parameters


def saved_bytes(fn: Callable[[], object], *, params: Iterable[torch.Tensor] = ()) -> SavedBytes:
    """Run ``fn()`` with a pack hook that adds up every tensor saved for backward.

    Args:
        fn: builds the autograd graph to measure (its return value is dropped).
        params: tensors to count as parameters, with any view of them; ``nn.Parameter`` objects are
            recognised without being listed.
    """
    param_storages = {p.untyped_storage().data_ptr() for p in params}
    counts = {"activations": 0, "parameters": 0}

    def pack(t: torch.Tensor) -> torch.Tensor:
        is_param = isinstance(t, nn.Parameter) or t.untyped_storage().data_ptr() in param_storages
        counts["parameters" if is_param else "activations"] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return SavedBytes(**counts)


def saved_activation_bytes(fn: Callable[[], object], *, params: Iterable[torch.Tensor] = ()) -> int:
    """Bytes of the non-parameter tensors saved for backward while ``fn()`` runs (see ``saved_bytes``)."""
    return saved_bytes(fn, params=params).activations
