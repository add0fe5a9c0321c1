"""Presets reproduce the published parameter counts, built on the meta device."""

import pytest
import torch
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

from model.flops import param_counts
from model.llama import Transformer

# Exact counts of Meta's released checkpoints (sum of tensor sizes); the LLaMA paper's table 2 prints
# them truncated to one decimal (65,285,660,672 is listed as 65.2B).
PUBLISHED = {
    "llama1_7b": (6_738_415_616, 6.7),
    "llama1_13b": (13_015_864_320, 13.0),
    "llama1_33b": (32_528_943_616, 32.5),
    "llama1_65b": (65_285_660_672, 65.2),
    "llama2_7b": (6_738_415_616, 6.7),
    "llama2_13b": (13_015_864_320, 13.0),
    "llama2_70b": (68_976_648_192, 69.0),
}
SWIGLU_HIDDEN = {"llama1_7b": 11008, "llama1_13b": 13824, "llama1_33b": 17920, "llama1_65b": 22016, "llama2_70b": 28672}


def load_preset(name):
    with initialize_config_module(config_module="conf", version_base="1.3"):
        cfg = compose(config_name="config", overrides=[f"model={name}"])
    return OmegaConf.to_object(cfg.model)


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_preset_parameter_count(name):
    args = load_preset(name)
    with torch.device("meta"):
        model = Transformer(args)
    counted = sum(p.numel() for p in model.parameters())
    exact, paper_billions = PUBLISHED[name]
    assert counted == exact
    assert param_counts(args).total == counted
    if name.startswith("llama1"):
        assert int(counted / 1e8) / 10 == paper_billions  # the paper's truncation to one decimal
    assert all(p.device.type == "meta" for p in model.parameters())


@pytest.mark.parametrize("name", sorted(SWIGLU_HIDDEN))
def test_swiglu_hidden_size(name):
    assert load_preset(name).ffn_hidden_dim == SWIGLU_HIDDEN[name]


def test_gqa_preset_shapes():
    args = load_preset("llama2_70b")
    with torch.device("meta"):
        model = Transformer(args)
    attn = model.layers["0"].attention
    assert attn.wq.weight.shape == (8192, 8192)
    assert attn.wk.weight.shape == (8 * 128, 8192)
    assert attn.wv.weight.shape == (8 * 128, 8192)
