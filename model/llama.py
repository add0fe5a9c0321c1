"""LLaMA (Touvron et al. 2023): pre-norm RMSNorm, SwiGLU, rotary embeddings, no biases, untied output.

Architecture only: no process groups, meshes, devices or checkpoint wrappers. Parallelism, activation
checkpointing and FSDP are applied from ``trainer/``. Parameter names follow Meta's reference code
(``layers.0.attention.wq.weight``, ...) so checkpoints convert without a renaming table.

Shape legend: B batch, T sequence, d model dim, H query heads, Hkv kv heads, D head dim, F SwiGLU hidden,
V vocabulary.

Inference can pass a key/value cache (``forward(tokens, cache=KVCache(...))``, model/kv_cache.py): an
argument, not state of the model; without it the forward is the training one.

Build on the meta device, parallelise, then ``to_empty(device=...)`` and ``init_weights()``: every
parameter and buffer is (re)filled there, so nothing depends on what the constructor allocated.

The transformer layer's backward is hand-written (``model.ops``, LLaMA paper §2.4): RMSNorm, the
projections, the attention core and the SwiGLU feed-forward are autograd Functions. What they keep for
backward is one ``Keep`` value per module (model/ops/keep.py), given when the model is built
(``Transformer(args, keep=...)``) and never changed: the trainer's activation-checkpointing policy
(trainer/parallel/activation_checkpointing.py) chooses it; a model built without one keeps everything
(``Keep.all``), as plain autograd would. The arithmetic is the same at every level.

Each module's forward is written once, in terms of small pieces (``Attention.project_qkv``/``attend``/
``project_out``, ``RMSNorm.gain``) that the tensor-parallel forms (trainer/parallel/tensor_parallel.py)
replace with their communicating versions.
"""

from __future__ import annotations

import math
import zlib
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from model import ops
from model.attention import causal_attention, core_supports, document_attention, document_positions
from model.config import AttnBackend, ModelArgs
from model.kv_cache import KVCache, LayerCache
from model.ops.keep import Keep


