"""Count the bytes autograd keeps for backward, split into activations and parameters.

Every tensor an op saves for backward (``ctx.save_for_backward`` in a hand-written Function, or the
inputs a built-in op's autograd formula keeps) passes through the pack hook of
``torch.autograd.graph.saved_tensors_hooks``. Parameters are saved too, but they live for the whole run
anyway, so an activation-memory budget must leave them out. Built-in ops often save a view of a
parameter (``F.linear`` saves ``W.t()``), which is no longer an ``nn.Parameter``; such views are
recognised by sharing storage with one of the ``params`` passed in.

Memory is counted once per saved region: a tensor saved by two ops (the attention output, saved by the
attention core and by the output projection), or saved once as itself and once as a view of the same
elements (same storage, offset and size), counts once, because it is allocated once. Counts are
``numel * element_size``, the logical size; a view of a larger buffer counts only its own elements.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable

import torch
from torch import nn

from compat import local_tensor


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


def saved_bytes(fn: Callable[[], object], *, params: Iterable[torch.Tensor] | Callable[[], Iterable[torch.Tensor]] = ()) -> SavedBytes:
    """Run ``fn()`` with a pack hook that adds up every tensor saved for backward.

    Args:
        fn: builds the autograd graph to measure (its return value is dropped).
        params: tensors to count as parameters, with any view of them; ``nn.Parameter`` objects are
            recognised without being listed. Pass buffers here too (the RoPE table): like parameters,
            they are not activations. A callable is asked again each time a tensor is saved: under FSDP the
            module's parameters are swapped for the unsharded ones during forward, and a view of those (the
            ``W.t()`` a built-in linear saves) must count as a parameter too.
    """

    def storages() -> set[int]:
        return {local_tensor(p).untyped_storage().data_ptr() for p in (params() if callable(params) else params)}

    param_storages = None if callable(params) else storages()
    counts = {"activations": 0, "parameters": 0}
    seen: dict[str, set[tuple[int, int, int, torch.dtype]]] = {"activations": set(), "parameters": set()}

    def pack(saved: torch.Tensor) -> torch.Tensor:
        t = local_tensor(saved)
        region = (t.untyped_storage().data_ptr(), t.storage_offset(), t.numel(), t.dtype)
        is_param = isinstance(saved, nn.Parameter) or region[0] in (param_storages or storages())
        kind = "parameters" if is_param else "activations"
        # A saved activation stays alive while fn() runs, so no other activation can take its address
        # meanwhile. A parameter's storage can go: FSDP frees an unsharded block after its forward, and an
        # activation may then be allocated at the same address; hence one set of regions per kind.
        if region not in seen[kind]:
            seen[kind].add(region)
            counts[kind] += t.numel() * t.element_size()
        return saved

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return SavedBytes(**counts)


def saved_activation_bytes(fn: Callable[[], object], *, params: Iterable[torch.Tensor] = ()) -> int:
    """Bytes of the non-parameter tensors saved for backward while ``fn()`` runs (see ``saved_bytes``)."""
    return saved_bytes(fn, params=params).activations
