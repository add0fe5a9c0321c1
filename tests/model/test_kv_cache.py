"""Incremental decoding with model/kv_cache.py gives the full forward's logits."""

from __future__ import annotations

import pytest
import torch

from model.kv_cache import KVCache
from tests.trainer.checkpoint.test_hf_interop import random_model, small_args


@pytest.mark.parametrize("n_kv_heads", [None, 2, 1], ids=["mha", "gqa2", "mqa"])
@torch.no_grad()
def test_prefill_then_one_token_at_a_time_gives_the_full_forward_logits(n_kv_heads):
    args = small_args(n_kv_heads=n_kv_heads, max_seq_len=32)
    model = random_model(args)
    tokens = torch.randint(0, args.vocab_size, (3, 20), generator=torch.Generator().manual_seed(0))
    full = model(tokens)
    cache = KVCache(args, batch=3, max_len=20)
    steps = [model(tokens[:, :7], cache=cache)]  # the prefill: 7 positions at once
    steps += [model(tokens[:, t:t + 1], cache=cache) for t in range(7, 12)]  # then one at a time
    steps.append(model(tokens[:, 12:], cache=cache))  # and a chunk after the cache already holds some
    assert cache.pos == 20
    # fp32; the flash kernel (full) and masked SDPA (cached) sum in other orders: ~1e-6 seen
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-5, atol=1e-5)
    assert full.abs().max() > 1e-2


def test_the_cache_refuses_positions_it_does_not_have():
    args = small_args(max_seq_len=16)
    model = random_model(args)
    cache = KVCache(args, batch=1, max_len=8)
    model(torch.zeros(1, 8, dtype=torch.long), cache=cache)
    with pytest.raises(ValueError, match="holds 8 positions"):
        model(torch.zeros(1, 1, dtype=torch.long), cache=cache)
    with pytest.raises(ValueError, match="exceeds model.max_seq_len=16"):
        KVCache(args, batch=1, max_len=17)
