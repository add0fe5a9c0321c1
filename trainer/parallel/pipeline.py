"""Pipeline parallelism: this rank's stages of the model, and the schedule that runs micro-batches through
them (torch.distributed.pipelining).

The split: the blocks are cut into ``pp * v`` consecutive stages (v = stages per rank,
``parallel.pp_virtual_stages``) of as equal a count as they divide into (the first ``n_layers % (pp * v)``
stages take one more); stage 0 also owns the embedding, the last stage the final norm and the output head,
so the loss is computed where the logits are (``stage_layers``). Rank r holds stage r (v = 1), the stages
r, r + pp, ... (looped: interleaved 1F1B, ZB1P), or r and 2 pp - 1 - r (V: zbv) (``local_stages``). The
rank's model is the whole model with what none of its stages owns removed (``split_stage``:
``Transformer.forward`` maps tokens or hidden states to hidden states or logits), built on the meta device
before it is parallelised, so parameter names, initialisation (by name) and checkpoints are those of the
whole model. With several stages per rank each is a view (``StageChunk``) over the rank's model's modules,
and under FSDP each view is an FSDP root of its own (its blocks and its share of embedding, norm and head):
torch's schedules drive each stage's gradient synchronisation through its module.

A step: the local batch is cut into ``m`` micro-batches; the schedule runs each through the stages
(activations sent forward, their gradients back, point to point), calling ``loss_fn`` on the last stage
for every micro-batch and backpropagating it at once. ``loss_fn`` returns the micro-batch's loss *sum*
times the step's scale (data-parallel degree / global count of valid labels, trainer/run/step.py), so the
gradients are exactly those of the unpipelined step; the sums are all-reduced over the pipeline axis, so
every stage reports the same loss. Zero-bubble schedules run each backward's weight gradients apart from its
input gradients: our Functions queue them on the pipeline's ``WeightGradStore`` (model/ops/deferred.py), and
the schedule's weight step runs what one micro-batch's backward queued (the stages' ``dw_builder``).
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.pipelining import (PipelineStage, Schedule1F1B, ScheduleGPipe, ScheduleInterleaved1F1B,
                                          ScheduleInterleavedZeroBubble, ScheduleZBVZeroBubble)  # fmt: skip
from torch.distributed.tensor import DTensor

from model.kv_cache import KVCache
from model.llama import Transformer, run_blocks
from model.ops.deferred import WeightGradStore, deferring
from trainer.parallel.config import ParallelConfig, PPSchedule
from trainer.parallel.dims import ParallelDims

SCHEDULES = {PPSchedule.gpipe: ScheduleGPipe, PPSchedule.one_f_one_b: Schedule1F1B,
             PPSchedule.interleaved_1f1b: ScheduleInterleaved1F1B, PPSchedule.zero_bubble: ScheduleInterleavedZeroBubble,
             PPSchedule.zbv: ScheduleZBVZeroBubble}  # fmt: skip
SINGLE_STAGE = (PPSchedule.gpipe, PPSchedule.one_f_one_b)  # schedules that take one stage per rank


def local_stages(*, rank: int, pp: int, virtual: int, schedule: PPSchedule) -> list[int]:
    """The stage indices rank ``rank`` of ``pp`` holds, of ``pp * virtual``: looped, or a V for zbv."""
    if PPSchedule(schedule) == PPSchedule.zbv:
        return [rank, 2 * pp - 1 - rank]
    return [rank + k * pp for k in range(virtual)]


def stage_owners(*, pp: int, virtual: int, schedule: PPSchedule) -> dict[int, int]:
    """Every stage's pipeline rank (``local_stages`` inverted)."""
    return {stage: rank for rank in range(pp)
            for stage in local_stages(rank=rank, pp=pp, virtual=virtual, schedule=schedule)}  # fmt: skip


def stage_layers(n_layers: int, stages: int) -> list[range]:
    """The block indices of each stage: consecutive, as equal as they divide (the first stages one more)."""
    per, extra = divmod(n_layers, stages)
    out, start = [], 0
    for stage in range(stages):
        count = per + (1 if stage < extra else 0)
        out.append(range(start, start + count))
        start += count
    return out


