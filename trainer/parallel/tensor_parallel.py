"""Tensor + sequence parallelism (Megatron, Korthikanti et al. 2022) through hand-written backward functions.

Layout on the ``tp`` axis (t ranks), B batch, T sequence, d model width, F SwiGLU hidden:

    residual stream, RMSNorms          (B, T/t, d)    sequence-sharded ("SP" regions)
    q/k/v, w1/w3 outputs, attention     (B, T, ·/t)    split by head / hidden unit ("TP" regions)
    wo, w2                              partial sums over the t ranks, reduce-scattered back to (B, T/t, d)

Parameters stay DTensors with the placements of torch's Colwise/Rowwise/SequenceParallel styles
(q/k/v/w1/w3 Shard(0), wo/w2 Shard(1), norms Replicate), so distributed checkpoints reshard freely and
FSDP2 shards them over the data-parallel axes as usual. The Functions below work on their local shards
(``DTensor.to_local()``) with explicit collectives, which is what lets backward choose what to save and
when to communicate:

* a column-parallel projection saves its input's sequence *shard* (B, T/t, d), not the gathered
  (B, T, d), and all-gathers it again in backward (this is where sequence parallelism saves memory);
* backward launches that all-gather and the input-gradient reduce-scatter asynchronously and computes the
  independent GEMM while they run (Megatron's ``LinearWithGradAccumulationAndAsyncCommunication``
  ordering): launch -> independent compute -> wait.

Scheduling assumption on CUDA: ``async_op=True`` collectives run on the process group's own stream, so
the GEMM queued after the launch overlaps them as long as the communication kernel gets its SMs first.
Megatron sets ``CUDA_DEVICE_MAX_CONNECTIONS=1`` so that the kernels reach the device in the order they
were issued (communication first); without it the GEMM can occupy every SM and the overlap shrinks. On
gloo (CPU) the collective runs on gloo's own thread while the main thread computes.

The embedding and the output head keep torch's DTensor styles (they are outside the transformer layer):
the vocabulary-parallel embedding returns the sequence shard as a plain tensor, and the head takes it
back as ``Shard(1)`` for the vocabulary-parallel cross-entropy.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed import ProcessGroup
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Placement, Replicate, Shard, distribute_tensor
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

from compat import all_gather_single, reduce_scatter_single
from model.llama import Attention, FeedForward, RMSNorm, Transformer
from model.ops.amp import autocast_off, matmul_inputs, no_autocast_backward
from model.ops.deferred import deferral
from model.ops.keep import Keep
from model.ops.linear import input_grad, weight_grad_or_defer
from model.ops.swiglu import backward_activations, gate, gate_backward, kept_activations

# ----------------------------------------------------------------------------------------------------
# Sequence-dimension collectives. Activations are (B, T, ...) with the sequence on dim 1; the c10d
# collectives concatenate along dim 0, so the rank index is moved to the front and back.


class _Pending:
    """An async collective in flight: ``wait()`` returns its result in the (B, T, ...) layout."""

    def __init__(self, work, buffer: torch.Tensor, finish, *, source: torch.Tensor):
        self._work, self._buffer, self._finish = work, buffer, finish
        self._source = source  # the collective reads it until done: keep it alive (it may be a temporary copy)

    def wait(self) -> torch.Tensor:
        self._work.wait()
        self._work = self._source = None  # no work handle outlives its collective
        return self._finish(self._buffer)


class _Done:
    """A collective already waited on (overlap off): ``wait()`` just returns the result."""

    def __init__(self, result: torch.Tensor):
        self._result = result

    def wait(self) -> torch.Tensor:
        return self._result


def _launched(pending: _Pending, *, overlap: bool):
    """``pending`` as is when overlapping, else waited at once (to measure what the overlap is worth)."""
    return pending if overlap else _Done(pending.wait())


def gather_sequence(x_shard: torch.Tensor, group: ProcessGroup) -> _Pending:
    """Launch the all-gather (B, T/t, ...) -> (B, T, ...) along the sequence; ``.wait()`` for the result."""
    t = dist.get_world_size(group)
    # The collectives concatenate along dim 0: (t * B, T/t, ...), rank r's shard in rows r*B .. (r+1)*B.
    buffer = x_shard.new_empty((t * x_shard.shape[0], *x_shard.shape[1:]))
    source = x_shard.contiguous()
    work = all_gather_single(buffer, source, group=group, async_op=True)
    return _Pending(work, buffer, lambda buf: buf.unflatten(0, (t, -1)).movedim(0, 1).flatten(1, 2), source=source)


def scatter_sequence(x_full: torch.Tensor, group: ProcessGroup) -> _Pending:
    """Launch the reduce-scatter (B, T, ...) partial sums -> (B, T/t, ...) totals; ``.wait()`` for the result."""
    # The sequence length is a multiple of t (checked at start-up: trainer.parallel.dims.check_tp_divides), and every
    # tensor scattered here has the length of a gathered one.
    t = dist.get_world_size(group)
    chunks = x_full.unflatten(1, (t, -1)).movedim(1, 0).flatten(0, 1)  # (t * B, T/t, ...), rank r's in block r
    out = x_full.new_empty((x_full.shape[0], *chunks.shape[1:]))
    work = reduce_scatter_single(out, chunks, group=group, async_op=True)
    return _Pending(work, out, lambda buf: buf, source=chunks)


# ----------------------------------------------------------------------------------------------------
# Autograd Functions on local shards.


class _SumGradOverGroup(torch.autograd.Function):
    """Identity forward; backward all-reduces the gradient over the group, in at least fp32.

    A replicated weight applied to a sequence shard (the RMSNorm gain) gets from each rank the gradient
    of that rank's tokens only; the full gradient is their sum. Under bf16 (FSDP's bf16 parameters) the
    per-rank gradients are bf16; a bf16 all-reduce would round after every partial sum of the ring (t - 1
    roundings at tp=t), so they are summed in fp32, as Megatron sums its sequence-parallel norm
    gradients, and rounded once on the way back to the weight's dtype. Saves nothing.
    """

    @staticmethod
    def forward(ctx, weight: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
        ctx.group = group
        return weight.view_as(weight)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        # A fresh fp32 buffer: all_reduce is in place, and the incoming gradient may be shared.
        total = grad.to(torch.promote_types(grad.dtype, torch.float32), copy=True)
        dist.all_reduce(total, group=ctx.group)
        return total.to(grad.dtype), None


class _ColumnParallelFromSequence(torch.autograd.Function):
    """y_i = gather(x) W_i^T for several column-parallel weights sharing one gathered input.

    Shapes: x (B, T/t, d) this rank's sequence shard; W_i (F_i/t, d) this rank's output rows;
    y_i (B, T, F_i/t).

        forward:  X = all_gather_T(x);  y_i = X W_i^T
        input:    dx = reduce_scatter_T(sum_i dy_i W_i)
        weight:   dW_i = dy_i^T X          summed over the B*T tokens

    Saved: x (the shard: B*T/t*d elements, not the gathered B*T*d) and the W_i.
    Backward order: launch all-gather(x) -> dX = sum_i dy_i W_i (needs no X) -> wait -> launch
    reduce-scatter(dX) -> dW_i = dy_i^T X (needs no dx) -> wait.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: ProcessGroup, overlap: bool, *weights: torch.Tensor):
        x_full = gather_sequence(x, group).wait()
        outs = tuple(F.linear(x_full, w) for w in weights)
        del x_full
        ctx.group, ctx.overlap, ctx.defer = group, overlap, deferral(*weights)  # model/ops/deferred.py
        ctx.save_for_backward(x, *weights)
        return outs

    @staticmethod
    @no_autocast_backward
    def backward(ctx, *douts: torch.Tensor):
        x, *weights = ctx.saved_tensors
        gathering = _launched(gather_sequence(x, ctx.group), overlap=ctx.overlap)
        dx_full = sum(input_grad(dy, w) for dy, w in zip(douts, weights))  # (B, T, d), overlaps the gather
        x_full = gathering.wait()
        scattering = _launched(scatter_sequence(dx_full, ctx.group), overlap=ctx.overlap)
        del dx_full
        # overlaps the reduce-scatter
        dweights = [weight_grad_or_defer(dy, x_full, defer=ctx.defer, index=i) if ctx.needs_input_grad[3 + i] else None
                    for i, dy in enumerate(douts)]  # fmt: skip
        del x_full
        return (scattering.wait(), None, None, *dweights)


