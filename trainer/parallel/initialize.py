"""Initialise a parallelised model's weights on every rank at once, identically for every layout.

Each parameter is drawn in full on every rank from a generator of its own (seeded by the run's seed and the
parameter's name: ``model.llama.parameter_generator``), and each rank keeps its shard. So:
- every layout (one process, FSDP, TP, FSDP x TP, HSDP, any world size) starts from exactly the weights
  ``Transformer.init_weights`` gives in one process on the same device type;
- nothing is communicated and no rank holds more than one full parameter at a time (the largest: the
  65B preset's 32000 x 8192 embedding, 1 GiB in fp32), so start-up does not wait on one rank building
  the whole model while the others sit in a collective under its timeout.
The cost is that every rank draws every parameter: on a GPU a few seconds even for 65B (docs/distributed.md
has the figures measured on this CPU).
"""

from __future__ import annotations

import torch
from torch.distributed.tensor import DTensor, distribute_tensor

from model.llama import Transformer, parameter_generator

_WRAPPER_PREFIXES = ("_checkpoint_wrapped_module.",)
"""What activation checkpointing inserts into parameter names (FSDP2 and in-place compile insert nothing)."""


def model_parameter_name(name: str) -> str:
    """A parallelised model's parameter name as the plain model has it."""
    for prefix in _WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


@torch.no_grad()
def init_parameters(model: Transformer, *, seed: int) -> None:
    """Fill every parameter of ``model``, plain or parallelised (FSDP2 and TP keep it a ``Transformer``),
    with the values ``model.init_weights(seed=seed)`` gives the unsharded model, shard by shard.

    DTensor parameters (TP, FSDP) get their local shard of the full tensor, cut by their own placements
    (``distribute_tensor`` with ``src_data_rank=None``: each rank keeps its piece of its own copy).
    """
    for raw_name, param in model.named_parameters():
        name = model_parameter_name(raw_name)
        local = param.to_local() if isinstance(param, DTensor) else param
        full = torch.empty(param.shape, dtype=param.dtype, device=local.device)
        model.init_parameter_(name, full, generator=parameter_generator(seed=seed, name=name, device=local.device))
        if isinstance(param, DTensor):
            full = distribute_tensor(full, param.device_mesh, param.placements, src_data_rank=None).to_local()
        local.copy_(full)
        del full
