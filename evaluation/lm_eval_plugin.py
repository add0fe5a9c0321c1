"""Install the ``.pth`` line that makes the bare ``lm_eval`` command see our model ``llama_pretrain``.

    python -m evaluation.lm_eval_plugin install      # or: uninstall, status  (make install runs install)
    lm_eval --model llama_pretrain --model_args checkpoint=<dir> --tasks ...

lm-eval 0.4.13 has no plugin entry point for models; the line calls ``evaluation.lm_eval_hook.install_hook``
at every interpreter start of the environment, which costs one small module (see there).
"""

from __future__ import annotations

import argparse
import sysconfig
from pathlib import Path
from typing import Optional, Sequence

from evaluation.lm_eval_hook import MODEL_NAME

PTH_NAME = "llama_pretrain_lm_eval.pth"
# One line, as .pth files execute only lines that start with "import". The try keeps a stale .pth (our
# package removed, the file left behind) from printing a traceback at every interpreter start.
PTH_LINE = ('import sys; exec("try:\\n from evaluation.lm_eval_hook import install_hook\\n'
            'except ImportError:\\n pass\\nelse:\\n install_hook()")\n')  # fmt: skip


def site_packages() -> Path:
    """This interpreter's site-packages (the venv's when run from one)."""
    return Path(sysconfig.get_paths()["purelib"])


def install(site_dir: Optional[Path] = None) -> Path:
    path = (site_dir or site_packages()) / PTH_NAME
    path.write_text(PTH_LINE)
    return path


def uninstall(site_dir: Optional[Path] = None) -> Optional[Path]:
    path = (site_dir or site_packages()) / PTH_NAME
    if not path.exists():
        return None
    path.unlink()
    return path


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m evaluation.lm_eval_plugin", description=__doc__.split("\n")[0])
    parser.add_argument("action", choices=["install", "uninstall", "status"])
    parser.add_argument("--site-dir", type=Path, default=None, help="default: this interpreter's site-packages")
    args = parser.parse_args(argv)
    if args.action == "install":
        print(f"wrote {install(args.site_dir)}: `lm_eval --model {MODEL_NAME}` now finds our model")
    elif args.action == "uninstall":
        removed = uninstall(args.site_dir)
        print(f"removed {removed}" if removed else "not installed")
    else:
        path = (args.site_dir or site_packages()) / PTH_NAME
        print(f"installed: {path}" if path.exists() else f"not installed (no {path})")


if __name__ == "__main__":
    main()