class _RowParallelToSequence(torch.autograd.Function):
    """y = reduce_scatter_T(h W^T): a row-parallel projection back into the sequence-sharded stream.

    Shapes: h (B, T, F/t) split by hidden unit; W (d, F/t) this rank's input columns; y (B, T/t, d).

        forward:  y  = reduce_scatter_T(h W^T)       (each rank's h W^T is a partial sum over F)
        input:    dY = all_gather_T(dy);  dh = dY W
        weight:   dW = dY^T h

    Saved: h and W. Both gradients need the gathered dY, so there is no independent compute to overlap
    the all-gather with here (Megatron's row-parallel backward waits on it too).
    """

    @staticmethod
    def forward(ctx, h: torch.Tensor, weight: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
        y = scatter_sequence(F.linear(h, weight), group).wait()
        ctx.group, ctx.defer = group, deferral(weight)
        ctx.save_for_backward(h, weight)
        return y

    @staticmethod
    @no_autocast_backward
    def backward(ctx, dy: torch.Tensor):
        h, weight = ctx.saved_tensors
        dy_full = gather_sequence(dy, ctx.group).wait()
        dw = weight_grad_or_defer(dy_full, h, defer=ctx.defer, index=0) if ctx.needs_input_grad[1] else None
        return input_grad(dy_full, weight), dw, None


class _SequenceParallelSwiGLU(torch.autograd.Function):
    """``model.ops.swiglu`` with w1/w3 column-parallel and w2 row-parallel, from and to sequence shards.

    Shapes: x (B, T/t, d); W1, W3 (F/t, d); W2 (d, F/t); a, b, s, h (B, T, F/t); y (B, T/t, d).

        forward:  X = all_gather_T(x);  a = X W1^T,  b = X W3^T;  s = silu(a),  h = s * b
                  y = reduce_scatter_T(h W2^T)
        input:    dY = all_gather_T(dy);  dh = dY W2;  db = dh * s,  da = dh * b * silu'(a)
                  dx = reduce_scatter_T(da W1 + db W3)
        weight:   dW2 = dY^T h,  dW1 = da^T X,  dW3 = db^T X

    Saved: x (the shard), the weights, and what ``model.ops.swiglu.kept_activations`` keeps for ``keep``
    (the plain op's one rule: a, b; with ``Keep.all`` also s and h; with ``Keep.ffn_input`` nothing more,
    a and b rerun from the gathered X in backward).
    Backward order: launch all-gather(dy) and all-gather(x) -> recompute s, h (overlaps both) -> wait dY
    -> dW2, dh, da, db, dx_full (overlap the x gather) -> wait X -> launch reduce-scatter(dx_full) ->
    dW1, dW3 (overlap it) -> wait. With ``Keep.ffn_input`` X is needed first: wait X -> a, b, s, h
    (overlap the dy gather) -> wait dY -> as above.
    """

    @staticmethod
    def forward(ctx, x, w1, w3, w2, group: ProcessGroup, keep: Keep, overlap: bool) -> torch.Tensor:
        x_full = gather_sequence(x, group).wait()
        a, b = F.linear(x_full, w1), F.linear(x_full, w3)
        del x_full
        s, h = gate(a, b)
        y = scatter_sequence(F.linear(h, w2), group).wait()
        ctx.group, ctx.keep, ctx.overlap, ctx.defer = group, keep, overlap, deferral(w1, w3, w2)
        ctx.save_for_backward(x, w1, w3, w2, *kept_activations(keep, a=a, b=b, s=s, h=h))
        return y

    @staticmethod
    @no_autocast_backward
    def backward(ctx, dy: torch.Tensor):
        x, w1, w3, w2, *kept = ctx.saved_tensors
        dy_gathering = _launched(gather_sequence(dy, ctx.group), overlap=ctx.overlap)
        x_gathering = _launched(gather_sequence(x, ctx.group), overlap=ctx.overlap)
        x_full = None

        def rerun_up() -> tuple[torch.Tensor, torch.Tensor]:  # Keep.ffn_input: a, b from the gathered input
            nonlocal x_full
            x_full = x_gathering.wait()
            return F.linear(x_full, w1), F.linear(x_full, w3)

        a, b, s, h = backward_activations(ctx.keep, kept, rerun_up=rerun_up)
        del kept
        dy_full = dy_gathering.wait()
        need_w1, need_w3, need_w2 = ctx.needs_input_grad[1:4]
        dw2 = weight_grad_or_defer(dy_full, h, defer=ctx.defer, index=2) if need_w2 else None
        del h
        da, db = gate_backward(input_grad(dy_full, w2), a=a, b=b, s=s)
        del dy_full, a, b, s
        dx_full = input_grad(da, w1) + input_grad(db, w3)
        if x_full is None:
            x_full = x_gathering.wait()
        scattering = _launched(scatter_sequence(dx_full, ctx.group), overlap=ctx.overlap)
        del dx_full
        dw1 = weight_grad_or_defer(da, x_full, defer=ctx.defer, index=0) if need_w1 else None
        dw3 = weight_grad_or_defer(db, x_full, defer=ctx.defer, index=1) if need_w3 else None
        return scattering.wait(), dw1, dw3, dw2, None, None, None


def column_parallel_from_sequence(x: torch.Tensor, weights: tuple[torch.Tensor, ...], *, group: ProcessGroup,
                                  overlap: bool) -> tuple[torch.Tensor, ...]:  # fmt: skip
    """``_ColumnParallelFromSequence`` under autocast's matmul rule (``model.ops.amp``): (B, T/t, d) -> (B, T, F_i/t)."""
    x, *weights = matmul_inputs(x, *weights)
    with autocast_off(x.device.type):
        return _ColumnParallelFromSequence.apply(x, group, overlap, *weights)


def row_parallel_to_sequence(h: torch.Tensor, weight: torch.Tensor, *, group: ProcessGroup) -> torch.Tensor:
    """``_RowParallelToSequence`` under autocast's matmul rule: (B, T, F/t) -> (B, T/t, d)."""
    h, weight = matmul_inputs(h, weight)
    with autocast_off(h.device.type):
        return _RowParallelToSequence.apply(h, weight, group)


def sequence_parallel_swiglu(x: torch.Tensor, w1: torch.Tensor, w3: torch.Tensor, w2: torch.Tensor, *,
                             group: ProcessGroup, keep: Keep, overlap: bool) -> torch.Tensor:  # fmt: skip
    """``_SequenceParallelSwiGLU`` under autocast's matmul rule: (B, T/t, d) -> (B, T/t, d)."""
    x, w1, w3, w2 = matmul_inputs(x, w1, w3, w2)
    with autocast_off(x.device.type):
        return _SequenceParallelSwiGLU.apply(x, w1, w3, w2, group, keep, overlap)


# ----------------------------------------------------------------------------------------------------
# The model's modules in their tensor-parallel form: subclasses of the plain ones, built from them and
# holding the same child Linear modules and Parameters (now DTensors), so parameter names, state dicts and
# checkpoints are those of the unsharded model, and so is what each module keeps for backward (its
# ``keep``, fixed when the model was built). They replace only the pieces that communicate; the forward
# itself is the plain module's (``Attention.forward`` around ``project_qkv``/``attend``/``project_out``,
# ``RMSNorm.forward`` around ``gain``).


def _adopt(tp_module: nn.Module, plain: nn.Module, *attributes: str) -> None:
    """Give ``tp_module`` the plain module's children (the same objects) and the named plain attributes."""
    nn.Module.__init__(tp_module)  # not the plain __init__: that would build new Linear modules
    for name, child in plain.named_children():
        setattr(tp_module, name, child)
    for name in attributes:
        setattr(tp_module, name, getattr(plain, name))


class SequenceParallelRMSNorm(RMSNorm):
    """RMSNorm on a sequence shard (B, T/t, d); the gain's gradient is summed over the tp ranks."""

    def __init__(self, norm: RMSNorm, *, group: ProcessGroup):
        _adopt(self, norm, "eps", "keep")
        self.weight = norm.weight  # the same Parameter: same name, same tensor
        self.tp_group = group

    def gain(self) -> torch.Tensor:
        return _SumGradOverGroup.apply(self.weight.to_local(), self.tp_group)


class TensorParallelAttention(Attention):
    """(B, T/t, d) -> (B, T/t, d): q/k/v column-parallel from the gathered sequence, RoPE and attention on
    this rank's heads (the plain ``attend``), wo row-parallel back to the sequence shard. Decoding with a
    key/value cache is not supported under TP (evaluation decodes without one there)."""

    def __init__(self, attn: Attention, *, group: ProcessGroup, overlap: bool):
        _adopt(self, attn, "head_dim", "backend", "keep")
        self.tp_group, self.overlap = group, overlap

    def project_qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        weights = (self.wq.weight.to_local(), self.wk.weight.to_local(), self.wv.weight.to_local())
        return column_parallel_from_sequence(x, weights, group=self.tp_group, overlap=self.overlap)

    def project_out(self, out: torch.Tensor) -> torch.Tensor:
        return row_parallel_to_sequence(out, self.wo.weight.to_local(), group=self.tp_group)


class TensorParallelFeedForward(FeedForward):
    """(B, T/t, d) -> (B, T/t, d): SwiGLU with its hidden units split over the tp ranks. Its forward is the
    fused op itself, here its sequence-parallel form."""

    def __init__(self, ffn: FeedForward, *, group: ProcessGroup, overlap: bool):
        _adopt(self, ffn, "keep")
        self.tp_group, self.overlap = group, overlap

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w1, w3, w2 = (lin.weight.to_local() for lin in (self.w1, self.w3, self.w2))
        return sequence_parallel_swiglu(x, w1, w3, w2, group=self.tp_group, keep=self.keep, overlap=self.overlap)


def _distribute_parameters(module: nn.Module, *, mesh: DeviceMesh, placement: Placement) -> None:
    for name, param in list(module.named_parameters(recurse=False)):
        dparam = nn.Parameter(distribute_tensor(param, mesh, [placement]), requires_grad=param.requires_grad)
        module.register_parameter(name, dparam)


def apply_tensor_parallel(model: Transformer, *, tp_mesh: DeviceMesh, overlap: bool = True) -> None:
    """Shard every transformer layer, the embedding and the output head over ``tp_mesh`` (see module doc).

    Args:
        overlap: run the independent GEMMs of backward while the collectives are in flight; False waits on
            each collective as soon as it is launched (the same arithmetic, for measuring the overlap).
    """
    group = tp_mesh.get_group()
    plan = {
        # Vocabulary-parallel embedding; its output reduce-scattered to the sequence shard, returned as a
        # plain tensor for the blocks.
        "tok_embeddings": RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(1)),
        # Logits left split over the vocabulary (Shard(-1)) for loss_parallel: (B, T, V) is never gathered.
        "output": ColwiseParallel(input_layouts=Shard(1), output_layouts=Shard(-1), use_local_output=False),
    }
    # A pipeline stage has the embedding only if it is the first, the head only if it is the last.
    parallelize_module(model, tp_mesh, {name: style for name, style in plan.items() if getattr(model, name) is not None})
    if model.tok_embeddings is not None:
        model.tok_embeddings.register_forward_pre_hook(_keep_grad_sharded)
    for block in model.layers.values():
        attn, ffn = block.attention, block.feed_forward
        for lin in (attn.wq, attn.wk, attn.wv, ffn.w1, ffn.w3):
            _distribute_parameters(lin, mesh=tp_mesh, placement=Shard(0))
        for lin in (attn.wo, ffn.w2):
            _distribute_parameters(lin, mesh=tp_mesh, placement=Shard(1))
        block.attention = TensorParallelAttention(attn, group=group, overlap=overlap)
        block.feed_forward = TensorParallelFeedForward(ffn, group=group, overlap=overlap)
        block.attention_norm = _sequence_parallel_norm(block.attention_norm, mesh=tp_mesh)
        block.ffn_norm = _sequence_parallel_norm(block.ffn_norm, mesh=tp_mesh)
    if model.norm is not None:
        model.norm = _sequence_parallel_norm(model.norm, mesh=tp_mesh)