def split_stage(model: Transformer, *, stages: Sequence[int], total: int) -> Transformer:
    """``model`` cut down, in place, to what stages ``stages`` of ``total`` own (module docstring)."""
    per_stage = stage_layers(len(model.layers), total)
    keep = {index for stage in stages for index in per_stage[stage]}
    for name in list(model.layers.keys()):
        if int(name) not in keep:
            del model.layers[name]
    if 0 not in stages:
        model.tok_embeddings = None
    if total - 1 not in stages:
        model.norm, model.output = None, None
    return model


class StageChunk(nn.Module):
    """One of a rank's several stages: the rank's model's own modules for it (shared, not copied), run as
    ``Transformer.forward`` runs its stage: tokens or hidden states in, hidden states or logits out."""

    def __init__(self, model: Transformer, *, layers: range, first: bool, last: bool, advances_cache: bool):
        """``advances_cache``: this is the rank's last stage of a forward, which moves a decoding cache on once
        every one of the rank's blocks has written its positions."""
        super().__init__()
        self.tok_embeddings = model.tok_embeddings if first else None
        self.layers = nn.ModuleDict({str(i): model.layers[str(i)] for i in layers})
        self.norm, self.output = (model.norm, model.output) if last else (None, None)
        self.advances_cache = advances_cache
        self._model = [model]  # a list: not a submodule (its parameters are not this view's)

    def forward(self, x: torch.Tensor, *, documents: Optional[torch.Tensor] = None,
                cache: Optional[KVCache] = None) -> torch.Tensor:  # fmt: skip
        h = self.tok_embeddings(x) if self.tok_embeddings is not None else x
        length = h.shape[1]
        rope = self._model[0].block_rope(documents, cache=cache, length=length)
        h = run_blocks(self.layers, h, rope=rope, cache=cache, documents=documents)
        if cache is not None and self.advances_cache:
            cache.advance(length)
        h = self.norm(h) if self.norm is not None else h
        return self.output(h) if self.output is not None else h


def stage_modules(model: Transformer, *, dims: ParallelDims, cfg: ParallelConfig) -> list[nn.Module]:
    """This rank's stage modules in ``local_stages`` order: ``[model]`` where it holds one stage (or there is no
    pipeline), else one ``StageChunk`` view per stage. Built after the blocks are wrapped (a view holds the
    modules it is given) and before FSDP, whose roots they are (trainer/parallel/parallelize.py)."""
    virtual = cfg.pp_stages_per_rank
    if not dims.pp_enabled or virtual == 1:
        return [model]
    total = dims.pp * virtual
    per_stage = stage_layers(model.args.n_layers, total)
    ids = local_stages(rank=dims.pp_rank(), pp=dims.pp, virtual=virtual, schedule=cfg.pp_schedule)
    return [StageChunk(model, layers=per_stage[i], first=i == 0, last=i == total - 1, advances_cache=i == ids[-1])
            for i in ids]  # fmt: skip


