"""Instruction records: both layouts through the template, tokens and loss masks computed by hand, errors
naming file and line, and the packing loader (rows, document ids, padding, resume, data-parallel shares)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from data.instruction_loader import InstructionLoader, pack
from data.instructions import (
    IGNORE_INDEX, InstructionFileError, InstructionLayout, InstructionsConfig, InstructionTemplate, TokenizedRecord,
    prepare_instructions, read_records, tokenize_record,
)  # fmt: skip
from data.synthetic_instructions import make_instructions

BOS, EOS = 1, 2


def encode(text: str) -> list[int]:
    """One id per character (10 + its code point): every number below can be worked out by hand."""
    return [10 + ord(c) for c in text]


def write(path, rows) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def test_both_layouts_become_prompt_and_response_segments(tmp_path):
    rows = [{"instruction": "Add.", "input": "2 and 3", "output": "5"}, {"instruction": "Hi?", "output": "Yo"},
            {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                          {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Bye"},
                          {"role": "assistant", "content": "Ciao"}]}]  # fmt: skip
    records = list(read_records(write(tmp_path / "r.jsonl", rows), layout=InstructionLayout.auto,
                                template=InstructionTemplate()))  # fmt: skip
    assert records[0] == [("Add.\n\n2 and 3\n\n", False), ("5", True)]
    assert records[1] == [("Hi?\n\n", False), ("Yo", True)]  # no input: the template without it
    assert records[2] == [("Be brief.\n\n", False), ("Hi\n\n", False), ("Hello", True), ("Bye\n\n", False), ("Ciao", True)]


def test_labels_train_the_response_and_its_eos_only():
    record, cut = tokenize_record([("ab", False), ("c", True)], encode=encode, bos_id=BOS, eos_id=EOS, max_tokens=16)
    assert not cut
    assert record.ids.tolist() == [BOS, 107, 108, 109, EOS]
    inputs, labels = record.inputs_labels()
    assert inputs.tolist() == [BOS, 107, 108, 109]
    # position t predicts token t + 1: only "c" and EOS (the response) are trained on
    assert labels.tolist() == [IGNORE_INDEX, IGNORE_INDEX, 109, EOS]
    chat, _ = tokenize_record([("u", False), ("x", True), ("v", False), ("y", True)], encode=encode, bos_id=BOS,
                              eos_id=EOS, max_tokens=16)  # fmt: skip
    assert chat.inputs_labels()[1].tolist() == [IGNORE_INDEX, 130, EOS, IGNORE_INDEX, 131, EOS]


def test_long_records_are_cut_and_promptonly_ones_dropped(tmp_path):
    record, cut = tokenize_record([("abc", False), ("defgh", True)], encode=encode, bos_id=BOS, eos_id=EOS, max_tokens=6)
    assert cut and len(record.ids) == 6 and record.trained.tolist() == [False] * 4 + [True] * 2
    assert tokenize_record([("abcdef", False), ("g", True)], encode=encode, bos_id=BOS, eos_id=EOS, max_tokens=5)[0] is None
    cfg = InstructionsConfig(train=write(tmp_path / "t.jsonl", [{"instruction": "x" * 50, "output": "y"}] * 3))
    with pytest.raises(ValueError, match="no train records left .* 3 had no room for a response in data.seq_len=8"):
        prepare_instructions(cfg, encode=encode, bos_id=BOS, eos_id=EOS, seq_len=8)


@pytest.mark.parametrize("line, message", [
    ('{"instruction": "a"}', "needs a string 'output'"),
    ('{"messages": [{"role": "robot", "content": "x"}]}', "each message needs a role"),
    ('{"messages": [{"role": "user", "content": "x"}]}', "at least one assistant turn"),
    ('{"instruction": "a", "output": ', "not valid JSON"),
    ('[1]', "expected a JSON object"),
])  # fmt: skip
def test_a_bad_record_is_named_by_file_and_line(tmp_path, line, message):
    path = write(tmp_path / "bad.jsonl", [{"instruction": "a", "output": "b"}, "", line])
    with pytest.raises(InstructionFileError, match=rf"bad\.jsonl:3: .*{message}"):
        list(read_records(path, layout=InstructionLayout.auto, template=InstructionTemplate()))


def _records(lengths: list[int]) -> list[TokenizedRecord]:
    return [TokenizedRecord(ids=np.arange(100 * i, 100 * i + n), trained=np.array([False] + [True] * (n - 1)))
            for i, n in enumerate(lengths)]  # fmt: skip


def test_rows_pack_whole_records_apart_and_pad_the_rest():
    assert pack([3, 4, 5, 2], order=np.arange(4), seq_len=8) == [[0, 1], [2, 3]]
    loader = InstructionLoader(_records([4, 5, 6, 3]), seq_len=8, batch_size=2, shuffle=False)
    batch = next(loader)  # rows: records 0 + 1 (3 + 4 inputs), records 2 (5) + 3 (2)
    assert batch["documents"].tolist() == [[0, 0, 0, 1, 1, 1, 1, 2], [0, 0, 0, 0, 0, 1, 1, 2]]
    assert batch["inputs"][0].tolist() == [0, 1, 2, 100, 101, 102, 103, 0]
    assert batch["labels"][0].tolist() == [1, 2, 3, 101, 102, 103, 104, IGNORE_INDEX]  # padding: no loss
    with pytest.raises(ValueError, match="longer than data.seq_len=4"):
        InstructionLoader(_records([6]), seq_len=4, batch_size=1)


def test_the_global_row_order_is_independent_of_the_data_parallel_degree_and_resumes():
    records = _records([3 + i % 5 for i in range(40)])
    one = InstructionLoader(records, seq_len=12, batch_size=4, seed=3)
    halves = [InstructionLoader(records, seq_len=12, batch_size=2, dp_rank=r, dp_size=2, seed=3) for r in range(2)]
    for _ in range(6):  # beyond one epoch of rows
        whole = next(one)
        parts = [next(h) for h in halves]
        assert torch.equal(whole["inputs"], torch.cat([p["inputs"] for p in parts]))
    state = one.state_dict()
    resumed = InstructionLoader(records, seq_len=12, batch_size=4, seed=3)
    resumed.load_state_dict(state)
    assert torch.equal(next(resumed)["inputs"], next(one)["inputs"])
    other = InstructionLoader(records[:-1], seq_len=12, batch_size=4, seed=3)
    with pytest.raises(ValueError, match="finetuned on 40 records with seed 3, this run has 39"):
        other.load_state_dict(state)
    with pytest.raises(ValueError, match="pre-training loader's"):
        other.load_state_dict({"version": 1, "consumed": 0})


def test_skipped_rows_are_never_yielded():
    records = _records([3 + i % 5 for i in range(40)])
    plain, skipping = (InstructionLoader(records, seq_len=12, batch_size=2, seed=0) for _ in range(2))
    skipping.skip(2, 6)
    batches = [next(plain)["inputs"] for _ in range(4)]
    assert torch.equal(next(skipping)["inputs"], batches[0]) and torch.equal(next(skipping)["inputs"], batches[3])


def test_the_synthetic_set_holds_out_unseen_inputs():
    train, held = make_instructions(train=500, held_out=50, seed=0)
    seen = {r["input"] for r in train}
    assert not any(r["input"] in seen for r in held)
    assert {r["task"] for r in held} == {"repeat", "first", "last", "add", "larger"}
    assert make_instructions(train=500, held_out=50, seed=0) == (train, held)
