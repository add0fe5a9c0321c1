"""Malformed records: an error naming the file and line (Parquet: row group), or with data.bad_records=skip
skipped, counted in the log and in the shard sidecars; never silently."""

import json
import logging
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data import SourceConfig, prepare_data
from data.shards import read_sidecar
from data.sources import BadRecordError
from tests.data.conftest import code_document, make_config

# Line numbers (1-based) of the bad lines in _web_lines, and what is wrong with each.
BAD_LINES = {
    4: '{"text": ',  # the case: JSON cut short
    7: "[1, 2, 3]",  # valid JSON, not an object
    9: '{"body": "no text field"}',
    12: '{"text": 42}',  # text not a string
}


def _web_lines(*, bad: bool) -> list[str]:
    """16 JSONL lines of documents; the BAD_LINES ones malformed, or (bad=False) blank, so that every good
    document keeps its line number (and so its doc id and split)."""
    lines = []
    for number in range(1, 17):
        if number in BAD_LINES:
            lines.append(BAD_LINES[number] if bad else "")
        else:
            lines.append(json.dumps({"text": code_document(seed=number)}))
    return lines


def _web(tmp_path: Path, *, bad: bool = True) -> Path:
    path = tmp_path / ("web" if bad else "clean") / "part-0.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(_web_lines(bad=bad)) + "\n")
    return path


@pytest.mark.parametrize("trained", [True, False], ids=["tokenizer-training", "tokenization"])
def test_a_malformed_jsonl_line_stops_the_run_naming_file_and_line(tmp_path, tiny_tokenizer_path, trained):
    """The first bad line (4) is reached while training the tokenizer (where sentencepiece used to turn it
    into 'RuntimeError: INTERNAL: JSONDecodeError ...') or, with a given tokenizer, in a spawned worker."""
    web = _web(tmp_path)
    (web.parent / "part-1.jsonl").write_text("\n".join(_web_lines(bad=False)) + "\n")
    # shard_bytes=1: one shard per file, so with a given tokenizer two spawned workers tokenize them.
    cfg = make_config(tmp_path, sources={"web": SourceConfig(paths=[str(web.parent)])},
                      tokenizer_path=None if trained else tiny_tokenizer_path, num_proc=2, shard_bytes=1)  # fmt: skip
    cfg.tokenizer.vocab_size = 300
    with pytest.raises(BadRecordError, match=rf"{web}:4: is not valid JSON .*data\.bad_records=skip") as err:
        prepare_data(cfg)
    assert "INTERNAL" not in str(err.value)


@pytest.mark.parametrize(
    "line, message",
    [
        (7, r"part-0\.jsonl:7: is a JSON list, not an object with a 'text' field"),
        (9, r"part-0\.jsonl:9: has no field 'text' \(data\.sources\.web\.text_field='text'; fields: \['body'\]\)"),
        (12, r"part-0\.jsonl:12: has 'text' of type int, not a string"),
    ],
    ids=["list", "no-field", "not-a-string"],
)
def test_each_kind_of_bad_record_is_named(tmp_path, tiny_tokenizer_path, line, message):
    path = tmp_path / "web" / "part-0.jsonl"
    path.parent.mkdir()
    good = _web_lines(bad=False)
    path.write_text("\n".join(BAD_LINES[line] if n + 1 == line else text for n, text in enumerate(good)) + "\n")
    cfg = make_config(tmp_path, sources={"web": SourceConfig(paths=[str(path)])}, tokenizer_path=tiny_tokenizer_path)
    with pytest.raises(BadRecordError, match=message):
        prepare_data(cfg)


def test_skip_counts_bad_records_in_log_and_sidecars_and_keeps_the_rest(tmp_path, tiny_tokenizer_path, caplog):
    web, clean = _web(tmp_path), _web(tmp_path, bad=False)
    skip = make_config(tmp_path, sources={"web": SourceConfig(paths=[str(web)])}, tokenizer_path=tiny_tokenizer_path,
                       bad_records="skip", cache_dir=str(tmp_path / "skip"))  # fmt: skip
    with caplog.at_level(logging.WARNING):
        prepared = prepare_data(skip)
    assert "data.sources.web: 4 bad record(s) skipped in all" in caplog.text
    assert f"shard 0 skipped 4 bad record(s) (data.bad_records=skip); first: {web}:4: is not valid JSON" in caplog.text
    for split in ("train", "val"):
        sidecar = read_sidecar(prepared.shards[split]["web"][0])
        assert sidecar["bad_records_skipped"] == 4
        assert [entry.split(": ")[0] for entry in sidecar["bad_record_locations"]] == [f"{web}:{n}" for n in BAD_LINES]

    # The good documents, byte for byte: the same shards as the file with the bad lines left blank.
    reference = prepare_data(make_config(tmp_path, sources={"web": SourceConfig(paths=[str(clean)])},
                                         tokenizer_path=tiny_tokenizer_path, cache_dir=str(tmp_path / "ref")))  # fmt: skip
    for split in ("train", "val"):
        assert Path(prepared.shards[split]["web"][0]).read_bytes() == Path(reference.shards[split]["web"][0]).read_bytes()
        assert read_sidecar(reference.shards[split]["web"][0])["bad_records_skipped"] == 0

    # A shard that skipped records does not count as finished for a run that wants errors.
    skip.bad_records = "error"
    with pytest.raises(BadRecordError, match=rf"{web}:4"):
        prepare_data(skip)


def _parquet_with_a_broken_row_group(path: Path) -> None:
    """Two row groups of 20 documents, uncompressed page header of the first overwritten."""
    table = pa.table({"text": [code_document(seed=seed) for seed in range(40)]})
    pq.write_table(table, path, row_group_size=20, use_dictionary=False)
    data = bytearray(path.read_bytes())
    first_page = pq.ParquetFile(path).metadata.row_group(0).column(0).data_page_offset
    data[first_page : first_page + 20] = b"\xff" * 20
    path.write_bytes(bytes(data))


def test_an_unreadable_parquet_row_group_is_named_or_skipped(tmp_path, tiny_tokenizer_path):
    path = tmp_path / "books" / "part-0.parquet"
    path.parent.mkdir()
    _parquet_with_a_broken_row_group(path)
    cfg = make_config(tmp_path, sources={"books": SourceConfig(paths=[str(path)])}, tokenizer_path=tiny_tokenizer_path)
    with pytest.raises(BadRecordError, match=rf"{path}: row group 0: cannot be read"):
        prepare_data(cfg)
    cfg.bad_records = "skip"
    prepared = prepare_data(cfg)
    sidecars = [read_sidecar(prepared.shards[split]["books"][0]) for split in ("train", "val")]
    assert all(s["bad_records_skipped"] == 20 for s in sidecars)  # every row of the group
    assert sum(s["num_documents"] for s in sidecars) == 20  # the second group, all of it
    assert sidecars[0]["bad_record_locations"][0].startswith(f"{path}: row group 0: cannot be read")


def test_a_bad_record_policy_that_does_not_exist_is_a_config_error(tmp_path):
    with pytest.raises(ValueError, match="'sometimes' is not a valid BadRecordPolicy"):
        make_config(tmp_path, sources={"web": SourceConfig(paths=["x"])}, tokenizer_path=None, bad_records="sometimes")
