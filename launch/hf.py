"""Hugging Face interop from the command line (``trainer.checkpoint.hf_interop`` does the work).

    python -m launch.hf export <checkpoint_dir> <out_dir> [--dtype bf16|fp32] [--overwrite]
    python -m launch.hf import <hf_dir> <out_checkpoint_dir>

Export writes ``config.json``, one consolidated ``model.safetensors`` and the checkpoint's tokenizer; import
writes a checkpoint usable as ``checkpoint.init_from``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional

from trainer.checkpoint.hf_interop import DTYPES, export_hf, import_hf


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m launch.hf", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    export = commands.add_parser("export", help="checkpoint -> Hugging Face LlamaForCausalLM directory")
    export.add_argument("checkpoint_dir", type=Path, help="a checkpoint directory (DCP files + meta.json)")
    export.add_argument("out_dir", type=Path, help="where to write config.json, model.safetensors, tokenizer")
    export.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="dtype of the written weights")
    export.add_argument("--overwrite", action="store_true", help="write into a non-empty out_dir")
    imp = commands.add_parser("import", help="Hugging Face LLaMA directory -> checkpoint (for checkpoint.init_from)")
    imp.add_argument("hf_dir", type=Path, help="a directory with config.json and model.safetensors (or shards)")
    imp.add_argument("out_checkpoint_dir", type=Path, help="the checkpoint directory to create")
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "export":
            out = export_hf(args.checkpoint_dir, args.out_dir, dtype=DTYPES[args.dtype], overwrite=args.overwrite)
            print(f"exported {args.checkpoint_dir} to {out}")
        else:
            out = import_hf(args.hf_dir, args.out_checkpoint_dir)
            print(f"imported {args.hf_dir} to {out}; train from it with checkpoint.init_from={out}")
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
