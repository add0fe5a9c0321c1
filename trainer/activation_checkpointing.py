"""Activation-checkpointing policies: what each transformer block keeps for backward, and how many bytes.

One small class per policy, registered under its ``ACMode`` value. Each applies itself to a model (after
tensor parallelism, before compile and FSDP: trainer/parallelize.py) and states the bytes a layer keeps,
so adding a policy is adding a class here (and a member of ``ACMode``) and its test.

Every policy runs the model's hand-written backward (``model.ops``); they differ only in what is kept, so
the arithmetic and the losses are the same in all of them (bitwise on CPU, to rounding on CUDA, where the
flash backward's atomic adds reorder sums; tested in tests/trainer/test_activation_checkpointing.py and
test_bf16.py). Whole-block recomputation uses non-reentrant checkpointing, which composes with FSDP2 and
the TP layers and keeps parameter names unchanged in state dicts, so checkpoints move freely between
policies.

Bytes per layer, derived for this LLaMA layer in the style of Korthikanti et al. 2022, Table 2, and checked
against the bytes counted by ``model.ops.memory.saved_bytes`` (tests/trainer/test_activation_checkpointing.py;
the derivation is written out in docs/activation_memory.md). Per token, with t tensor-parallel ranks
(sequence parallelism always on, so every term is split t ways); e = bytes per activation element (the
compute dtype), c = bytes per statistic (RMSNorm's 1/rms and the attention log-sum-exp, kept in at least
fp32), h model width, kv = Hkv * D key/value width, F SwiGLU hidden, a query heads:

    selective: (6 e h + 2 e kv + 2 e F + c (2 + a)) / t
        2 RMSNorm inputs (e h each) + 2 rms (c); the normed inputs of the q/k/v and w1/w3 projections
        (e h each, saved once though three projections use the first); q after RoPE (e h), k and v
        (e kv each); the attention output (e h, shared by the core and wo); the log-sum-exp (c a);
        SwiGLU's two linear outputs (e F each).
    selective_ffn: (6 e h + 2 e kv + c (2 + a)) / t
        as selective, without SwiGLU's two linear outputs: backward reruns those two matmuls from the
        kept input (4 h F FLOPs per token, ~1/6 of the layer's forward at LLaMA widths).
    none:      (4 e h + 2 c h + 2 e kv + 4 e F + c (2 + a)) / t
        as selective, but each RMSNorm keeps its normalised input in c instead of its input, and SwiGLU
        also keeps silu(x W1^T) and the gated product (2 e F more).
    full:      e h / t
        the block's input only; the block's forward is rerun in backward.

No term grows with the sequence length beyond the token count: the attention kernel keeps the
log-sum-exp instead of the (a, s, s) probabilities, which is what removes Korthikanti's 5as/h term.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from compat import checkpoint_wrapper
from model.config import ModelArgs
from model.llama import Recomputable, RecomputableFFN, Transformer


class ACMode(str, enum.Enum):
    """The policies by name (``parallel.activation_checkpoint``); a ``str`` enum, as OmegaConf needs."""

    none = "none"  # keep every activation the layer's backward uses, element-wise intermediates included
    selective = "selective"  # keep matmul outputs, recompute the cheap element-wise work (LLaMA paper §2.4)
    # selective, and the feed-forward's two up projections are rerun in backward: its largest activations
    # (2 x F ~ 5.3 h per token) go, for 2 of the layer's 7 matmuls rerun; between selective and full in
    # memory, near torchtitan's per-op policy ("selective op", which keeps every other matmul's output)
    selective_ffn = "selective_ffn"
    full = "full"  # keep only each block's input; recompute the block's forward during backward
    every_k = "every_k"  # full recomputation on every k-th block (parallel.ac_every_k), none on the others


def set_recompute(module: nn.Module, *, recompute: bool, recompute_up: bool = False) -> None:
    """Set the flags of every ``Recomputable`` module (RMSNorm, attention, SwiGLU, their TP forms) under
    ``module``: ``recompute`` on all, ``recompute_up`` on the feed-forwards."""
    for sub in module.modules():
        if isinstance(sub, Recomputable):
            sub.recompute = recompute
        if isinstance(sub, RecomputableFFN):
            sub.recompute_up = recompute_up


@dataclass(frozen=True)
class ACPolicy:
    """A policy: ``apply`` it to a model, ask it what a layer keeps."""

    mode: ClassVar[ACMode]

    def apply(self, model: Transformer) -> None:
        raise NotImplementedError

    def recomputes_block(self, layer: int) -> bool:
        """Whether block ``layer``'s whole forward is rerun in backward."""
        return False

    def recomputed_matmul_flops(self, args: ModelArgs, *, layer: int) -> int:
        """Matmul FLOPs per token (unsharded) that block ``layer`` reruns in backward, whole-block
        recomputation (``recomputes_block``) aside."""
        return 0

    def layer_bytes(self, args: ModelArgs, *, layer: int, batch: int, seq_len: int, tp: int,
                    dtype: torch.dtype = torch.float32) -> int:  # fmt: skip
        """Bytes block ``layer`` keeps for backward on each rank, for a (batch, seq_len) micro-batch."""
        raise NotImplementedError

    def model_bytes(self, args: ModelArgs, *, batch: int, seq_len: int, tp: int, dtype: torch.dtype = torch.float32) -> int:
        """All blocks together (embedding and head excluded)."""
        return sum(self.layer_bytes(args, layer=i, batch=batch, seq_len=seq_len, tp=tp, dtype=dtype)
                   for i in range(args.n_layers))  # fmt: skip