def _at_least_fp32(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * g, computed in at least fp32 and cast back (a bf16 mean-square loses bits)."""

    def __init__(self, dim: int, *, eps: float, keep: Keep):
        super().__init__()
        self.eps, self.keep = eps, keep
        self.weight = nn.Parameter(torch.ones(dim))

    def gain(self) -> torch.Tensor:
        """The gain g as the op takes it (the sequence-parallel form adds its gradient reduction here)."""
        return self.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.rms_norm(x, self.gain(), eps=self.eps, keep=self.keep)

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)


def rope_table(*, head_dim: int, max_seq_len: int, theta: float, device=None) -> torch.Tensor:
    """cos/sin of the rotation angles t * theta^(-2i/D): (max_seq_len, D/2, 2), fp32."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float64) / head_dim))
    angles = torch.outer(torch.arange(max_seq_len, device=device, dtype=torch.float64), inv_freq)
    return torch.stack([angles.cos(), angles.sin()], dim=-1).float()


def apply_rope(x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Rotate consecutive pairs (x[2i], x[2i+1]) of each head by the angles in ``table``.

    Meta's interleaved-pair convention (the reference code views pairs as complex numbers; real arithmetic
    here keeps DTensor and torch.compile away from complex dtypes).

    Args:
        x: (B, T, H, D); table: (T, D/2, 2) as from ``rope_table``, already cut to T, or (B, T, D/2, 2): each
            sequence's own positions (packed documents, whose positions restart).
    """
    xp = x.to(_at_least_fp32(x.dtype)).unflatten(-1, (-1, 2))  # (B, T, H, D/2, 2)
    x0, x1 = xp[..., 0], xp[..., 1]
    cos = table[..., None, :, 0]  # (T, 1, D/2) or (B, T, 1, D/2): broadcast over the heads (and B)
    sin = table[..., None, :, 1]
    out = torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1)
    return out.flatten(-2).type_as(x)


def rope_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rope: torch.Tensor, *, head_dim: int,
                   backend: AttnBackend, keep: Keep, documents: Optional[torch.Tensor] = None) -> torch.Tensor:  # fmt: skip
    """RoPE and causal attention between the projections: (B, T, H*D), (B, T, Hkv*D) x2 -> (B, T, H*D).

    Head counts come from the projections' output widths: under tensor parallelism each rank holds
    n_heads / tp of them (trainer/parallel/tensor_parallel.py calls this on its local heads).
    ``documents`` (B, T): attention stays within each packed document (``document_attention``).
    """
    if rope.dim() == 3:  # the model's (max_seq_len, D/2, 2) table: the first T positions
        rope = rope[: q.shape[1]]
    q = apply_rope(q.unflatten(-1, (-1, head_dim)), rope)  # (B, T, H, D)
    k = apply_rope(k.unflatten(-1, (-1, head_dim)), rope)  # (B, T, Hkv, D)
    v = v.unflatten(-1, (-1, head_dim))
    if documents is not None:
        out = document_attention(q, k, v, documents=documents, backend=backend)
    elif core_supports(backend, q=q):
        out = ops.attention_core(q, k, v, keep=keep)
    else:  # flash-attn's own Function, or the plain-ops reference
        out = causal_attention(q, k, v, backend=backend)
    return out.flatten(-2)


def cached_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rope: torch.Tensor, *, head_dim: int,
                     cache: LayerCache) -> torch.Tensor:  # fmt: skip
    """Inference attention of T new tokens against the cache: (B, T, H*D), (B, T, Hkv*D) x2 -> (B, T, H*D).

    RoPE at the new tokens' positions (``rope`` is the table from ``cache.start`` on); k, v written to the
    cache; each new token at position start + i attends to positions [0, start + i]. Plain SDPA with an
    explicit mask (the hand-written Function's saved tensors and backward are of no use without autograd).
    """
    q = apply_rope(q.unflatten(-1, (-1, head_dim)), rope)  # (B, T, H, D)
    k = apply_rope(k.unflatten(-1, (-1, head_dim)), rope)  # (B, T, Hkv, D)
    start = cache.start
    keys, values = cache.update(k, v.unflatten(-1, (-1, head_dim)))  # (B, S, Hkv, D), S = start + T
    new, total = q.shape[1], keys.shape[1]
    allowed = torch.arange(total, device=q.device)[None, :] <= start + torch.arange(new, device=q.device)[:, None]
    group = q.shape[2] // keys.shape[2]  # GQA: each kv head serves `group` query heads
    keys, values = (t.repeat_interleave(group, dim=2) if group > 1 else t for t in (keys, values))
    out = F.scaled_dot_product_attention(q.transpose(1, 2), keys.transpose(1, 2).to(q.dtype),
                                         values.transpose(1, 2).to(q.dtype), attn_mask=allowed)  # fmt: skip
    return out.transpose(1, 2).flatten(-2)


class Attention(nn.Module):
    """(B, T, d) -> (B, T, d): q/k/v projections, RoPE + causal attention, output projection."""

    def __init__(self, args: ModelArgs, *, keep: Keep):
        super().__init__()
        self.head_dim, self.backend, self.keep = args.head_dim, args.attn_backend, keep
        self.wq = nn.Linear(args.dim, args.n_heads * args.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.wv = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.wo = nn.Linear(args.n_heads * args.head_dim, args.dim, bias=False)

    def project_qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B, T, d) -> q (B, T, H*D), k, v (B, T, Hkv*D)."""
        return tuple(ops.linear(x, lin.weight) for lin in (self.wq, self.wk, self.wv))

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rope: torch.Tensor,
               documents: Optional[torch.Tensor] = None) -> torch.Tensor:  # fmt: skip
        """RoPE and causal attention over the heads present: (B, T, H*D) -> (B, T, H*D)."""
        return rope_attention(q, k, v, rope, head_dim=self.head_dim, backend=self.backend, keep=self.keep,
                              documents=documents)  # fmt: skip

    def project_out(self, out: torch.Tensor) -> torch.Tensor:
        """(B, T, H*D) -> (B, T, d)."""
        return ops.linear(out, self.wo.weight)

    def forward(self, x: torch.Tensor, rope: torch.Tensor, cache: Optional[LayerCache] = None,
                documents: Optional[torch.Tensor] = None) -> torch.Tensor:  # fmt: skip
        q, k, v = self.project_qkv(x)
        if cache is not None:
            out = cached_attention(q, k, v, rope, head_dim=self.head_dim, cache=cache)
        else:
            # (B, T, H * D); the ids only where given, so an ``attend`` override without them still serves
            out = self.attend(q, k, v, rope) if documents is None else self.attend(q, k, v, rope, documents=documents)
        return self.project_out(out)


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x), hidden F = ``ModelArgs.ffn_hidden_dim``."""

    def __init__(self, args: ModelArgs, *, keep: Keep):
        super().__init__()
        hidden = args.ffn_hidden_dim
        self.keep = keep
        self.w1 = nn.Linear(args.dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, args.dim, bias=False)
        self.w3 = nn.Linear(args.dim, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.swiglu(x, self.w1.weight, self.w3.weight, self.w2.weight, keep=self.keep)


class TransformerBlock(nn.Module):
    """Pre-norm block: h = x + attn(norm(x)); out = h + ffn(norm(h))."""

    def __init__(self, args: ModelArgs, *, keep: Keep):
        super().__init__()
        self.attention_norm = RMSNorm(args.dim, eps=args.norm_eps, keep=keep)
        self.attention = Attention(args, keep=keep)
        self.ffn_norm = RMSNorm(args.dim, eps=args.norm_eps, keep=keep)
        self.feed_forward = FeedForward(args, keep=keep)

    def forward(self, x: torch.Tensor, rope: torch.Tensor, cache: Optional[LayerCache] = None,
                documents: Optional[torch.Tensor] = None) -> torch.Tensor:  # fmt: skip
        h = x + self.attention(self.attention_norm(x), rope, cache=cache, documents=documents)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    """tokens (B, T) -> logits (B, T, V).

    A pipeline stage is this model with the parts it does not own removed (docs/pipeline.md): the embedding,
    the final norm and the head set to None, blocks deleted from ``layers`` (a ModuleDict keyed by layer
    index, so the remaining names, and checkpoints, are unchanged). ``forward`` then maps what the stage
    receives to what it sends: tokens or hidden states (B, T, d) in, hidden states or logits out.
    """

    def __init__(self, args: ModelArgs, *, keep: Keep = Keep.all, keep_final_norm: Optional[Keep] = None):
        """
        Args:
            keep: what the blocks' hand-written backward keeps (model/ops/keep.py).
            keep_final_norm: the same for the final norm, outside the blocks; None: as ``keep``.
        """
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        # A ModuleDict keyed by layer index (as torchtitan does) keeps fully-qualified names stable when
        # a later stage removes layers, e.g. for pipeline parallelism.
        self.layers = nn.ModuleDict({str(i): TransformerBlock(args, keep=keep) for i in range(args.n_layers)})
        self.norm = RMSNorm(args.dim, eps=args.norm_eps, keep=keep if keep_final_norm is None else keep_final_norm)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        # Derived from args, so not saved in checkpoints (persistent=False); refilled by init_weights.
        self.register_buffer("rope", self._rope_table(device=None), persistent=False)

    def _rope_table(self, *, device) -> torch.Tensor:
        return rope_table(
            head_dim=self.args.head_dim, max_seq_len=self.args.max_seq_len, theta=self.args.rope_theta, device=device
        )

    def forward(self, tokens: torch.Tensor, cache: Optional[KVCache] = None,
                documents: Optional[torch.Tensor] = None) -> torch.Tensor:  # fmt: skip
        """``cache`` (inference, model/kv_cache.py): ``tokens`` are the next positions of the cached
        sequences; they attend to everything cached before them, and are cached in turn.

        ``documents`` (B, T) ids, constant along each of several documents packed into one sequence: every
        document attends only to itself, from position 0 (its RoPE positions restart), as if it were alone."""
        seq_len = tokens.shape[1]
        start = 0 if cache is None else cache.pos
        if start + seq_len > self.args.max_seq_len:
            raise ValueError(f"sequence length {start + seq_len} exceeds model.max_seq_len={self.args.max_seq_len}")
        # A later pipeline stage's input may be a sequence shard (sequence parallelism): only B is checked there.
        length = tokens.shape[1] if self.tok_embeddings is not None else None
        if documents is not None and (cache is not None or documents.dim() != 2 or documents.shape[0] != tokens.shape[0]
                                      or length not in (None, documents.shape[1])):  # fmt: skip
            raise ValueError(f"documents must be (B, T) = {tuple(tokens.shape[:2])} ids, without a cache; got "
                             f"{tuple(documents.shape)}{' with a cache' if cache is not None else ''}")  # fmt: skip
        h = self.tok_embeddings(tokens) if self.tok_embeddings is not None else tokens  # (B, T, d)
        h = run_blocks(self.layers, h, rope=self.block_rope(documents, cache=cache, length=seq_len), cache=cache,
                       documents=documents)  # fmt: skip
        if cache is not None:
            cache.advance(seq_len)
        h = self.norm(h) if self.norm is not None else h
        return self.output(h) if self.output is not None else h  # (B, T, V), or (B, T, d) before the last stage

    def block_rope(self, documents: Optional[torch.Tensor] = None, *, cache: Optional[KVCache] = None,
                   length: int) -> torch.Tensor:  # fmt: skip
        """The RoPE table the blocks take over ``length`` new positions: with ``cache``, those from the cache's on; with
        ``documents`` (B, T) each document's own positions from 0, (B, T, D/2, 2); else the whole table (each
        attention cuts it to the sequence it attends over, which under sequence parallelism, in a later
        pipeline stage, is longer than the stage's sharded input)."""
        if cache is not None:
            return self.rope[cache.pos:cache.pos + length]
        return self.rope if documents is None else self.rope[document_positions(documents)]

    @torch.no_grad()
    def init_buffers(self, *, device: Optional[torch.device] = None) -> None:
        """Recompute the (non-persistent) RoPE table on ``device`` (default: where the buffer already is)."""
        self.rope = self._rope_table(device=device if device is not None else self.rope.device)

    @torch.no_grad()
    def init_weights(self, *, seed: Optional[int] = None, buffer_device: Optional[torch.device] = None) -> None:
        """Fill every parameter and buffer; the same ``seed`` gives the same weights.

        Each parameter is drawn from a generator of its own, seeded by ``seed`` and its name
        (``parameter_generator``), so its values do not depend on the order or the subset of parameters
        initialised: a sharded model whose ranks each draw every full parameter and keep their shard gets
        exactly these weights (trainer/parallel/initialize.py). ``seed=None`` takes one from torch's global RNG, so
        ``torch.manual_seed`` still decides.
        """
        self.init_buffers(device=buffer_device)
        if seed is None:
            seed = int(torch.randint(0, 2**62, (1,)).item())
        for name, param in self.named_parameters():
            self.init_parameter_(name, param, generator=parameter_generator(seed=seed, name=name, device=param.device))

    def init_parameter_(self, name: str, tensor: torch.Tensor, *, generator: Optional[torch.Generator] = None) -> None:
        """Fill ``tensor``, the full (unsharded) parameter ``name``, by LLaMA's initialisation.

        Input projections and embeddings: N(0, init_std), projections truncated at 3 sigma. Projections that
        write into the residual stream (wo, w2) are scaled by 1/sqrt(2 * n_layers) (GPT-2's rule) so the
        residual's variance does not grow with depth. The output head uses std d^-1/2 so initial logits
        are O(1) and the first loss is close to ln(V). RMSNorm gains: ones.

        Args:
            name: as ``named_parameters`` gives it (``layers.3.attention.wo.weight``).
        """
        std = self.args.init_std
        if name.endswith("norm.weight"):
            nn.init.ones_(tensor)
            return
        if name == "tok_embeddings.weight":
            nn.init.normal_(tensor, std=std, generator=generator)
            return
        if name == "output.weight":
            std = self.args.dim**-0.5
        elif name.endswith(("attention.wo.weight", "feed_forward.w2.weight")):
            std = std / math.sqrt(2 * self.args.n_layers)
        elif not name.endswith(_INPUT_PROJECTIONS):
            raise ValueError(f"no initialisation rule for parameter {name!r}")
        nn.init.trunc_normal_(tensor, std=std, a=-3 * std, b=3 * std, generator=generator)


