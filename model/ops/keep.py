"""``Keep``: what a hand-written backward keeps from its forward; the rest it recomputes (LLaMA paper §2.4).

One value per module, given when the model is built (``Transformer(args, keep=...)``) and passed to every op
as an argument: the activation-checkpointing policy (trainer/parallel/activation_checkpointing.py) is the one
place that chooses it, and nothing changes it afterwards. Every level runs the same arithmetic in the same
order, so outputs and gradients are bitwise equal across levels (on CPU); only memory and recompute differ.

The levels, from most memory to least, and how each op reads them:

==================  ==========================================  ==========================  =====================
level               rms_norm                                    attention_core              swiglu
==================  ==========================================  ==========================  =====================
all                 x_hat (its normalised input)                expanded k', v' (CUDA GQA)  x, a, b, s, h
matmul_outputs      x (recomputes x_hat = x * rrms)             k, v (re-expands)           x, a, b (recomputes s, h)
ffn_input           as matmul_outputs                           as matmul_outputs           x only (reruns a, b)
==================  ==========================================  ==========================  =====================

``all`` is what plain autograd would keep; ``matmul_outputs`` is the paper's "selective" choice; ``ffn_input``
also drops the feed-forward's two largest activations for two rerun matmuls. ``linear`` keeps its input
and weight at every level (nothing element-wise to recompute).
"""

from __future__ import annotations

import enum


class Keep(str, enum.Enum):
    all = "all"
    matmul_outputs = "matmul_outputs"
    ffn_input = "ffn_input"

    @property
    def recomputes_elementwise(self) -> bool:
        """Whether element-wise intermediates are recomputed in backward rather than kept."""
        return self != Keep.all
