"""Shared fixtures: composing the project config with overrides, and a tiny real-text corpus.

Tests force the CPU, fp32, tiny sizes, offline wandb, and write only under pytest's tmp paths.
"""

from __future__ import annotations

import shutil
import sysconfig
from pathlib import Path

import pytest
from hydra import compose, initialize_config_module
from omegaconf import DictConfig

# A few stdlib modules as a small real corpus: code with indentation, digits and docstrings.
_TINY_CORPUS_MODULES = ("textwrap.py", "string.py", "bisect.py", "heapq.py", "fnmatch.py", "colorsys.py",
                        "keyword.py", "this.py", "glob.py", "shlex.py", "difflib.py", "calendar.py")  # fmt: skip
TINY_VOCAB = 512


def compose_config(overrides: list[str] | tuple[str, ...] = ()) -> DictConfig:
    """The project config as `python -m launch.train <overrides>` would see it (Hydra state is cleared)."""
    with initialize_config_module(config_module="conf", version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory) -> Path:
    """A directory of ~300 KB of Python source files."""
    root = tmp_path_factory.mktemp("tiny_corpus")
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for name in _TINY_CORPUS_MODULES:
        shutil.copy(stdlib / name, root / name)
    return root


@pytest.fixture(scope="session")
def tiny_cache(tmp_path_factory) -> Path:
    """One data cache for the session: the tiny tokenizer and shards are built once, reused after."""
    return tmp_path_factory.mktemp("data_cache")


@pytest.fixture(scope="session")
def tiny_conf_dir(tmp_path_factory, tiny_corpus) -> Path:
    """An extra config search path holding ``data/tiny.yaml``, the way a user adds a corpus."""
    root = tmp_path_factory.mktemp("extra_conf")
    (root / "data").mkdir()
    (root / "data" / "tiny.yaml").write_text(
        f"sources:\n  tiny:\n    paths: [{tiny_corpus}]\n    weight: 1.0\n"
        f"tokenizer:\n  vocab_size: {TINY_VOCAB}\n"
    )
    return root


@pytest.fixture
def tiny_overrides(tiny_conf_dir, tiny_cache) -> list[str]:
    """Overrides that train the debug model on the tiny corpus, on CPU in fp32, logging offline."""
    return [
        f"hydra.searchpath=[file://{tiny_conf_dir}]",
        "data=tiny",
        "model=debug",
        f"model.vocab_size={TINY_VOCAB}",
        f"data.cache_dir={tiny_cache}",
        "data.seq_len=64",
        "data.val_fraction=0.2",
        "data.progress=false",
        "trainer.device=cpu",
        "trainer.precision=fp32",
        "trainer.micro_batch_size=4",
        "trainer.max_steps=30",
        "trainer.eval_every=15",
        "trainer.eval_steps=2",
        "trainer.peak_flops=1e11",  # skip the CPU matmul measurement; MFU is not what these tests check
        "optim.lr=3e-3",
        "optim.warmup_steps=5",
        "logging.log_every=5",
        "logging.wandb_mode=offline",
    ]


REFERENCE_STEPS = 10
PINNED_SCHEDULE = ("optim.decay_steps=10",)
"""Reference runs pin the cosine's length, so a run stopped early follows the same schedule as a full one."""


@pytest.fixture(scope="session")
def reference_run(tmp_path_factory):
    """``reference_run(name)``: the debug model trained for 10 steps under layout ``name`` (see
    launch/loss_compare.py), run once per session on first use and shared by the tests that compare
    against it. The returned run directory holds summary.json, final_model.pt and checkpoints/."""
    from launch.harness import LAYOUTS, run_layout

    workdir = tmp_path_factory.mktemp("reference_runs")
    cache: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in cache:
            cache[name] = run_layout(LAYOUTS[name], workdir=workdir, steps=REFERENCE_STEPS, extra=PINNED_SCHEDULE)
        return cache[name]

    get.workdir = workdir
    return get