_INPUT_PROJECTIONS = tuple(f"{m}.weight" for m in ("wq", "wk", "wv", "w1", "w3"))


def run_blocks(layers: nn.ModuleDict, h: torch.Tensor, *, rope: torch.Tensor, cache: Optional[KVCache] = None,
               documents: Optional[torch.Tensor] = None) -> torch.Tensor:  # fmt: skip
    """``h`` (B, T, d) through ``layers`` (blocks keyed by layer index, as ``Transformer.layers``), each with
    its own layer of ``cache`` or the document ids; the cache is advanced by the caller."""
    for name, layer in layers.items():
        if cache is not None:
            h = layer(h, rope, cache=cache.layer(int(name)))
        else:
            h = layer(h, rope) if documents is None else layer(h, rope, documents=documents)
    return h


def parameter_seed(*, seed: int, name: str) -> int:
    """The seed of parameter ``name``'s generator: stable across processes, runs and Python versions."""
    return (seed * 0x9E3779B97F4A7C15 + zlib.crc32(name.encode())) % 2**63


def parameter_generator(*, seed: int, name: str, device: torch.device) -> torch.Generator:
    """A generator on ``device`` for parameter ``name`` (see ``Transformer.init_weights``)."""
    return torch.Generator(device=device).manual_seed(parameter_seed(seed=seed, name=name))
