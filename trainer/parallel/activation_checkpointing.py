"""Activation-checkpointing policies: what each transformer block keeps for backward, and how many bytes.

One small class per policy, registered under its ``ACMode`` value; adding a policy is adding a class and an
``ACMode`` member here, and its test. A policy is the one owner of what the blocks keep, and decides it
once, at build time (trainer/parallel/build.py):
- ``keep`` / ``keep_final_norm``: what the modules' hand-written backward keeps (``model.ops.Keep``), an
  argument of the model's constructor, so every module, and the tensor-parallel forms built from them
  later, is born with it and nothing sets it afterwards;
- ``wrap``: whole-block recomputation (checkpoint wrappers), applied after tensor parallelism and before
  compile and FSDP (trainer/parallel/parallelize.py), since it wraps the blocks TP produced;
- ``layer_bytes``: the bytes a layer keeps, and what it reruns (the planner prices both).

Every policy runs the model's hand-written backward (``model.ops``); they differ only in what is kept, so
the arithmetic and the losses are the same in all of them (bitwise on CPU, to rounding on CUDA, where the
flash backward's atomic adds reorder sums; tested in tests/trainer/parallel/test_activation_checkpointing.py and
test_bf16.py). Whole-block recomputation uses non-reentrant checkpointing, which composes with FSDP2 and
the TP layers and keeps parameter names unchanged in state dicts, so checkpoints move freely between
policies.

Bytes per layer, derived for this LLaMA layer in the style of Korthikanti et al. 2022, Table 2, and checked
against the bytes counted by ``model.ops.memory.saved_bytes`` (tests/trainer/parallel/test_activation_checkpointing.py;
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
from typing import TYPE_CHECKING, ClassVar

import torch

from compat import checkpoint_wrapper
from model.config import ModelArgs
from model.llama import Transformer
from model.ops.keep import Keep
from trainer.parallel.dims import check_tp_divides

if TYPE_CHECKING:  # the config imports ACMode from here
    from trainer.parallel.config import ACConfig


class ACMode(str, enum.Enum):
    """The policies by name (``parallel.ac.mode``); a ``str`` enum, as OmegaConf needs."""

    none = "none"  # keep every activation the layer's backward uses, element-wise intermediates included
    selective = "selective"  # keep matmul outputs, recompute the cheap element-wise work (LLaMA paper §2.4)
    # selective, and the feed-forward's two up projections are rerun in backward: its largest activations
    # (2 x F ~ 5.3 h per token) go, for 2 of the layer's 7 matmuls rerun; between selective and full in
    # memory, near torchtitan's per-op policy ("selective op", which keeps every other matmul's output)
    selective_ffn = "selective_ffn"
    full = "full"  # keep only each block's input; recompute the block's forward during backward
    every_k = "every_k"  # full recomputation on every k-th block (parallel.ac.every_k), none on the others


@dataclass(frozen=True)
class ACPolicy:
    """A policy: what the model is built to keep, which blocks it wraps, and what a layer keeps in bytes."""

    mode: ClassVar[ACMode]
    keep: ClassVar[Keep]
    """What every block's modules keep for backward (``Transformer(args, keep=...)``)."""
    keep_final_norm: ClassVar[Keep]
    """What the final norm, outside the blocks, keeps."""

    def wrap(self, model: Transformer) -> None:
        """Wrap the blocks whose forward is rerun in backward (``recomputes_block``); none by default."""
        for name, block in list(model.layers.items()):
            if self.recomputes_block(int(name)):
                # No RNG is used in the blocks (no dropout), so there is no RNG state to stash and restore.
                model.layers[name] = checkpoint_wrapper(block, preserve_rng_state=False)

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
    check_tp_divides(tp=tp, args=args, seq_len=seq_len)
    e = torch.finfo(dtype).bits // 8
    return batch * seq_len, e, max(e, 4), args.dim, args.n_kv_heads * args.head_dim, args.ffn_hidden_dim, args.n_heads


@dataclass(frozen=True)
class KeepAll(ACPolicy):
    mode: ClassVar[ACMode] = ACMode.none
    keep: ClassVar[Keep] = Keep.all
    keep_final_norm: ClassVar[Keep] = Keep.all

    def layer_bytes(self, args, *, layer, batch, seq_len, tp, dtype=torch.float32) -> int:
        tokens, e, c, h, kv, f, a = _sizes(args, batch=batch, seq_len=seq_len, tp=tp, dtype=dtype)
        return tokens * (4 * e * h + 2 * c * h + 2 * e * kv + 4 * e * f + c * (2 + a)) // tp


@dataclass(frozen=True)
class Selective(ACPolicy):
    mode: ClassVar[ACMode] = ACMode.selective
    keep: ClassVar[Keep] = Keep.matmul_outputs
    keep_final_norm: ClassVar[Keep] = Keep.matmul_outputs

    def layer_bytes(self, args, *, layer, batch, seq_len, tp, dtype=torch.float32) -> int:
        tokens, e, c, h, kv, f, a = _sizes(args, batch=batch, seq_len=seq_len, tp=tp, dtype=dtype)
        return tokens * (6 * e * h + 2 * e * kv + 2 * e * f + c * (2 + a)) // tp


@dataclass(frozen=True)
class SelectiveFFN(ACPolicy):
    mode: ClassVar[ACMode] = ACMode.selective_ffn
    keep: ClassVar[Keep] = Keep.ffn_input
    keep_final_norm: ClassVar[Keep] = Keep.ffn_input

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
    # Inside the blocks keep everything: in a wrapped block it matters only in the recomputed forward, whose
    # saved tensors live for that block's backward alone, so keeping the element-wise intermediates there
    # costs one block's worth of them, briefly, and saves computing them a third time (~1% of the step on
    # the bench model). Outside the blocks (the final norm) the selective choice.
    keep: ClassVar[Keep] = Keep.all
    keep_final_norm: ClassVar[Keep] = Keep.matmul_outputs

    def recomputes_block(self, layer: int) -> bool:
        return layer % self.k == 0

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


def policy(cfg: ACConfig) -> ACPolicy:
    """The policy ``parallel.ac`` names (``mode``; ``every_k`` for ``every_k``)."""
    mode = ACMode(cfg.mode)
    return EveryK(k=cfg.every_k) if mode == ACMode.every_k else POLICIES[mode]()
