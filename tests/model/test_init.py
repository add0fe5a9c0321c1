"""Initialisation: explicit, deterministic under a seed, and complete after building on meta."""

import math

import pytest
import torch

from model.config import ModelArgs
from model.llama import Transformer

ARGS = ModelArgs(dim=64, n_layers=3, n_heads=4, n_kv_heads=2, vocab_size=256, max_seq_len=32)


def materialise(seed):
    with torch.device("meta"):
        model = Transformer(ARGS)
    model.to_empty(device="cpu")
    torch.manual_seed(seed)
    model.init_weights(buffer_device=torch.device("cpu"))
    return model


def test_init_is_deterministic_under_seed():
    a, b, c = materialise(0), materialise(0), materialise(1)
    for (name, pa), pb, pc in zip(a.state_dict().items(), b.state_dict().values(), c.state_dict().values()):
        assert torch.equal(pa, pb), name
        if "norm" not in name:
            assert not torch.equal(pa, pc), name


def test_meta_build_then_init_equals_eager_build():
    eager = Transformer(ARGS)
    torch.manual_seed(0)
    eager.init_weights()
    meta = materialise(0)
    for (name, pe), pm in zip(eager.state_dict().items(), meta.state_dict().values()):
        assert torch.equal(pe, pm), name
    torch.testing.assert_close(eager.rope, meta.rope)  # non-persistent buffer recomputed on the device


def test_init_statistics():
    model = materialise(0)
    out_std = ARGS.init_std / math.sqrt(2 * ARGS.n_layers)
    layer = model.layers["1"]
    assert layer.attention.wq.weight.std().item() == pytest.approx(ARGS.init_std * 0.987, rel=0.1)  # 3-sigma trunc
    assert layer.feed_forward.w2.weight.std().item() == pytest.approx(out_std * 0.987, rel=0.1)
    assert torch.equal(layer.attention_norm.weight, torch.ones(ARGS.dim))
    # Logits of unit variance: the first loss is about ln(V) + 1/2 (the variance's cost over uniform).
    tokens = torch.randint(0, ARGS.vocab_size, (4, 16))
    logits = model(tokens)
    assert logits.std().item() == pytest.approx(1.0, rel=0.2)
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens.flatten())
    assert math.log(ARGS.vocab_size) < loss.item() < math.log(ARGS.vocab_size) + 1
    assert "rope" not in model.state_dict()


def test_no_biases_and_untied_output():
    model = materialise(0)
    assert not any(name.endswith("bias") for name, _ in model.named_parameters())
    assert model.output.weight.data_ptr() != model.tok_embeddings.weight.data_ptr()


def test_bad_shapes_name_the_key():
    with pytest.raises(ValueError, match="model.n_heads"):
        ModelArgs(dim=64, n_heads=5)
    with pytest.raises(ValueError, match="model.n_kv_heads"):
        ModelArgs(dim=64, n_heads=4, n_kv_heads=3)
