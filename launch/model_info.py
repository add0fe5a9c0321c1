"""Print a model preset's parameter counts and training FLOPs per token.

    python -m launch.model_info model=llama1_7b
    python -m launch.model_info model=llama2_70b model.max_seq_len=4096

Arguments are Hydra overrides of the project config. The model is built on the meta device (no memory
is allocated), and the count of its real parameters is checked against the closed form in
``model/flops.py``.
"""

from __future__ import annotations

import sys

import torch
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

from model.config import ModelArgs
from model.flops import attention_flops_per_token, flops_per_token, param_counts
from model.llama import Transformer


def describe(args: ModelArgs) -> str:
    with torch.device("meta"):
        model = Transformer(args)
    counted = sum(p.numel() for p in model.parameters())
    counts = param_counts(args)
    # The closed form is what MFU uses; a mismatch with the built module would make every MFU wrong.
    assert counted == counts.total, (counted, counts.total)
    t = args.max_seq_len
    lines = [
        f"total parameters:         {counts.total:,} ({counts.total / 1e9:.2f}B)",
        f"non-embedding parameters: {counts.non_embedding:,}",
        f"matmul parameters:        {counts.matmul:,}",
        f"SwiGLU hidden size:       {args.ffn_hidden_dim}",
        f"training FLOPs per token at seq_len={t}: {flops_per_token(args, seq_len=t):,}"
        f" (6 * matmul params + attention {attention_flops_per_token(args, seq_len=t):,}; causal not halved)",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    overrides = sys.argv[1:] if argv is None else argv
    with initialize_config_module(config_module="conf", version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    args: ModelArgs = OmegaConf.to_object(cfg.model)
    print(describe(args))


if __name__ == "__main__":
    main()
