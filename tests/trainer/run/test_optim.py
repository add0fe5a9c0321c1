import math

import pytest

from model.config import ModelArgs
from model.llama import Transformer
from trainer.run.config import OptimConfig
from trainer.run.optim import build_lr_scheduler, build_optimizer, lr_factor


def test_schedule_warmup_cosine_floor():
    kw = dict(warmup_steps=10, decay_steps=110, min_ratio=0.1)
    assert lr_factor(0, **kw) == pytest.approx(0.1)
    assert lr_factor(9, **kw) == pytest.approx(1.0)
    assert lr_factor(10, **kw) == pytest.approx(1.0)
    assert lr_factor(60, **kw) == pytest.approx(0.55)  # half-way down the cosine: (1 + 0.1) / 2
    assert lr_factor(110, **kw) == pytest.approx(0.1)
    assert lr_factor(1000, **kw) == pytest.approx(0.1)
    values = [lr_factor(s, **kw) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_scheduler_drives_optimizer_lr():
    model = Transformer(ModelArgs())
    cfg = OptimConfig(lr=1e-3, warmup_steps=4)
    opt = build_optimizer(model, cfg)
    sched = build_lr_scheduler(opt, cfg, max_steps=20)
    lrs = []
    for _ in range(20):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(2.5e-4) and lrs[3] == pytest.approx(1e-3)
    assert lrs[-1] == pytest.approx(1e-3 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 15 / 16))))


def test_weight_decay_only_on_matrices():
    model = Transformer(ModelArgs())
    opt = build_optimizer(model, OptimConfig())
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    assert all("norm" in names[id(p)] for p in no_decay["params"])
    assert {names[id(p)] for p in decay["params"]} >= {"tok_embeddings.weight", "output.weight", "layers.0.attention.wq.weight"}
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))
    assert opt.defaults["betas"] == (0.9, 0.95)


def test_warmup_longer_than_run_warns():
    opt = build_optimizer(Transformer(ModelArgs()), OptimConfig())
    with pytest.warns(UserWarning, match="optim.warmup_steps = 2000: the run ends during warm-up"):
        build_lr_scheduler(opt, OptimConfig(warmup_steps=2000), max_steps=100)
