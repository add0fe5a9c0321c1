"""The plain training loops that ``make bench`` sets our trainer against, one per child process.

- ``bare``: our ``Transformer`` (same modules, same weights) with every hand-written autograd Function
  swapped for the plain PyTorch ops a user would write (``F.linear``, ``F.silu``, SDPA, the decomposed
  RMSNorm), differentiated by autograd; the same AdamW (``trainer.run.optim.build_optimizer``); forward,
  cross-entropy, backward, ``optimizer.step()``, nothing else. The floor any framework adds overhead to.
- ``hf`` / ``hf_ckpt``: ``transformers.LlamaForCausalLM`` of the same architecture (SDPA attention) with
  our initial weights, in the same loop, without / with its gradient checkpointing.

    python -m bench.loops --loop bare --steps 3 --out result.json [hydra overrides, as the trainer takes]

Writes ``{"step_s": [...], "losses": [...]}`` (every step, the first one included) to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from bench.common import compose_config
from conf.schema import Config
from model.attention import causal_attention
from model.config import AttnBackend, ModelArgs
from model.llama import Attention, FeedForward, RMSNorm, Transformer, apply_rope
from model.ops.reference import rms_norm_reference
from trainer.parallel.build import build_model
from trainer.run.device import peak_rss_bytes, resolve_device, resolve_dtype
from trainer.run.optim import build_optimizer

LOOPS = ("bare", "hf", "hf_ckpt")


class _PlainRMSNorm(RMSNorm):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm_reference(x, self.weight, eps=self.eps)


class _PlainAttention(Attention):
    """The model's own forward (``Attention.forward``) with each piece in plain ops."""

    def project_qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return tuple(F.linear(x, lin.weight) for lin in (self.wq, self.wk, self.wv))

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
        q, k, v = (t.unflatten(-1, (-1, self.head_dim)) for t in (q, k, v))
        rope = rope[: q.shape[1]]  # the model passes its whole table
        return causal_attention(apply_rope(q, rope), apply_rope(k, rope), v, backend=AttnBackend.sdpa).flatten(-2)

    def project_out(self, out: torch.Tensor) -> torch.Tensor:
        return F.linear(out, self.wo.weight)


class _PlainFeedForward(FeedForward):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.silu(F.linear(x, self.w1.weight)) * F.linear(x, self.w3.weight), self.w2.weight)


_PLAIN = {RMSNorm: _PlainRMSNorm, Attention: _PlainAttention, FeedForward: _PlainFeedForward}


def plain_autograd(model: Transformer) -> Transformer:
    """Swap each module's class for its plain-ops twin in place (weights, names and state untouched)."""
    for module in model.modules():
        if type(module) in _PLAIN:
            module.__class__ = _PLAIN[type(module)]
    return model


class _HFLogits(nn.Module):
    """``LlamaForCausalLM`` as tokens -> logits, so every loop computes its loss the same way."""

    def __init__(self, hf: nn.Module):
        super().__init__()
        self.hf = hf

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.hf(input_ids=tokens, use_cache=False).logits


def hf_model(args: ModelArgs, *, device: torch.device, seed: int, checkpointing: bool) -> nn.Module:
    """transformers' LLaMA of the same architecture, holding our initial weights (same seed)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from trainer.checkpoint.hf_interop import hf_config, to_hf_state_dict

    config = LlamaConfig(**hf_config(args))
    config._attn_implementation = "sdpa"
    with torch.device(device):
        hf = LlamaForCausalLM(config)
    ours = build_model(args, device=device, seed=seed)
    hf.load_state_dict(to_hf_state_dict(ours.state_dict(), args), strict=True)
    del ours
    if checkpointing:
        hf.activation_checkpointing_enable()  # non-reentrant torch.utils.checkpoint around each decoder layer
    return _HFLogits(hf.train())


def build_loop_model(loop: str, args: ModelArgs, *, device: torch.device, seed: int) -> nn.Module:
    if loop == "bare":  # the trainer's initialisation: same seed, same weights
        return plain_autograd(build_model(args, device=device, seed=seed))
    if loop in ("hf", "hf_ckpt"):
        return hf_model(args, device=device, seed=seed, checkpointing=loop == "hf_ckpt")
    raise ValueError(f"unknown loop '{loop}': choose one of {LOOPS}")


def batch_tokens(cfg: Config, *, device: torch.device) -> torch.Tensor:
    """The benchmark's batch: (micro_batch_size, seq_len + 1) random tokens under the config's seed."""
    generator = torch.Generator().manual_seed(cfg.trainer.seed)
    shape = (cfg.trainer.micro_batch_size, cfg.data.seq_len + 1)
    return torch.randint(0, cfg.model.vocab_size, shape, generator=generator).to(device)


def loop_loss(model: nn.Module, tokens: torch.Tensor, *, dtype: torch.dtype) -> torch.Tensor:
    """Mean next-token cross-entropy of (B, T+1) tokens, under bf16 autocast where ``dtype`` says so."""
    with torch.autocast(device_type=tokens.device.type, dtype=dtype, enabled=dtype != torch.float32):
        logits = model(tokens[:, :-1])
    return F.cross_entropy(logits.float().flatten(0, 1), tokens[:, 1:].flatten())


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_loop(model: nn.Module, optimizer: torch.optim.Optimizer, tokens: torch.Tensor, *, steps: int,
             dtype: torch.dtype) -> tuple[list[float], list[float]]:  # fmt: skip
    """Seconds and loss of each of ``steps`` optimizer steps on the same batch."""
    times, losses = [], []
    for _ in range(steps):
        _sync(tokens.device)
        start = time.perf_counter()
        loss = loop_loss(model, tokens, dtype=dtype)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())  # .item() synchronises, as the trainer's logging does
        times.append(time.perf_counter() - start)
    return times, losses


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--loop", choices=LOOPS, required=True)
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--out", type=Path, required=True)
    opts, overrides = parser.parse_known_args(argv)
    cfg = compose_config(overrides)
    device = resolve_device(cfg.trainer.device)
    dtype = resolve_dtype(cfg.trainer.precision, device=device)
    model = build_loop_model(opts.loop, cfg.model, device=device, seed=cfg.trainer.seed)
    optimizer = build_optimizer(model, cfg.optim)
    times, losses = run_loop(model, optimizer, batch_tokens(cfg, device=device), steps=opts.steps, dtype=dtype)
    result = {"step_s": times, "losses": losses, "peak_rss_bytes": peak_rss_bytes()}
    if device.type == "cuda":
        result["cuda_peak_bytes"] = torch.cuda.max_memory_allocated(device)
    opts.out.write_text(json.dumps(result))


if __name__ == "__main__":
    main()
