import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import data.prepare
from data import SourceConfig, Tokenizer, prepare_data
from data.shards import read_sidecar, token_dtype
from data.sources import is_val
from tests.data.conftest import code_document, make_config, write_text_files


def _shard_files(prepared) -> list[Path]:
    bins = [Path(p) for split in prepared.shards.values() for paths in split.values() for p in paths]
    return sorted(bins + [b.with_suffix(".json") for b in bins])


def _mtimes(paths) -> dict[Path, int]:
    return {p: p.stat().st_mtime_ns for p in paths}


def test_token_dtype_fits_the_vocabulary():
    assert token_dtype(400) == np.uint16
    assert token_dtype(65536) == np.uint16  # ids 0..65535
    assert token_dtype(65537) == np.uint32
    assert token_dtype(128_256) == np.uint32


def test_shards_hold_every_document_with_bos_eos(tmp_path, tiny_tokenizer, tiny_tokenizer_path):
    files = write_text_files(tmp_path / "code", count=12)
    cfg = make_config(tmp_path, sources={"code": SourceConfig(paths=[str(tmp_path / "code")])},
                      tokenizer_path=tiny_tokenizer_path, shard_bytes=2000)  # fmt: skip
    prepared = prepare_data(cfg)
    assert prepared.vocab_size == 400 and prepared.weights == {"code": 1.0}
    expected = {"train": 0, "val": 0}
    for path in files:
        split = "val" if is_val(path.name, val_fraction=cfg.val_fraction) else "train"
        expected[split] += len(tiny_tokenizer.encode(path.read_text())) + 2
    assert {split: prepared.num_tokens[split]["code"] for split in expected} == expected
    sidecars = [read_sidecar(p) for split in prepared.shards.values() for p in split["code"]]
    assert len(sidecars) > 2  # shard_bytes=2000 forces several shards
    for path, sidecar in zip([p for s in prepared.shards.values() for p in s["code"]], sidecars):
        assert sidecar["tokenizer_sha256"] == tiny_tokenizer.sha256
        assert sidecar["vocab_size"] == 400 and sidecar["dtype"] == "uint16"
        assert Path(path).stat().st_size == 2 * sidecar["num_tokens"]
        assert all(entry["path"].startswith(str(tmp_path)) for entry in sidecar["inputs"])
        tokens = np.fromfile(path, dtype=np.uint16)
        assert tokens[0] == 1 and tokens[-1] == 2
        assert (tokens == 1).sum() == sidecar["num_documents"] == (tokens == 2).sum()
    assert sum(s["num_documents"] for s in sidecars) == len(files)


def test_rerun_skips_finished_shards_and_redoes_incomplete_ones(tmp_path, tiny_tokenizer_path, monkeypatch):
    write_text_files(tmp_path / "code", count=8)
    cfg = make_config(tmp_path, sources={"code": SourceConfig(paths=[str(tmp_path / "code")])},
                      tokenizer_path=tiny_tokenizer_path, shard_bytes=1500)  # fmt: skip
    prepared = prepare_data(cfg)
    before = _mtimes(_shard_files(prepared))

    def fail(task):
        raise AssertionError(f"re-tokenized finished shard {task.index}")

    with monkeypatch.context() as patch:
        patch.setattr(data.prepare, "tokenize_shard", fail)
        assert prepare_data(cfg) == prepared
    assert _mtimes(_shard_files(prepared)) == before

    # A crash before the sidecar was written: only that shard group is redone.
    lost = Path(prepared.shards["train"]["code"][1])
    lost.with_suffix(".json").unlink()
    redone = []
    real = data.prepare.tokenize_shard
    monkeypatch.setattr(data.prepare, "tokenize_shard", lambda task: redone.append(task.index) or real(task))
    assert prepare_data(cfg) == prepared
    assert redone == [int(lost.stem.split("_")[1])]
    after = _mtimes(_shard_files(prepared))
    assert {p for p in before if after[p] != before[p]} == {
        p for p in before if p.stem == lost.stem
    }  # both splits of that group, nothing else


