import json
import random

import numpy as np
import pytest
import torch

from data import PackedLoader, SourceConfig, prepare_data
from tests.data.conftest import make_config

SEQ_LEN = 16


def _letters_document(rng: random.Random) -> str:
    return " ".join("".join(rng.choice("abcdefgh") for _ in range(rng.randint(1, 6))) for _ in range(40)) + "\n"


def _digits_document(rng: random.Random) -> str:
    return " ".join(str(rng.randint(0, 10**6)) for _ in range(30)) + "\n"


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, tiny_tokenizer_path):
    """Two sources told apart by their tokens: letters only vs. digits only, weights 3:1."""
    root = tmp_path_factory.mktemp("loader")
    rng = random.Random(0)
    for name, make in [("letters", _letters_document), ("digits", _digits_document)]:
        (root / name).mkdir()
        for index in range(40):
            (root / name / f"{index:02d}.txt").write_text(make(rng))
    sources = {
        "letters": SourceConfig(paths=[str(root / "letters")], weight=3.0),
        "digits": SourceConfig(paths=[str(root / "digits")], weight=1.0),
    }
    return prepare_data(make_config(root, sources=sources, tokenizer_path=tiny_tokenizer_path, shard_bytes=2000))


def _loader(prepared, **overrides) -> PackedLoader:
    settings = dict(split="train", seq_len=SEQ_LEN, batch_size=4, dp_rank=0, dp_size=1, seed=0)
    settings.update(overrides)
    return PackedLoader(prepared, **settings)


def _take(loader, steps: int) -> list[torch.Tensor]:
    return [next(loader)["inputs"] for _ in range(steps)]


def test_batch_shapes_and_shifted_labels(prepared):
    batch = next(_loader(prepared))
    assert batch["inputs"].shape == batch["labels"].shape == (4, SEQ_LEN)
    assert batch["inputs"].dtype == batch["labels"].dtype == torch.int64
    assert torch.equal(batch["inputs"][:, 1:], batch["labels"][:, :-1])
    assert int(batch["inputs"].max()) < prepared.vocab_size


def test_document_mask_marks_a_new_document_at_every_bos(prepared):
    """Documents are stored BOS ... EOS: with ``document_mask`` each input's document index in its window
    rises by one at each BOS, the same batches otherwise."""
    plain, masked = next(_loader(prepared, seq_len=64)), next(_loader(prepared, seq_len=64, document_mask=True))
    assert "documents" not in plain and torch.equal(plain["inputs"], masked["inputs"])
    docs, inputs = masked["documents"], masked["inputs"]
    starts = torch.ones_like(docs, dtype=torch.bool)
    starts[:, 1:] = docs[:, 1:] != docs[:, :-1]
    assert torch.equal(starts[:, 1:], inputs[:, 1:] == prepared.bos_id)  # a new document exactly at a BOS
    assert int(docs.max()) >= 1  # 64-token windows of ~40-token documents cross boundaries


def test_same_seed_same_batches_other_seed_differs(prepared):
    first, second = _take(_loader(prepared), 5), _take(_loader(prepared), 5)
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    other = _take(_loader(prepared, seed=1), 5)
    assert not all(torch.equal(a, b) for a, b in zip(first, other))


def test_ranks_split_the_global_batch(prepared):
    whole = _take(_loader(prepared, batch_size=4), 6)
    ranks = [_take(_loader(prepared, batch_size=2, dp_rank=r, dp_size=2), 6) for r in range(2)]
    for step, expected in enumerate(whole):
        assert torch.equal(torch.cat([ranks[0][step], ranks[1][step]]), expected)


def test_resume_gives_the_uninterrupted_batches(prepared):
    reference = _take(_loader(prepared), 12)
    interrupted = _loader(prepared)
    _take(interrupted, 5)
    state = json.loads(json.dumps(interrupted.state_dict()))  # must survive a JSON checkpoint
    resumed = _loader(prepared)
    resumed.load_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip(_take(resumed, 7), reference[5:]))


def test_resume_with_another_dp_size_continues_the_global_order(prepared):
    reference = _take(_loader(prepared, batch_size=4), 10)
    single = _loader(prepared, batch_size=4)
    _take(single, 4)
    state = single.state_dict()
    ranks = [_loader(prepared, batch_size=1, dp_rank=r, dp_size=4) for r in range(4)]
    for rank in ranks:
        rank.load_state_dict(state)
        assert rank.state_dict() == state  # no rank- or dp_size-specific state
    for step in range(4, 10):
        assert torch.equal(torch.cat([next(rank)["inputs"] for rank in ranks]), reference[step])


