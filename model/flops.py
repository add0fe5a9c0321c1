"""Parameter and FLOP counts of a LLaMA model, in closed form from its ``ModelArgs``.

The training FLOPs per token (used for MFU everywhere in this project):

    flops_per_token = 6 * N_matmul + 12 * n_layers * d * T

- ``N_matmul``: weights that take part in a matrix multiply: every linear layer, the output head
  included; the token embedding (a lookup) and the RMSNorm gains are excluded.
  Forward costs 2 FLOPs per weight per token (multiply + add); backward twice that (input and weight
  gradients), hence 6.
- Attention scores and the weighted sum of values: per layer and token, q.k over T keys and the sum
  over T values cost 2*T*d each in the forward pass, 4*T*d in all; times 3 for training -> 12*T*d.
  Like PaLM (Chowdhery et al. 2022, appendix B) and torchtitan, the causal mask is **not** halved:
  the figure counts the full T x T scores. A kernel that skips the masked half does less work than
  counted, so MFU with this formula slightly flatters causal models; say so when comparing.
"""

from __future__ import annotations

from dataclasses import dataclass

from model.config import ModelArgs


@dataclass(frozen=True)
class ParamCounts:
    total: int
    """Every parameter."""
    embedding: int
    """Token embedding table (V x d)."""
    matmul: int
    """Weights used in matrix multiplies: all linear layers including the output head."""

    @property
    def non_embedding(self) -> int:
        """Total minus the token embedding (the output head counts, as in Kaplan et al.)."""
        return self.total - self.embedding


def param_counts(args: ModelArgs) -> ParamCounts:
    d, hidden, hd = args.dim, args.ffn_hidden_dim, args.head_dim
    attn = d * args.n_heads * hd * 2 + d * args.n_kv_heads * hd * 2  # wq, wo; wk, wv
    ffn = 3 * d * hidden  # w1, w2, w3
    norms_per_layer = 2 * d
    embedding = args.vocab_size * d
    head = args.vocab_size * d
    matmul = args.n_layers * (attn + ffn) + head
    total = embedding + matmul + args.n_layers * norms_per_layer + d  # + final norm
    return ParamCounts(total=total, embedding=embedding, matmul=matmul)


def attention_flops_per_token(args: ModelArgs, *, seq_len: int) -> int:
    """Training FLOPs of the T x T score and value products, per token (not halved for causality)."""
    return 12 * args.n_layers * args.n_heads * args.head_dim * seq_len


def flops_per_token(args: ModelArgs, *, seq_len: int) -> int:
    """Training (forward + backward) FLOPs per token; see the module docstring."""
    return 6 * param_counts(args).matmul + attention_flops_per_token(args, seq_len=seq_len)
