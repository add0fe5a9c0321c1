"""Download what ``make gpu-check`` needs besides torch, as wheels, for a GPU machine without network.

    python -m launch.gpu_wheels --dest gpu_wheels [--python-version 3.12]      # make gpu-wheels

A typical offline GPU test machine has CUDA torch, transformers, numpy, pytest, ... but not hydra-core,
omegaconf or wandb (shared/ENVIRONMENT.md). This fetches those (at the versions of constraints.txt) and
everything they depend on, for the target Python on x86-64 Linux, into one folder with a
``requirements.txt`` naming the top-level pins; ``launch.gpu_check --wheels <folder>`` installs from it
with ``--no-index``. No torch and no CUDA libraries: the GPU machine's own are used.

antlr4-python3-runtime (omegaconf's parser runtime) is published only as a source archive; it is pure
Python, so it is built into a wheel here first. The folder must stay under 60 MiB (it travels with the
working tree); it is about 30 MiB.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONSTRAINTS = REPO / "constraints.txt"
PACKAGES = ("hydra-core", "omegaconf", "wandb", "pytest-timeout")
"""What gpu-check's stages import that a GPU machine's stock environment lacks."""
SOURCE_ONLY = ("antlr4-python3-runtime",)
"""Dependencies without a wheel on the registry: built into one here (pure Python, any platform)."""
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
             "manylinux1_x86_64")  # fmt: skip
MAX_BYTES = 60 * 2**20
REQUIREMENTS = "requirements.txt"


def pinned(names: tuple[str, ...], *, constraints: Path = CONSTRAINTS) -> list[str]:
    """``name==version`` for each of ``names``, as constraints.txt pins it."""
    pins = {}
    for line in constraints.read_text().splitlines():
        if "==" in line and not line.startswith("#"):
            name, version = line.split("==", 1)
            pins[name.strip().lower()] = version.strip()
    missing = [n for n in names if n.lower() not in pins]
    if missing:
        raise ValueError(f"{constraints} pins no version of {missing}: add them (pip freeze) and try again")
    return [f"{n}=={pins[n.lower()]}" for n in names]


def _pip(*args: str) -> None:
    cmd = [sys.executable, "-m", "pip", "--disable-pip-version-check", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"pip failed (exit {proc.returncode}): {' '.join(cmd)}\n{proc.stderr[-3000:]}")


def download(dest: Path, *, python_version: str, constraints: Path = CONSTRAINTS) -> int:
    """Fill ``dest`` with the wheels and their ``requirements.txt``; returns the folder's size in bytes."""
    dest.mkdir(parents=True, exist_ok=True)
    _pip("wheel", "--quiet", "--no-deps", "--wheel-dir", str(dest), *pinned(SOURCE_ONLY, constraints=constraints))
    platforms = [arg for p in PLATFORMS for arg in ("--platform", p)]
    _pip("download", "--quiet", "--only-binary=:all:", "--python-version", python_version, "--implementation", "cp",
         *platforms, "--dest", str(dest), "--find-links", str(dest), "--constraint", str(constraints),
         *pinned(PACKAGES, constraints=constraints))  # fmt: skip
    (dest / REQUIREMENTS).write_text("\n".join(pinned(PACKAGES, constraints=constraints)) + "\n")
    size = sum(p.stat().st_size for p in dest.iterdir() if p.is_file())
    if size > MAX_BYTES:
        raise RuntimeError(f"{dest} holds {size / 2**20:.1f} MiB of wheels, more than {MAX_BYTES / 2**20:.0f} MiB")
    return size


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dest", type=Path, default=REPO / "gpu_wheels")
    parser.add_argument("--python-version", default="3.12", help="the GPU machine's Python (major.minor)")
    args = parser.parse_args(argv)
    size = download(args.dest, python_version=args.python_version)
    wheels = sorted(p.name for p in args.dest.glob("*.whl"))
    print(f"{len(wheels)} wheels, {size / 2**20:.1f} MiB, in {args.dest} for Python {args.python_version}; "
          f"copy the folder next to the repository on the GPU machine and run: make gpu-check")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
