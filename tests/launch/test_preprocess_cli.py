"""``python -m launch.preprocess`` (the LLaMA recipe as a Hydra sweep over the seven sources) and
``make data-demo``'s pipeline: samples -> cleaned sources -> token shards, every recipe step at work."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from data.preprocess.samples import SOURCES, write_samples
from launch.data_demo import WEIGHTS, run_demo, summary

REPO = Path(__file__).resolve().parents[2]


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "launch.preprocess", *args], cwd=cwd, capture_output=True, text=True,
                          env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"}, timeout=600)  # fmt: skip


def test_the_llama_recipe_sweeps_all_seven_sources_from_the_command_line(tmp_path):
    write_samples(tmp_path / "raw")
    done = _cli("--config-name", "llama", f"raw_root={tmp_path / 'raw'}", f"output_root={tmp_path / 'clean'}",
                "executor.workers=1", cwd=tmp_path)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    for source in SOURCES:
        report = json.loads((tmp_path / "clean" / source / "stats.json").read_text())
        assert report["source"] == source and report["steps"][-1]["docs_out"] > 0
        assert f"preprocess {source}: -> {tmp_path / 'clean' / source / 'clean'}" in done.stdout
        assert list((tmp_path / "clean" / source / "clean").glob("*.jsonl"))


def test_a_recipe_without_input_is_a_clear_error(tmp_path):
    done = _cli("preprocess=github", f"raw_root={tmp_path / 'nowhere'}", f"output_root={tmp_path}", cwd=tmp_path)
    assert done.returncode == 2
    assert f"launch.preprocess: ValueError: preprocess.input.paths: ['{tmp_path / 'nowhere'}/github'] match no files" in done.stderr


def test_a_malformed_record_stops_the_command_naming_file_and_line(tmp_path):
    (tmp_path / "raw" / "wikipedia").mkdir(parents=True)
    (tmp_path / "raw" / "wikipedia" / "part-0.jsonl").write_text('{"text": "[[a]] b"}\n{"text": \n')
    done = _cli("preprocess=wikipedia", f"raw_root={tmp_path / 'raw'}", f"output_root={tmp_path / 'out'}",
                "executor.tasks=1", cwd=tmp_path)  # fmt: skip
    assert done.returncode == 2
    assert f"launch.preprocess: BadRecordError: {tmp_path}/raw/wikipedia/part-0.jsonl:2: is not valid JSON" in done.stderr


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return run_demo(tmp_path_factory.mktemp("demo") / "data_demo", tasks=2, workers=1)


def test_the_demo_tokenizes_every_cleaned_source_with_the_papers_weights(demo):
    index = demo["index"]
    total = sum(WEIGHTS.values())
    assert index["weights"] == pytest.approx({s: w / total for s, w in WEIGHTS.items()})
    assert all(index["num_tokens"]["train"][source] > 500 for source in SOURCES)
    table = summary(demo)
    assert all(source in table for source in SOURCES)


@pytest.mark.parametrize(
    "source, step, reason, count",
    [
        ("common_crawl", "line_dedup", None, None),  # boilerplate lines go (checked by bytes below)
        ("common_crawl", "language", "language", 4),  # the two French and two German pages
        ("common_crawl", "min_length", "too_short", 1),  # the menu-only page, once its menu is gone
        ("c4", "c4_quality", None, None),
        ("github", "license", "license", 5),  # the GPL files
        ("github", "license", "no_license", 5),
        ("github", "code_quality", "max_line_length", 1),  # the minified bundle
        ("github", "exact_dedup", "exact_dedup", 1),  # the fork's copy
        ("wikipedia", "wikitext", "empty", 1),  # the stub
        ("books", "minhash_dedup", "minhash_dedup", 2),  # the two reprints
        ("arxiv", "arxiv_latex", "no_section", 1),
        ("stack_exchange", "stack_exchange", "no_answers", None),
    ],
)
def test_each_recipe_step_does_its_work_on_the_samples(demo, source, step, reason, count):
    steps = {s["step"]: s for s in demo["reports"][source]["steps"]}
    report = steps[step]
    if reason is None:
        assert report["docs_out"] < report["docs_in"] or report["bytes_out"] < report["bytes_in"]
    elif count is None:
        assert report["dropped"].get(reason, 0) >= 1
    else:
        assert report["dropped"].get(reason) == count, report


def test_the_demo_keeps_what_it_should(demo, tmp_path):
    clean = Path(demo["reports"]["books"]["output"])
    books = {json.loads(line)["id"] for path in clean.glob("*.jsonl") for line in path.read_text().splitlines()}
    assert "anthology" in books and "book-5" in books and "book-6" in books  # overlap < 90%: kept
    assert len({"book-0", "reprint-of-book-0"} & books) == 1
    web = Path(demo["reports"]["common_crawl"]["output"])
    pages = [json.loads(line) for path in web.glob("*.jsonl") for line in path.read_text().splitlines()]
    assert all("Home | News" not in page["text"] and page["metadata"]["language"] == "en" for page in pages)