class Pipeline:
    """This rank's stages and how a batch runs through the pipeline."""

    def __init__(self, modules: Sequence[nn.Module], dims: ParallelDims, *, cfg: ParallelConfig, device: torch.device,
                 loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]):  # fmt: skip
        """``modules``: this rank's stage modules, as ``build_stages`` returns them (trainer/parallel/build.py).
        ``cfg``: its ``pp_*`` settings. ``loss``: (logits, labels) -> the sum of their cross-entropy, the
        trainer's (trainer/run/step.py)."""
        self.loss, self.device = loss, device
        self.schedule = cfg.pp_schedule
        self.group = dims.pp_mesh.get_group()
        self.microbatches = cfg.pp_microbatches or dims.pp
        virtual = cfg.pp_stages_per_rank
        total = dims.pp * virtual
        ids = local_stages(rank=dims.pp_rank(), pp=dims.pp, virtual=virtual, schedule=self.schedule)
        self.first, self.last = 0 in ids, total - 1 in ids
        self._owners = stage_owners(pp=dims.pp, virtual=virtual, schedule=self.schedule)
        self.last_rank = self._owners[total - 1]  # the pipeline rank holding the logits: pp - 1, or 0 in a V
        # Zero-bubble: the Functions queue weight gradients here; each stage's dw_builder takes one
        # micro-batch's backward's worth for the schedule's weight step.
        self.store = WeightGradStore() if self.schedule.splits_backward else None
        if len(modules) != len(ids):
            raise ValueError(f"{len(modules)} stage modules for the {len(ids)} stages this rank holds: build them with "
                             "trainer.parallel.build.build_stages")  # fmt: skip
        self.stages = [_Stage(module, index, total, device, group=self.group, store=self.store)
                       for module, index in zip(modules, ids)]  # fmt: skip
        self._factor = torch.ones((), device=device)  # the step's loss scale, read by the schedule's loss_fn
        self._built: Optional[tuple[tuple, object]] = None

    def _loss_fn(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.loss(logits, target) * self._factor

    def _schedule(self, *, training: bool, shape: tuple[int, int], documents: bool):
        """The schedule for this kind of step, built once: a new one infers every stage's shapes again, with a
        forward and backward of its own (rebuilt only when the batch's shape or the kind of step changes)."""
        key = (training, shape, documents)
        if self._built is None or self._built[0] != key:
            cls = SCHEDULES[self.schedule]
            stages = self.stages[0] if self.schedule in SINGLE_STAGE else self.stages
            self._built = (key, cls(stages, self.microbatches, loss_fn=self._loss_fn, scale_grads=False))
        return self._built[1]

    @torch.no_grad()
    def logits(self, tokens: torch.Tensor, *, vocab_size: int, cache: Optional[KVCache] = None) -> torch.Tensor:
        """Forward only (evaluation): tokens (B, T), the same on every rank of the pipeline, -> fp32 logits
        (B, T, V) on every rank. ``cache``: this rank's decoding cache (its own blocks' layers), which its
        stages write and advance as ``Transformer.forward`` does; the batch then runs whole, as the cache's
        rows are the batch's.

        Not a torch schedule: a schedule fixes its micro-batches' shapes when it is built (inferring them with
        a forward of its own), and evaluation's lengths change with every request and every decoded token.
        Here each activation travels with a small header (dtype and shape), the batch runs as up to
        ``pp_microbatches`` micro-batches in the stages' order (sends do not wait, so a stage works on the
        next micro-batch while the one after it works on this one: GPipe's forward), and the last stage
        broadcasts the logits."""
        rows = tokens.shape[0]
        count = 1 if cache is not None else max(k for k in range(1, min(rows, self.microbatches) + 1) if rows % k == 0)
        outs, sends = [], []
        mine = {stage.stage_index for stage in self.stages}
        for chunk in tokens.chunk(count):
            for stage in self.stages:
                index = stage.stage_index
                if stage.is_first:
                    x = chunk
                elif index - 1 in mine:  # the stage before is this rank's too (a V's turn)
                    x = outs.pop()
                else:
                    x = _recv(self.group, src=self._owners[index - 1], device=self.device)
                out = stage.submod(x) if cache is None else stage.submod(x, cache=cache)
                if stage.is_last or index + 1 in mine:
                    outs.append(out)
                else:
                    sends += _send(out, self.group, dst=self._owners[index + 1])
        for work in sends:
            work.wait()
        if self.last:
            out = torch.cat([(o.full_tensor() if isinstance(o, DTensor) else o).float() for o in outs]).contiguous()
        else:
            out = torch.empty(*tokens.shape, vocab_size, dtype=torch.float32, device=self.device)
        dist.broadcast(out, group=self.group, group_src=self.last_rank)
        return out

    def loss_sum(self, batch: dict[str, torch.Tensor], *, scale: Optional[torch.Tensor]) -> torch.Tensor:
        """Sum of cross-entropy over the batch's valid labels (fp32), on every stage. With ``scale`` the
        schedule backpropagates each micro-batch's sum times ``scale`` (training); without, forward only."""
        rows = batch["inputs"].shape[0]
        if rows % self.microbatches:
            raise ValueError(f"parallel.pp_microbatches={self.microbatches} does not divide the {rows} sequences of a "
                             "micro-batch (trainer.micro_batch_size): choose a divisor")  # fmt: skip
        queued_before = self.store.total if self.store is not None else 0
        self._factor = scale if scale is not None else torch.ones((), device=self.device)
        schedule = self._schedule(training=scale is not None, shape=tuple(batch["inputs"].shape),
                                  documents="documents" in batch)  # fmt: skip
        run = schedule.step if scale is not None else schedule.eval
        inputs = (batch["inputs"],) if self.first else ()
        # The schedule's own list of each micro-batch's loss (loss_fn may also run while it infers shapes).
        losses: list[torch.Tensor] = []
        # Packed documents: every stage's blocks need the ids; the schedule cuts them into micro-batches as
        # it cuts the inputs, and hands each stage's forward its share.
        documents = {"documents": batch["documents"]} if "documents" in batch else {}
        run(*inputs, **documents, **({"target": batch["labels"], "losses": losses} if self.last else {}))
        if self.store is not None and scale is not None:
            _check_split(self.store, queued_before=queued_before)
        plain = [(l.full_tensor() if isinstance(l, DTensor) else l).detach() for l in losses]  # TP: loss_parallel's
        local = torch.stack(plain).sum() / self._factor if plain else torch.zeros((), device=self.device)
        dist.all_reduce(local, group=self.group)  # the sum lives on the last stage; every stage reports it
        return local


_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
_HEADER = 8  # dtype index, ndim, up to six sizes


def _send(x: torch.Tensor, group: dist.ProcessGroup, *, dst: int) -> list:
    """Send ``x`` to pipeline rank ``dst``, preceded by its dtype and shape; the pending works."""
    header = torch.zeros(_HEADER, dtype=torch.int64, device=x.device)
    header[0], header[1] = _DTYPES.index(x.dtype), x.dim()
    header[2:2 + x.dim()] = torch.tensor(x.shape)
    payload = x.contiguous()
    return [dist.isend(header, group=group, group_dst=dst), dist.isend(payload, group=group, group_dst=dst)]


def _recv(group: dist.ProcessGroup, *, src: int, device: torch.device) -> torch.Tensor:
    """What ``_send`` sent from pipeline rank ``src``."""
    header = torch.empty(_HEADER, dtype=torch.int64, device=device)
    dist.recv(header, group=group, group_src=src)
    shape = header[2:2 + int(header[1])].tolist()
    x = torch.empty(shape, dtype=_DTYPES[int(header[0])], device=device)
    dist.recv(x, group=group, group_src=src)
    return x


class _Stage(PipelineStage):
    """A stage whose forwards note ``store`` (model/ops/deferred.py), so that their backwards queue the weight
    gradients there, and whose schedule's weight step runs what one backward queued (``dw_builder``).

    Only the forwards of the schedule's micro-batches defer: the forward and backward a schedule runs to infer
    the stages' shapes (before its first step) compute their gradients at once and drop them, as they should.
    ``forward_maybe_with_nosync`` is the one method every schedule's forward goes through (torch 2.5 to 2.13);
    ``_check_split`` fails loudly should a torch release stop calling it."""

    def __init__(self, module: nn.Module, index: int, total: int, device: torch.device, *,
                 group: dist.ProcessGroup, store: Optional[WeightGradStore]):  # fmt: skip
        super().__init__(module, index, total, device, group=group,
                         dw_builder=store.flush if store is not None else None)  # fmt: skip
        self.store = store

    def forward_maybe_with_nosync(self, *args, **kwargs):
        with deferring(self.store):
            return super().forward_maybe_with_nosync(*args, **kwargs)


def _check_split(store: WeightGradStore, *, queued_before: int) -> None:
    """After a training step of a zero-bubble schedule: every queued weight gradient ran, and some were
    queued at all (otherwise the schedule ran unsplit backwards: a torch that no longer calls the override)."""
    if len(store):
        raise RuntimeError(f"the pipeline schedule left {len(store)} weight gradients uncomputed")
    if store.total == queued_before:
        raise RuntimeError("a zero-bubble pipeline step deferred no weight gradient: this torch's PipelineStage no "
                           "longer runs forwards through forward_maybe_with_nosync (trainer/parallel/pipeline.py)")
