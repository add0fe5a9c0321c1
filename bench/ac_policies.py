"""Activation checkpointing policies side by side: step time and activation bytes kept for backward.

One process, one model, one batch, the trainer's own model path (``build_model`` -> ``parallelize_llama``)
and AdamW. Policies are measured interleaved (none, selective, full, none, ...) so that drift of this
shared machine hits them alike; each figure is the median of the repetitions, with min-max spread.

    python -m bench.ac_policies [--dim 512 --layers 8 --seq 512 --batch 4 --steps 3 --repeats 5]

Targets: selective within 5% of none's step time; full about one extra forward (~ +33%).
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from bench.common import summarize, write_results
from model.config import ModelArgs
from model.ops.memory import saved_bytes
from trainer.parallel.activation_checkpointing import policy as ac_policy
from trainer.parallel.build import build_model
from trainer.parallel.config import ACConfig, ParallelConfig

POLICIES = ("none", "selective", "selective_ffn", "full")


def _setup(args: ModelArgs, policy: str):
    parallel = ParallelConfig(ac=ACConfig(mode=policy))
    model = build_model(args, device=torch.device("cpu"), seed=0, parallel=parallel)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1)
    return model, optimizer


def _loss(model, tokens):
    return F.cross_entropy(model(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten())


def _time_steps(model, optimizer, tokens, *, steps: int) -> float:
    """Seconds per optimizer step (forward, backward, AdamW), averaged over ``steps`` after one warm-up."""
    for i in range(steps + 1):
        if i == 1:
            start = time.perf_counter()
        _loss(model, tokens).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return (time.perf_counter() - start) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=5)
    opts = parser.parse_args()
    args = ModelArgs(dim=opts.dim, n_layers=opts.layers, n_heads=opts.heads, vocab_size=opts.vocab,
                     max_seq_len=opts.seq)  # fmt: skip
    tokens = torch.randint(0, opts.vocab, (opts.batch, opts.seq + 1), generator=torch.Generator().manual_seed(0))
    setups = {policy: _setup(args, policy) for policy in POLICIES}
    kept = {}
    for policy, (model, _) in setups.items():
        counted = saved_bytes(lambda: _loss(model, tokens), params=[*model.parameters(), *model.buffers()])
        kept[policy] = counted.activations
    times = {policy: [] for policy in POLICIES}
    for _ in range(opts.repeats):
        for policy, (model, optimizer) in setups.items():
            times[policy].append(_time_steps(model, optimizer, tokens, steps=opts.steps))
    rows = []
    base = summarize(times["none"])["median"]
    print(f"model dim={opts.dim} layers={opts.layers} heads={opts.heads} vocab={opts.vocab}; batch {opts.batch} x "
          f"seq {opts.seq}; {torch.get_num_threads()} threads; median of {opts.repeats} x {opts.steps} steps")  # fmt: skip
    print(f"{'policy':<10} {'step s':>8} {'spread':>15} {'vs none':>8} {'layer MiB':>10} {'model MiB':>10} {'vs none':>8}")
    for policy in POLICIES:
        stats = summarize(times[policy])
        layer = ac_policy(ACConfig(mode=policy)).layer_bytes(args, layer=0, batch=opts.batch, seq_len=opts.seq, tp=1)
        row = {"policy": policy, "step_s": stats, "ratio_step_vs_none": stats["median"] / base,
               "layer_bytes_formula": layer, "model_bytes_counted": kept[policy],
               "ratio_bytes_vs_none": kept[policy] / kept["none"]}  # fmt: skip
        rows.append(row)
        print(f"{policy:<10} {stats['median']:>8.3f} {stats['min']:>7.3f}-{stats['max']:<7.3f} "
              f"{row['ratio_step_vs_none']:>8.3f} {layer / 2**20:>10.2f} {kept[policy] / 2**20:>10.2f} "
              f"{row['ratio_bytes_vs_none']:>8.3f}")  # fmt: skip
    path = write_results("ac_policies", {"config": vars(opts), "rows": rows})
    print(f"written {path}")


if __name__ == "__main__":
    main()