def _keep_grad_sharded(embedding: nn.Module, args) -> None:
    """Give the vocabulary-parallel embedding's gradient the weight's placement (Shard(0)).

    DTensor's embedding backward returns a Replicate gradient: every TP rank would keep the whole (V, d)
    gradient, t times its shard (the planner's real-run test found it). Slicing it back to this rank's
    rows moves no data. A forward pre-hook, because the hook must sit on the parameter that exists when
    training runs (``to_empty`` replaces the meta ones); under FSDP, FSDP2 redistributes the gradient to
    the TP placement itself and this hook changes nothing.
    """
    weight = embedding.weight
    if getattr(weight, "_grad_to_weight_placement", None) is not None or not isinstance(weight, DTensor):
        return

    def to_weight_placement(grad: torch.Tensor) -> torch.Tensor:
        if isinstance(grad, DTensor) and tuple(grad.placements) != tuple(weight.placements):
            return grad.redistribute(weight.device_mesh, weight.placements)
        return grad

    weight._grad_to_weight_placement = weight.register_hook(to_weight_placement)


def _sequence_parallel_norm(norm: RMSNorm, *, mesh: DeviceMesh) -> SequenceParallelRMSNorm:
    _distribute_parameters(norm, mesh=mesh, placement=Replicate())
    return SequenceParallelRMSNorm(norm, group=mesh.get_group())
