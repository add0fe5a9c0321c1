"""Weight gradients computed later than input gradients: the split zero-bubble pipeline schedules need.

A backward pass does two kinds of work per matmul y = x W^T: the input gradient dx = dy W, which the layer
before is waiting for (on a pipeline, the previous stage), and the weight gradient dW = dy^T x, which only
the optimizer step needs. Zero-bubble schedules (Qi et al. 2024, "Zero Bubble Pipeline Parallelism") run
the first at once and move the second into the pipeline's idle slots. torch's pipelining finds the split
by cutting the autograd graph, which breaks on compiled stages (pytorch #161904, #162511); our Functions
already compute the two as separate statements, so they defer the second themselves:

    forward, inside ``deferring(store)``:   each Function notes ``deferral(*weights)`` in its context: the
                store and each weight's gradient edge (where autograd would send dW)
    backward:   dx at once; for each weight, ``store.put(edge, lambda: dW)`` instead of returning dW
    later:      ``store.flush()`` -> the queued closures, for the schedule's weight step; running them
                computes every dW and hands it to autograd at the edge (``torch.autograd.backward``), which
                accumulates it into ``.grad`` through whatever lies between (an autocast cast, a DTensor's
                ``to_local``) exactly as returning it from backward would have.

Why the edge, taken at forward, and not the weight tensor backward unpacks: under saved-tensor hooks (block
checkpointing recomputes and unpacks a detached copy) the unpacked weight is a new tensor that reaches the
parameter's gradient accumulator only through a weak reference; once the micro-batch's graph is freed, after
its input-gradient backward, nothing else may hold that accumulator, and a gradient handed to the copy lands
on the copy. Measured before this rule: under ZB1P with checkpointed blocks the first stage lost the last
micro-batch's SwiGLU weight gradients. The edge holds the accumulator (or the cast's node) until the weight
step.

The same products in the same order, so the gradients are bitwise those of an ordinary backward
(tests/model/test_deferred_weight_grads.py). The queued closures hold what dW needs (dy and x) until they
run: that is the memory zero-bubble schedules trade for their smaller bubble.

Which forward defers is chosen by a context (like autocast), entered by whoever runs the stage: the model
carries no pipeline state, and a forward outside ``deferring`` (evaluation, a plain step) is unchanged. The
store is noted at forward time because backward may run on another thread (CUDA's autograd worker), where
the context is not visible. Inside a ``torch.compile``d graph nothing defers (a closure queued from a traced
backward cannot exist): trainer/parallel/parallelize.py leaves the deferring Functions uncompiled under a
zero-bubble schedule.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Callable, Iterator, Optional

import torch
from torch.autograd.graph import GradientEdge, get_gradient_edge

_STORE: contextvars.ContextVar[Optional["WeightGradStore"]] = contextvars.ContextVar("weight_grad_store", default=None)


class WeightGradStore:
    """The weight-gradient closures queued by backward passes, in the order they were queued."""

    def __init__(self) -> None:
        self._queued: list[tuple[GradientEdge, Callable[[], torch.Tensor]]] = []
        self.total = 0
        """Closures ever queued (a check that deferral happened at all)."""

    def put(self, edge: GradientEdge, compute: Callable[[], torch.Tensor]) -> None:
        """Queue ``compute() -> dW`` for the weight whose gradient edge is ``edge``."""
        self._queued.append((edge, compute))
        self.total += 1

    def __len__(self) -> int:
        return len(self._queued)

    def flush(self) -> Callable[[], None]:
        """Take everything queued so far (one micro-batch's backward): a callable that computes those weight
        gradients and accumulates them, to be run once, later."""
        queued, self._queued = self._queued, []

        def run() -> None:
            if queued:
                edges = [edge for edge, _ in queued]
                grads = [compute() for _, compute in queued]
                queued.clear()  # frees the saved dy and x as soon as their products exist
                torch.autograd.backward(edges, grads)

        return run


@contextlib.contextmanager
def deferring(store: Optional[WeightGradStore]) -> Iterator[None]:
    """Forwards run inside defer their weight gradients to ``store`` (None: compute them at once)."""
    token = _STORE.set(store)
    try:
        yield
    finally:
        _STORE.reset(token)


def _current_store() -> Optional[WeightGradStore]:
    """The store forwards defer to: None outside ``deferring`` and under compile."""
    if torch.compiler.is_compiling():
        return None
    return _STORE.get()


class Deferral:
    """What a Function's forward notes so that its backward can defer its weights' gradients: the store and,
    per weight in the order given to ``deferral``, the gradient edge dW goes to (None: needs no gradient)."""

    def __init__(self, store: WeightGradStore, weights: tuple[torch.Tensor, ...]) -> None:
        self.store = store
        self.edges = tuple(get_gradient_edge(w) if w.requires_grad else None for w in weights)

    def put(self, index: int, compute: Callable[[], torch.Tensor]) -> None:
        """Queue ``compute() -> dW`` for the ``index``-th weight."""
        edge = self.edges[index]
        assert edge is not None, "queued a gradient for a weight that needs none"  # noqa: S101
        self.store.put(edge, compute)


def deferral(*weights: torch.Tensor) -> Optional[Deferral]:
    """For a Function's forward, given the weights as it received them: where its backward defers their
    gradients, or None (compute them at once: outside ``deferring`` or under compile)."""
    store = _current_store()
    return None if store is None else Deferral(store, weights)
