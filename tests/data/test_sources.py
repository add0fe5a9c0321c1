import sysconfig
from pathlib import Path

import pytest

from data.config import SourceConfig, SourceFormat
from data.sources import is_val, resolve_source_files


def test_stdlib_corpus_is_sorted_deterministic_and_split():
    first = resolve_source_files(name="python_stdlib", src=SourceConfig(paths=["stdlib"]))
    second = resolve_source_files(name="python_stdlib", src=SourceConfig(paths=["stdlib"]))
    assert first == second and len(first) > 100
    root = Path(sysconfig.get_paths()["stdlib"]).resolve()
    paths = [Path(f.path) for f in first]
    assert paths == sorted(paths)
    assert all(p.suffix == ".py" and root in p.parents for p in paths)
    assert not any({"site-packages", "test", "tests"} & set(Path(f.doc_id).parts) for f in first)
    # File-level split: the doc id is the path relative to the stdlib root.
    assert all(f.doc_id == str(Path(f.path).relative_to(root)) for f in first)
    val = [f.doc_id for f in first if is_val(f.doc_id, val_fraction=0.02)]
    assert 0 < len(val) < len(first)


def test_split_is_stable_and_matches_fraction():
    ids = [f"corpus/file_{i}.jsonl:{i % 7}" for i in range(20_000)]
    val = [doc_id for doc_id in ids if is_val(doc_id, val_fraction=0.1)]
    assert val == [doc_id for doc_id in ids if is_val(doc_id, val_fraction=0.1)]
    # Binomial(20000, 0.1) has std ~42; 300 is > 7 sigma, so this only fails on a broken hash.
    assert abs(len(val) - 2000) < 300
    assert not any(is_val(doc_id, val_fraction=0.0) for doc_id in ids)


def test_directories_globs_and_formats(tmp_path):
    (tmp_path / "corpus" / "sub").mkdir(parents=True)
    for name in ["a.txt", "sub/b.md", "c.jsonl", "d.parquet", ".hidden"]:
        (tmp_path / "corpus" / name).write_text("x")
    files = resolve_source_files(name="s", src=SourceConfig(paths=[str(tmp_path / "corpus")]))
    assert [(f.doc_id, f.format) for f in files] == [
        ("a.txt", SourceFormat.text),
        ("c.jsonl", SourceFormat.jsonl),
        ("d.parquet", SourceFormat.parquet),
        ("sub/b.md", SourceFormat.text),
    ]
    globbed = resolve_source_files(name="s", src=SourceConfig(paths=[str(tmp_path / "corpus" / "**" / "*.md")]))
    assert [f.doc_id for f in globbed] == ["sub/b.md"]
    capped = resolve_source_files(name="s", src=SourceConfig(paths=[str(tmp_path / "corpus")], max_files=2))
    assert len(capped) == 2


def test_no_matching_files_names_the_source(tmp_path):
    with pytest.raises(ValueError, match=r"data\.sources\.web.*nothing_here"):
        resolve_source_files(name="web", src=SourceConfig(paths=[str(tmp_path / "nothing_here" / "*.jsonl")]))