def test_changed_tokenizer_or_split_does_not_reuse_shards(tmp_path, tiny_tokenizer_path):
    write_text_files(tmp_path / "code", count=6)
    cfg = make_config(tmp_path, sources={"code": SourceConfig(paths=[str(tmp_path / "code")])},
                      tokenizer_path=tiny_tokenizer_path)  # fmt: skip
    first = prepare_data(cfg)
    cfg.val_fraction = 0.5
    second = prepare_data(cfg)
    assert read_sidecar(second.shards["train"]["code"][0])["val_fraction"] == 0.5
    assert first.num_tokens != second.num_tokens


def _jsonl_and_parquet(tmp_path: Path) -> dict[str, SourceConfig]:
    (tmp_path / "web").mkdir()
    with open(tmp_path / "web" / "part0.jsonl", "w") as fh:
        for seed in range(30):
            fh.write(json.dumps({"id": seed, "content": code_document(seed=seed, lines=3)}) + "\n")
        fh.write("\n")  # blank lines are skipped
    texts = [code_document(seed=100 + seed, lines=3) for seed in range(30)] + [None, ""]
    pq.write_table(pa.table({"body": texts}), tmp_path / "books.parquet")
    return {
        "web": SourceConfig(paths=[str(tmp_path / "web" / "*.jsonl")], text_field="content", weight=3.0),
        "books": SourceConfig(paths=[str(tmp_path / "books.parquet")], text_field="body", weight=1.0),
    }


def test_jsonl_and_parquet_text_fields(tmp_path, tiny_tokenizer, tiny_tokenizer_path):
    cfg = make_config(tmp_path, sources=_jsonl_and_parquet(tmp_path), tokenizer_path=tiny_tokenizer_path)
    prepared = prepare_data(cfg)
    assert prepared.weights == {"web": 0.75, "books": 0.25}
    for source, first_seed, doc_id in [("web", 0, "part0.jsonl:{}"), ("books", 100, "books.parquet:{}")]:
        docs = {"train": [], "val": []}
        for index in range(30):
            split = "val" if is_val(doc_id.format(index), val_fraction=cfg.val_fraction) else "train"
            docs[split].append(code_document(seed=first_seed + index, lines=3))
        for split, texts in docs.items():
            stream = np.concatenate([np.fromfile(p, dtype=np.uint16) for p in prepared.shards[split][source]])
            expected = [t for text in texts for t in tiny_tokenizer.encode(text, bos=True, eos=True)]
            assert stream.tolist() == expected, (source, split)


def test_split_is_deterministic_and_disjoint(tmp_path):
    sources = _jsonl_and_parquet(tmp_path)
    runs = [prepare_data(make_config(tmp_path / run, sources=sources, tokenizer_path=None)) for run in ("a", "b")]
    # Trained tokenizers are byte-identical too: same data and settings, a different cache_dir.
    assert runs[0].tokenizer_sha256 == runs[1].tokenizer_sha256
    tokenizer = Tokenizer(runs[0].tokenizer_path)
    markers = {}
    for split in ("train", "val"):
        streams = [b"".join(Path(p).read_bytes() for p in run.shards[split]["web"]) for run in runs]
        assert streams[0] == streams[1]
        ids = np.frombuffer(streams[0], dtype=np.uint16)
        documents = np.split(ids, np.flatnonzero(ids == 1)[1:])  # cut before each BOS
        markers[split] = {tokenizer.decode(doc).splitlines()[0] for doc in documents}
    assert markers["train"] and markers["val"]
    assert markers["train"].isdisjoint(markers["val"])
    assert len(markers["train"] | markers["val"]) == 30


