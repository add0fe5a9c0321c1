"""``python -m launch.prepare``: the stages of data preparation, as independent tasks, equal to one process."""

from __future__ import annotations

import pytest

from launch.prepare import _slurm_array_task, main
from tests.launch.prepare_corpus import corpus_overrides, shard_tree, write_corpus


@pytest.fixture
def corpus(tmp_path):
    return write_corpus(tmp_path / "corpus")


def test_four_tasks_in_any_order_write_the_bytes_of_one_process(corpus, tmp_path):
    main(["--stage", "all", *corpus_overrides(corpus, cache=tmp_path / "one")])
    staged = corpus_overrides(corpus, cache=tmp_path / "four")
    main(["--stage", "tokenizer", *staged])
    for task in (2, 0, 3, 1):
        main(["--stage", "tokenize", "--task", str(task), "--num-tasks", "4", *staged])
    main(["--stage", "index", *staged])
    one, four = shard_tree(tmp_path / "one"), shard_tree(tmp_path / "four")
    assert sum(name.endswith(".bin") for name in one) >= 2 * 8  # >= 8 groups, two splits each: every task works
    assert any(name.endswith("index.json") for name in one)
    assert one.keys() == four.keys()
    assert [name for name in one if one[name] != four[name]] == []


def test_the_index_stage_names_the_groups_still_missing(corpus, tmp_path):
    staged = corpus_overrides(corpus, cache=tmp_path / "cache")
    main(["--stage", "tokenizer", *staged])
    for task in (0, 1, 3):
        main(["--stage", "tokenize", "--task", str(task), "--num-tasks", "4", *staged])
    with pytest.raises(RuntimeError, match=r"shard groups are not tokenized .* shard groups \[2, 6"):
        main(["--stage", "index", *staged])
    main(["--stage", "tokenize", "--task", "2", "--num-tasks", "4", *staged])
    main(["--stage", "index", *staged])


def test_tokenize_before_the_tokenizer_stage_says_what_to_run(corpus, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"run `python -m launch.prepare --stage tokenizer` with the same"):
        main(["--stage", "tokenize", "--task", "0", "--num-tasks", "2", *corpus_overrides(corpus, cache=tmp_path)])


def test_a_task_outside_the_range_is_an_error(corpus, tmp_path):
    staged = corpus_overrides(corpus, cache=tmp_path)
    main(["--stage", "tokenizer", *staged])
    with pytest.raises(ValueError, match="task 4 of 4 does not exist"):
        main(["--stage", "tokenize", "--task", "4", "--num-tasks", "4", *staged])


def test_the_task_defaults_to_the_slurm_array_task(monkeypatch):
    assert _slurm_array_task() == (0, 1)
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "5")
    monkeypatch.setenv("SLURM_ARRAY_TASK_MIN", "4")
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "2")
    assert _slurm_array_task() == (1, 2)
