"""A key/value cache for incremental decoding, passed to ``Transformer.forward(tokens, cache=...)``.

Inference only (no autograd, nothing saved in checkpoints): a plain object, not a module. For a batch of
B sequences that share positions (all rows start at position 0 and advance together), it holds per layer

    k, v    (B, max_len, Hkv, D)   keys after RoPE and values, of every position written so far

and ``pos``, the number of positions written. A forward over T new tokens writes positions
[pos, pos + T) of every layer, attends from them to [0, pos + T), and then advances ``pos`` by T. So a
prompt can be run in one forward (the prefill) and the following tokens one at a time, each costing one
position instead of the whole prefix.

Rows of different prompt lengths share positions the way Meta's reference generation does: the batch
is decoded from its shortest prompt on, and a longer prompt's own tokens are fed where it still has them
(evaluation/lm.py). No row ever sees padding.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from model.config import ModelArgs


class KVCache:
    def __init__(self, args: ModelArgs, *, batch: int, max_len: Optional[int] = None,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                 layers: Optional[Sequence[int]] = None):  # fmt: skip
        """``layers``: the indices of the layers that will write it (default all; a pipeline stage's own)."""
        self.max_len = args.max_seq_len if max_len is None else max_len
        if self.max_len > args.max_seq_len:
            raise ValueError(f"a cache of {self.max_len} positions exceeds model.max_seq_len={args.max_seq_len}")
        shape = (batch, self.max_len, args.n_kv_heads, args.head_dim)
        indices = list(range(args.n_layers) if layers is None else layers)
        if not set(indices) <= set(range(args.n_layers)):
            raise ValueError(f"layers {indices} are not all layers of a {args.n_layers}-layer model")
        self.keys = {i: torch.zeros(shape, dtype=dtype, device=device) for i in indices}
        self.values = {i: torch.zeros(shape, dtype=dtype, device=device) for i in indices}
        self.pos = 0

    def layer(self, index: int) -> LayerCache:
        if index not in self.keys:
            raise ValueError(f"this cache holds layers {sorted(self.keys)}, not {index}: build it with the layers "
                             "of the model (or pipeline stage) that runs it")  # fmt: skip
        return LayerCache(self, index)

    def advance(self, n: int) -> None:
        """Called by the model once every layer has written the forward's n new positions."""
        self.pos += n


class LayerCache:
    """One layer's view of a ``KVCache``: what the attention of that layer writes and reads."""

    def __init__(self, cache: KVCache, index: int):
        self.cache, self.index = cache, index

    @property
    def start(self) -> int:
        """The position of the first of this forward's tokens."""
        return self.cache.pos

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, T, Hkv, D) at positions [start, start + T); return every position's so far,
        (B, start + T, Hkv, D) each."""
        start, end = self.cache.pos, self.cache.pos + k.shape[1]
        if end > self.cache.max_len:
            raise ValueError(f"the cache holds {self.cache.max_len} positions; this forward would reach {end}")
        keys, values = self.cache.keys[self.index], self.cache.values[self.index]
        keys[:, start:end] = k
        values[:, start:end] = v
        return keys[:, :end], values[:, :end]
