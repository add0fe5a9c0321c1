"""Data preparation as Slurm jobs on the local two-node cluster (slow; `make test-multinode`): the tokenizer job,
an array of 4 tokenize tasks spread over both nodes, and the index job, submitted by launch/prepare_slurm.sh,
write the same bytes as one process."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from launch.prepare import main
from tests.launch.prepare_corpus import corpus_overrides, shard_tree, write_corpus

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]


def test_four_array_tasks_on_two_nodes_write_the_bytes_of_one_process(local_slurm, tmp_path):
    corpus = write_corpus(tmp_path / "corpus")
    main(["--stage", "all", *corpus_overrides(corpus, cache=tmp_path / "one")])  # the reference, here

    slurm = local_slurm(ctld_port=6937, node_port=6941)
    env = {**slurm.env, "PYTHON": sys.executable, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1",
           "SBATCH_ARGS": f"--output={tmp_path}/job-%j.out --export=ALL"}  # fmt: skip
    overrides = corpus_overrides(corpus, cache=tmp_path / "slurm")
    submitted = subprocess.run([str(REPO / "launch" / "prepare_slurm.sh"), "4", *overrides], env=env, cwd=tmp_path,
                               check=True, capture_output=True, text=True).stdout.split()  # fmt: skip
    assert len(submitted) == 3, submitted
    index_job = submitted[2]
    try:
        state = slurm.wait(index_job, timeout_s=300)
    finally:
        logs = "\n".join(f"== {p.name}\n{p.read_text()}" for p in sorted(tmp_path.glob("job-*.out")))
        print(logs)
    assert state == "COMPLETED", logs[-4000:]

    placed = dict(re.findall(r"array task (\d) on (n\d):", logs))
    assert sorted(placed) == ["0", "1", "2", "3"], logs[-4000:]
    assert set(placed.values()) == {"n1", "n2"}, placed  # the 4 tasks ran on both nodes
    assert len(re.findall(r"task \d of 4 on n\d: \d+ shard groups done", logs)) == 4

    one, on_slurm = shard_tree(tmp_path / "one"), shard_tree(tmp_path / "slurm")
    assert sum(name.endswith(".bin") for name in one) >= 2 * 8 and any(n.endswith("index.json") for n in one)
    assert one.keys() == on_slurm.keys()
    assert [name for name in one if one[name] != on_slurm[name]] == []