def test_every_window_once_per_epoch_then_a_new_order(prepared):
    num_tokens = prepared.num_tokens["train"]["digits"]
    windows = (num_tokens - 1) // SEQ_LEN
    stream = np.concatenate([np.fromfile(p, dtype=np.uint16) for p in prepared.shards["train"]["digits"]])
    expected = sorted(tuple(stream[i * SEQ_LEN : i * SEQ_LEN + SEQ_LEN + 1].tolist()) for i in range(windows))
    only_digits = dict(prepared.__dict__, weights={"digits": 1.0})
    loader = _loader(type(prepared)(**only_digits), batch_size=1)
    epochs = []
    for _ in range(2):
        batches = [next(loader) for _ in range(windows)]
        epochs.append([tuple(torch.cat([b["inputs"][0], b["labels"][0, -1:]]).tolist()) for b in batches])
    assert sorted(epochs[0]) == expected == sorted(epochs[1])
    assert epochs[0] != epochs[1]
    assert loader.state_dict()["source_epochs"] == {"digits": 2}


def test_mixture_follows_the_weights(prepared, tiny_tokenizer):
    pieces = [tiny_tokenizer.decode([i]) for i in range(prepared.vocab_size)]
    digit_ids = torch.tensor([i for i, piece in enumerate(pieces) if any(c.isdigit() for c in piece)])
    loader = _loader(prepared, batch_size=64)
    inputs = torch.cat(_take(loader, 40))  # 2560 samples
    from_digits = torch.isin(inputs, digit_ids).any(dim=1).float().mean().item()
    # Expected 0.25; binomial std over 2560 draws is ~0.009, so 0.05 is > 5 sigma.
    assert abs(from_digits - 0.25) < 0.05


def test_validation_loader_is_reproducible(prepared):
    first = _take(_loader(prepared, split="val", seed=0), 3)
    again = _take(_loader(prepared, split="val", seed=0), 3)
    assert all(torch.equal(a, b) for a, b in zip(first, again))


def test_val_split_smaller_than_a_window_is_an_error(prepared):
    with pytest.raises(ValueError, match=r"val split .*raise data\.val_fraction or lower data\.seq_len"):
        _loader(prepared, split="val", seq_len=prepared.num_tokens["val"]["digits"])


def test_state_from_other_settings_is_rejected(prepared):
    state = _loader(prepared).state_dict()
    with pytest.raises(ValueError, match="seed"):
        _loader(prepared, seed=5).load_state_dict(state)


def test_skipped_samples_are_drawn_but_never_yielded(prepared):
    """Skipping global batches 2 and 3 (samples [8, 16) at batch 4): the loader yields batches 0, 1, 4, 5, ...
    of the plain order, so every later sample is the one it would have been; the state carries the range,
    and a loader resumed from it (or given the same range from the start) keeps skipping it."""
    plain = _take(_loader(prepared), 8)
    skipping = _loader(prepared)
    skipping.skip(8, 16)
    got = _take(skipping, 6)
    assert all(torch.equal(a, b) for a, b in zip(got, [plain[i] for i in (0, 1, 4, 5, 6, 7)]))
    assert skipping.consumed_samples == 32 and skipping.state_dict()["skipped"] == [[8, 16]]

    early = _loader(prepared)
    early.skip(8, 16)
    _take(early, 1)
    resumed = _loader(prepared)
    resumed.load_state_dict(json.loads(json.dumps(early.state_dict())))  # through JSON, as in meta.json
    assert all(torch.equal(a, b) for a, b in zip(_take(resumed, 5), [plain[i] for i in (1, 4, 5, 6, 7)]))


def test_skip_takes_whole_global_batches_and_merges_ranges(prepared):
    loader = _loader(prepared, dp_size=2, dp_rank=1)  # global batch 8
    with pytest.raises(ValueError, match="whole global batches of 8"):
        loader.skip(4, 12)
    loader.skip(16, 24)
    loader.skip(8, 16)
    loader.skip(40, 48)
    assert loader.skipped == [(8, 24), (40, 48)]
    old = loader.state_dict()
    del old["skipped"]  # a checkpoint written before skipping existed
    loader.load_state_dict(old)
    assert loader.skipped == []