def test_trained_tokenizer_is_cached_per_recipe(tmp_path):
    write_text_files(tmp_path / "code", count=20)
    sources = {"code": SourceConfig(paths=[str(tmp_path / "code")])}
    cfg = make_config(tmp_path, sources=sources, tokenizer_path=None)
    first = prepare_data(cfg)
    mtime = Path(first.tokenizer_path).stat().st_mtime_ns
    assert prepare_data(cfg).tokenizer_path == first.tokenizer_path
    assert Path(first.tokenizer_path).stat().st_mtime_ns == mtime  # reused, not retrained
    cfg.tokenizer.vocab_size = 350
    other = prepare_data(cfg)
    assert other.tokenizer_path != first.tokenizer_path and other.vocab_size == 350
    assert Path(first.tokenizer_path).parent.parent == Path(cfg.cache_dir) / "tokenizer"
    assert not list(Path(first.tokenizer_path).parent.glob(".*tmp*"))


def test_two_workers_write_the_same_shards_as_one(tmp_path, tiny_tokenizer_path):
    write_text_files(tmp_path / "code", count=16)
    sources = {"code": SourceConfig(paths=[str(tmp_path / "code")])}
    single = prepare_data(make_config(tmp_path / "one", sources=sources, tokenizer_path=tiny_tokenizer_path,
                                      shard_bytes=3000))  # fmt: skip
    multi = prepare_data(make_config(tmp_path / "two", sources=sources, tokenizer_path=tiny_tokenizer_path,
                                     shard_bytes=3000, num_proc=2, progress=True))  # fmt: skip
    assert multi.num_tokens == single.num_tokens
    for split in ("train", "val"):
        pairs = zip(single.shards[split]["code"], multi.shards[split]["code"], strict=True)
        assert all(Path(a).read_bytes() == Path(b).read_bytes() for a, b in pairs)


@pytest.mark.parametrize(
    "paths, match",
    [
        (["{tmp}/missing/*.txt"], r"data\.sources\.empty: paths .*missing"),
        (["{tmp}/blank"], r"data\.sources\.empty: paths .*blank.* no text"),
    ],
)
@pytest.mark.parametrize("trained", [False, True])
def test_empty_corpus_names_the_source(tmp_path, tiny_tokenizer_path, paths, match, trained):
    write_text_files(tmp_path / "code", count=3)
    (tmp_path / "blank").mkdir()
    (tmp_path / "blank" / "a.txt").write_text("")
    (tmp_path / "blank" / "b.txt").write_text("  \n\n")
    sources = {
        "code": SourceConfig(paths=[str(tmp_path / "code")]),
        "empty": SourceConfig(paths=[p.format(tmp=tmp_path) for p in paths]),
    }
    cfg = make_config(tmp_path, sources=sources, tokenizer_path=None if trained else tiny_tokenizer_path)
    with pytest.raises(ValueError, match=match):
        prepare_data(cfg)


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda cfg: setattr(cfg.sources["code"], "weight", 0.0), r"data\.sources\.code\.weight"),
        (lambda cfg: setattr(cfg.sources["code"], "weight", -1.0), r"data\.sources\.code\.weight"),
        (lambda cfg: setattr(cfg.tokenizer, "path", "/no/such/tokenizer.model"), r"data\.tokenizer\.path"),
        (lambda cfg: setattr(cfg, "val_fraction", 1.0), r"data\.val_fraction"),
        (lambda cfg: setattr(cfg, "sources", {}), r"data\.sources"),
        (lambda cfg: setattr(cfg.sources["code"], "text_field", "body"), None),
    ],
)
def test_bad_config_names_the_key(tmp_path, tiny_tokenizer_path, change, match):
    (tmp_path / "code").mkdir()
    (tmp_path / "code" / "a.jsonl").write_text(json.dumps({"text": "hello"}) + "\n")
    cfg = make_config(tmp_path, sources={"code": SourceConfig(paths=[str(tmp_path / "code")])},
                      tokenizer_path=tiny_tokenizer_path)  # fmt: skip
    change(cfg)
    with pytest.raises(ValueError, match=match or r"data\.sources\.code\.text_field.*'body'"):
        prepare_data(cfg)
