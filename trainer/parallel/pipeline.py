"""Pipeline parallelism: this rank's stage of the model, and the schedule that runs micro-batches through the
stages (torch.distributed.pipelining).

The split: the blocks are cut into ``pp`` consecutive stages of as equal a count as they divide into (the
first ``n_layers % pp`` stages take one more); stage 0 also owns the embedding, the last stage the final
norm and the output head, so the loss is computed where the logits are (``stage_layers``). A stage is the
model with what it does not own removed (``Transformer.forward`` maps tokens or hidden states to hidden
states or logits), built on the meta device before it is parallelised, so parameter names, initialisation
(by name) and checkpoints are those of the whole model.

A step: the local batch is cut into ``m`` micro-batches; the schedule runs each through the stages
(activations sent forward, their gradients back, point to point), calling ``loss_fn`` on the last stage
for every micro-batch and backpropagating it at once. ``loss_fn`` returns the micro-batch's loss *sum*
times the step's scale (data-parallel degree / global count of valid labels, trainer/run/step.py), so the
gradients are exactly those of the unpipelined step; the sums are all-reduced over the pipeline axis, so
every stage reports the same loss.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.distributed as dist
from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe
from torch.distributed.tensor import DTensor

from model.llama import Transformer
from trainer.parallel.config import PPSchedule
from trainer.parallel.dims import ParallelDims

SCHEDULES = {PPSchedule.gpipe: ScheduleGPipe, PPSchedule.one_f_one_b: Schedule1F1B}


def stage_layers(n_layers: int, stages: int) -> list[range]:
    """The block indices of each stage: consecutive, as equal as they divide (the first stages one more)."""
    per, extra = divmod(n_layers, stages)
    out, start = [], 0
    for stage in range(stages):
        count = per + (1 if stage < extra else 0)
        out.append(range(start, start + count))
        start += count
    return out


def split_stage(model: Transformer, *, stage: int, stages: int) -> Transformer:
    """``model`` cut down, in place, to stage ``stage`` of ``stages`` (see the module docstring)."""
    keep = stage_layers(len(model.layers), stages)[stage]
    for name in list(model.layers.keys()):
        if int(name) not in keep:
            del model.layers[name]
    if stage != 0:
        model.tok_embeddings = None
    if stage != stages - 1:
        model.norm, model.output = None, None
    return model


class Pipeline:
    """This rank's stage and how a batch runs through the pipeline."""

    def __init__(self, model: Transformer, dims: ParallelDims, *, schedule: PPSchedule, microbatches: int,
                 device: torch.device, loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]):  # fmt: skip
        """``loss``: (logits, labels) -> the sum of their cross-entropy, the trainer's (trainer/run/step.py)."""
        self.loss = loss
        self.rank, self.stages = dims.pp_rank(), dims.pp
        self.group = dims.pp_mesh.get_group()
        self.microbatches = microbatches or dims.pp
        self.schedule_cls = SCHEDULES[PPSchedule(schedule)]
        self.stage = PipelineStage(model, self.rank, self.stages, device, group=self.group)
        self.device = device

    @property
    def first(self) -> bool:
        return self.rank == 0

    @property
    def last(self) -> bool:
        return self.rank == self.stages - 1

    def loss_sum(self, batch: dict[str, torch.Tensor], *, scale: Optional[torch.Tensor]) -> torch.Tensor:
        """Sum of cross-entropy over the batch's valid labels (fp32), on every stage. With ``scale`` the
        schedule backpropagates each micro-batch's sum times ``scale`` (training); without, forward only."""
        if "documents" in batch:
            raise ValueError("packed documents (data.document_mask, finetuning) do not run under parallel.pp yet: "
                             "the document ids would have to travel with the activations; use pp=1")  # fmt: skip
        rows = batch["inputs"].shape[0]
        if rows % self.microbatches:
            raise ValueError(f"parallel.pp_microbatches={self.microbatches} does not divide the {rows} sequences of a "
                             "micro-batch (trainer.micro_batch_size): choose a divisor")  # fmt: skip
        factor = scale if scale is not None else torch.ones((), device=self.device)

        def loss_fn(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
            return self.loss(logits, target) * factor

        schedule = self.schedule_cls(self.stage, self.microbatches, loss_fn=loss_fn, scale_grads=False)
        run = schedule.step if scale is not None else schedule.eval
        inputs = (batch["inputs"],) if self.first else ()
        # The schedule's own list of each micro-batch's loss (loss_fn may also run while it infers shapes).
        losses: list[torch.Tensor] = []
        run(*inputs, **({"target": batch["labels"], "losses": losses} if self.last else {}))
        plain = [(l.full_tensor() if isinstance(l, DTensor) else l).detach() for l in losses]  # TP: loss_parallel's
        local = torch.stack(plain).sum() / factor if plain else torch.zeros((), device=self.device)
        dist.all_reduce(local, group=self.group)  # the sum lives on the last stage; every stage reports it
        return local