def _sizes(args: ModelArgs, *, batch: int, seq_len: int, tp: int, dtype: torch.dtype) -> tuple[int, ...]:
    if seq_len % tp or args.n_heads % tp or args.n_kv_heads % tp:
        raise ValueError(f"tp={tp} must divide the sequence length and the head counts")
    e = torch.finfo(dtype).bits // 8
    return batch * seq_len, e, max(e, 4), args.dim, args.n_kv_heads * args.head_dim, args.ffn_hidden_dim, args.n_heads


@dataclass(frozen=True)
class KeepAll(ACPolicy):
    mode: ClassVar[ACMode] = ACMode.none

    def apply(self, model: Transformer) -> None:
        set_recompute(model, recompute=False)

    def layer_bytes(self, args, *, layer, batch, seq_len, tp, dtype=torch.float32) -> int:
        tokens, e, c, h, kv, f, a = _sizes(args, batch=batch, seq_len=seq_len, tp=tp, dtype=dtype)
        return tokens * (4 * e * h + 2 * c * h + 2 * e * kv + 4 * e * f + c * (2 + a)) // tp


@dataclass(frozen=True)
class Selective(ACPolicy):
    mode: ClassVar[ACMode] = ACMode.selective

    def apply(self, model: Transformer) -> None:
        set_recompute(model, recompute=True)

    def layer_bytes(self, args, *, layer, batch, seq_len, tp, dtype=torch.float32) -> int:
        tokens, e, c, h, kv, f, a = _sizes(args, batch=batch, seq_len=seq_len, tp=tp, dtype=dtype)
        return tokens * (6 * e * h + 2 * e * kv + 2 * e * f + c * (2 + a)) // tp


@dataclass(frozen=True)
class SelectiveFFN(ACPolicy):
    mode: ClassVar[ACMode] = ACMode.selective_ffn

    def apply(self, model: Transformer) -> None:
        set_recompute(model, recompute=True, recompute_up=True)

    def recomputed_matmul_flops(self, args: ModelArgs, *, layer: int) -> int:
        return 2 * 2 * args.dim * args.ffn_hidden_dim  # a = x W1^T and b = x W3^T, 2 FLOPs per multiply-add

    def layer_bytes(self, args, *, layer, batch, seq_len, tp, dtype=torch.float32) -> int:
        tokens, e, c, h, kv, f, a = _sizes(args, batch=batch, seq_len=seq_len, tp=tp, dtype=dtype)
        return tokens * (6 * e * h + 2 * e * kv + c * (2 + a)) // tp


@dataclass(frozen=True)
class EveryK(ACPolicy):
    """Blocks 0, k, 2k, ... rerun their forward in backward; the others keep everything (``none``)."""

    k: int = 2
    mode: ClassVar[ACMode] = ACMode.every_k

    def recomputes_block(self, layer: int) -> bool:
        return layer % self.k == 0

    def apply(self, model: Transformer) -> None:
        # Outside the blocks (the final norm) the selective choice. Inside, keep everything: in a wrapped
        # block the flag matters only in the recomputed forward, whose saved tensors live for that block's
        # backward alone, so keeping the element-wise intermediates there costs one block's worth of them,
        # briefly, and saves computing them a third time (~1% of the step on the bench model).
        set_recompute(model, recompute=True)
        for name, block in list(model.layers.items()):
            set_recompute(block, recompute=False)
            if self.recomputes_block(int(name)):
                # No RNG is used in the blocks (no dropout), so there is no RNG state to stash and restore.
                model.layers[name] = checkpoint_wrapper(block, preserve_rng_state=False)

    def layer_bytes(self, args, *, layer, batch, seq_len, tp, dtype=torch.float32) -> int:
        if not self.recomputes_block(layer):
            return KeepAll().layer_bytes(args, layer=layer, batch=batch, seq_len=seq_len, tp=tp, dtype=dtype)
        tokens, e, *_ = _sizes(args, batch=batch, seq_len=seq_len, tp=tp, dtype=dtype)
        return tokens * e * args.dim // tp


@dataclass(frozen=True)
class Full(EveryK):
    """Every block reruns its forward in backward; only its input is kept."""

    k: int = 1
    mode: ClassVar[ACMode] = ACMode.full


POLICIES: dict[ACMode, type[ACPolicy]] = {cls.mode: cls for cls in (KeepAll, Selective, SelectiveFFN, Full, EveryK)}


def policy(mode: ACMode, *, every_k: int = 2) -> ACPolicy:
    """The policy object of ``mode`` (``parallel.activation_checkpoint``; ``every_k`` for ``every_k``)."""
    mode = ACMode(mode)
    return EveryK(k=every_k) if mode == ACMode.every_k else POLICIES[mode]()
