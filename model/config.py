"""Architecture hyper-parameters of a LLaMA model.

The presets live as YAML in ``conf/model/`` (debug, small, the LLaMA paper's 7B/13B/33B/65B and Llama 2's
7B/13B/70B); this dataclass is their typed schema.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass
from fractions import Fraction
from typing import Optional


class AttnBackend(str, enum.Enum):
    """Which kernel computes causal attention (see ``model/attention.py``).

    OmegaConf 2.3 rejects ``typing.Literal``, so modes are ``str`` enums whose names equal their values:
    YAML and the command line use the plain strings and a wrong one is rejected naming the key.
    """

    auto = "auto"  # flash-attn on CUDA when installed and the dtype allows it, else SDPA
    sdpa = "sdpa"  # torch.nn.functional.scaled_dot_product_attention
    flash = "flash"  # flash-attn 2 (CUDA, fp16/bf16); an error elsewhere
    math = "math"  # explicit softmax(QK^T)V reference, for tests


@dataclass
class ModelArgs:
    """LLaMA architecture. Defaults are a tiny debug model."""

    dim: int = 64
    """Model (residual stream) width d."""
    n_layers: int = 2
    """Number of transformer blocks."""
    n_heads: int = 4
    """Attention (query) heads; head_dim = dim / n_heads."""
    n_kv_heads: Optional[int] = None
    """Key/value heads for grouped-query attention (Llama 2); None means n_heads (plain multi-head), and
    after construction the field always holds the number."""
    vocab_size: int = 512
    """Vocabulary size; must equal the tokenizer's."""
    multiple_of: int = 32
    """SwiGLU hidden size is rounded up to a multiple of this."""
    ffn_dim_multiplier: float = 1.0
    """Scales the SwiGLU hidden size before rounding (1.3 for Llama 2 70B)."""
    norm_eps: float = 1e-6
    """RMSNorm epsilon (1e-6 in LLaMA 1, 1e-5 in Llama 2)."""
    rope_theta: float = 10000.0
    """Rotary embedding base."""
    max_seq_len: int = 128
    """Longest sequence the rotary table covers (the training context length)."""
    init_std: float = 0.02
    """Standard deviation of the normal initialisation of input projections and embeddings."""
    attn_backend: AttnBackend = AttnBackend.auto
    """Attention kernel: auto | sdpa | flash | math."""

    def __post_init__(self) -> None:
        # OmegaConf.to_object hands enums through; a plain string (direct construction) is converted here.
        self.attn_backend = AttnBackend(self.attn_backend)
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.dim % self.n_heads != 0:
            raise ValueError(f"model.dim={self.dim} must be divisible by model.n_heads={self.n_heads}")
        if self.head_dim % 2 != 0:
            raise ValueError(f"head_dim = model.dim / model.n_heads = {self.head_dim} must be even for RoPE")
        if self.n_kv_heads <= 0 or self.n_heads % self.n_kv_heads != 0:
            raise ValueError(f"model.n_heads={self.n_heads} must be divisible by model.n_kv_heads={self.n_kv_heads}")
        for key in ("dim", "n_layers", "vocab_size", "multiple_of", "max_seq_len"):
            if getattr(self, key) <= 0:
                raise ValueError(f"model.{key} must be positive, got {getattr(self, key)}")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def ffn_hidden_dim(self) -> int:
        """SwiGLU hidden size: ``multiple_of * ceil(2/3 * 4d * ffn_dim_multiplier / multiple_of)``.

        Computed with exact fractions: in floats, 2/3 * 4d can land a hair above an exact multiple and
        the ceiling would then add a whole ``multiple_of``.
        """
        raw = Fraction(2, 3) * 4 * self.dim * Fraction(str(self.ffn_dim_multiplier))
        return self.multiple_of * math.ceil(raw / self.multiple_of)
