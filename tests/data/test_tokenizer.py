import hashlib

import pytest

from data.tokenizer import Tokenizer

_BYTE_OFFSET = 3  # ids 0..2 are unk/bos/eos; byte-fallback pieces <0x00>..<0xFF> follow


@pytest.mark.parametrize(
    "text",
    [
        "def f(x):\n    return x + 1\n",
        "class A:\n\tpass\n\n\n        deeply   spaced  \n",
        "  leading spaces and trailing ",
        "numbers 1234567890 and 3.14159",
        "unseen: 猫 ü ∑ 🙂",
    ],
)
def test_round_trip(tiny_tokenizer, text):
    assert tiny_tokenizer.decode(tiny_tokenizer.encode(text)) == text


def test_special_ids_and_bos_eos(tiny_tokenizer):
    assert (tiny_tokenizer.bos_id, tiny_tokenizer.eos_id) == (1, 2)
    ids = tiny_tokenizer.encode("self", bos=True, eos=True)
    assert ids[0] == 1 and ids[-1] == 2
    assert ids[1:-1] == tiny_tokenizer.encode("self")
    assert tiny_tokenizer.vocab_size == 400


def test_digits_are_single_tokens(tiny_tokenizer):
    ids = tiny_tokenizer.encode("x = 9876543210")
    pieces = [tiny_tokenizer.decode([i]) for i in ids]
    digit_pieces = [p for p in pieces if any(c.isdigit() for c in p)]
    assert len(digit_pieces) == 10
    assert all(sum(c.isdigit() for c in p) == 1 for p in digit_pieces)


def test_unseen_characters_fall_back_to_bytes(tiny_tokenizer):
    ids = tiny_tokenizer.encode("猫")
    expected = [_BYTE_OFFSET + b for b in "猫".encode("utf-8")]  # E7 8C AB
    assert ids[-3:] == expected


def test_sha256_is_the_model_file_hash(tiny_tokenizer_path):
    tokenizer = Tokenizer(tiny_tokenizer_path)
    with open(tiny_tokenizer_path, "rb") as fh:
        assert tokenizer.sha256 == hashlib.sha256(fh.read()).hexdigest()


def test_missing_tokenizer_file_names_the_key(tmp_path):
    with pytest.raises(ValueError, match=r"data\.tokenizer\.path"):
        Tokenizer(tmp_path / "nope.model")
