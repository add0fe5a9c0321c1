"""How many bytes one transformer layer keeps for backward, per activation-checkpointing policy.

Derived for this LLaMA layer in the style of Korthikanti et al. 2022, Table 2, and checked against the
bytes counted by ``model.ops.memory.saved_bytes`` (tests/trainer/test_activation_memory.py). The
derivation is written out in docs/activation_memory.md; in short, per token and with t tensor-parallel
ranks (sequence parallelism always on, so every term is split t ways):

    e = bytes per activation element (the compute dtype), c = bytes per statistic (RMSNorm's 1/rms and the
    attention log-sum-exp, kept in at least fp32), h model width, kv = Hkv * D key/value width,
    F SwiGLU hidden, a query heads.

    selective: (6 e h + 2 e kv + 2 e F + c (2 + a)) / t
        2 RMSNorm inputs (e h each) + 2 rms (c); the normed inputs of the q/k/v and w1/w3 projections
        (e h each, saved once though three projections use the first); q after RoPE (e h), k and v
        (e kv each); the attention output (e h, shared by the core and wo); the log-sum-exp (c a);
        SwiGLU's two linear outputs (e F each).
    none:      (4 e h + 2 c h + 2 e kv + 4 e F + c (2 + a)) / t
        as selective, but each RMSNorm keeps its normalised input in c instead of its input, and SwiGLU
        also keeps silu(x W1^T) and the gated product (2 e F more).
    full:      e h / t
        the block's input only; the block's forward is rerun in backward.

No term grows with the sequence length beyond the token count: the attention kernel keeps the
log-sum-exp instead of the (a, s, s) probabilities, which is what removes Korthikanti's 5as/h term.
"""

from __future__ import annotations

import torch

from model.config import ModelArgs
from trainer.config import ACMode


def layer_activation_bytes(
    args: ModelArgs, *, batch: int, seq_len: int, tp: int, policy: ACMode, dtype: torch.dtype = torch.float32
) -> int:
    """Bytes one transformer layer keeps for backward on each rank (the module docstring's formula).

    Args:
        batch, seq_len: the micro-batch shape (B, T) of one rank's data-parallel share.
        tp: tensor-parallel degree (sequence parallelism on); it must divide T and the head counts.
        policy: none | selective | full (every_k mixes full and none layer by layer).
        dtype: the compute dtype of the activations.
    """
    policy = ACMode(policy)
    if policy == ACMode.every_k:
        raise ValueError("every_k mixes layers: use policy=full for the recomputed ones and none for the rest")
    tokens = batch * seq_len
    if seq_len % tp or args.n_heads % tp or args.num_kv_heads % tp:
        raise ValueError(f"tp={tp} must divide the sequence length and the head counts")
    e = torch.finfo(dtype).bits // 8
    c = max(e, 4)
    h, kv, f, a = args.dim, args.num_kv_heads * args.head_dim, args.ffn_hidden_dim, args.n_heads
    if policy == ACMode.full:
        per_token = e * h
    elif policy == ACMode.selective:
        per_token = 6 * e * h + 2 * e * kv + 2 * e * f + c * (2 + a)
    else:
        per_token = 4 * e * h + 2 * c * h + 2 * e * kv + 4 * e * f + c * (2 + a)
    return tokens * per_token // tp
