"""How long weight initialisation takes per rank at the paper's sizes (``trainer/parallel/initialize.py``).

    python -m bench.init_time [--presets llama1_7b llama1_65b] [--layers N]

Every rank draws every full parameter from its own generator and keeps its shard, so a rank's start-up
cost is drawing the whole model once, one parameter at a time (memory: the largest parameter). This times
exactly that on this machine: the embedding, the output head and ``--layers`` transformer blocks, drawn
by ``Transformer.init_parameter_`` into fresh fp32 tensors that are then dropped; the other blocks cost
the same as the ones measured, so the total is extrapolated from them. Default: all blocks of 7B, one of
65B. The model itself is built on the meta device (shapes only).
"""

from __future__ import annotations

import argparse
import time

import torch

from bench.common import compose_config, write_results
from model.llama import Transformer, parameter_generator
from trainer.run.device import peak_rss_bytes


def time_init(preset: str, *, layers: int | None, seed: int = 0) -> dict:
    """Seconds to draw the embedding, head and ``layers`` blocks (None: all) of ``preset``, and the total."""
    args = compose_config([f"model={preset}"]).model
    with torch.device("meta"):
        model = Transformer(args)
    measured = args.n_layers if layers is None else min(layers, args.n_layers)
    timed: dict[str, float] = {"embedding_and_head": 0.0, "blocks": 0.0}
    drawn = 0
    for name, param in model.named_parameters():
        block = int(name.split(".")[1]) if name.startswith("layers.") else None
        if block is not None and block >= measured:
            continue
        started = time.perf_counter()
        full = torch.empty(param.shape, dtype=torch.float32)
        model.init_parameter_(name, full, generator=parameter_generator(seed=seed, name=name, device=full.device))
        timed["blocks" if block is not None else "embedding_and_head"] += time.perf_counter() - started
        drawn += full.numel()
        del full
    per_block = timed["blocks"] / measured
    total = timed["embedding_and_head"] + per_block * args.n_layers
    return {"preset": preset, "parameters": sum(p.numel() for p in model.parameters()), "drawn": drawn,
            "blocks_measured": measured, "n_layers": args.n_layers, "embedding_and_head_s": timed["embedding_and_head"],
            "per_block_s": per_block, "total_s": total, "extrapolated": measured < args.n_layers,
            "largest_parameter_bytes": max(p.numel() for p in model.parameters()) * 4}  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", nargs="+", default=["llama1_7b", "llama1_65b"])
    parser.add_argument("--layers", type=int, default=None, help="blocks to draw (default: all of 7B, 1 of others)")
    opts = parser.parse_args(argv)
    rows = []
    for preset in opts.presets:
        layers = opts.layers if opts.layers is not None else (None if preset.endswith("7b") else 1)
        row = time_init(preset, layers=layers)
        rows.append(row)
        print(f"{preset}: {row['parameters'] / 1e9:.2f}B parameters; drew {row['drawn'] / 1e9:.2f}B "
              f"({row['blocks_measured']} of {row['n_layers']} blocks) in "
              f"{row['embedding_and_head_s'] + row['per_block_s'] * row['blocks_measured']:.1f} s; "
              f"{'extrapolated' if row['extrapolated'] else 'measured'} total per rank {row['total_s']:.1f} s; "
              f"largest parameter {row['largest_parameter_bytes'] / 2**30:.2f} GiB", flush=True)  # fmt: skip
    path = write_results("init_time", {"rows": rows, "threads": torch.get_num_threads(), "peak_rss_bytes": peak_rss_bytes()})
    print(f"peak RSS {peak_rss_bytes() / 2**30:.2f} GiB; written {path}")


if __name__ == "__main__":
    main()
