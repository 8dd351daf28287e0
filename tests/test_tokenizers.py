from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lmforge.errors import LMForgeError
from lmforge.tokenizers import EOT, BPETokenizer, CharTokenizer, load_tokenizer

TRAIN = ["Hello world, to be or not to be.\n", "人民日报 一九九八年 新年讲话。\n", "emoji 🙂🚀 ok\n"] * 20


@pytest.fixture(scope="module")
def char_tok() -> CharTokenizer:
    return CharTokenizer.train(TRAIN)


@pytest.fixture(scope="module")
def bpe_tok() -> BPETokenizer:
    return BPETokenizer.train(TRAIN, vocab_size=300)


@settings(max_examples=200, deadline=None)
@given(st.text())
def test_char_round_trip_any_unicode(char_tok: CharTokenizer, text: str) -> None:
    assert char_tok.decode(char_tok.encode(text)) == text


@settings(max_examples=200, deadline=None)
@given(st.text())
def test_bpe_round_trip_any_unicode(bpe_tok: BPETokenizer, text: str) -> None:
    assert bpe_tok.decode(bpe_tok.encode(text)) == text


@pytest.mark.parametrize("text", ["中华人民共和国 🙂👩‍👩‍👧 naïve café", "tabs\tand\nnewlines\r\n", "\x00\x7f", ""])
def test_round_trip_examples(char_tok: CharTokenizer, bpe_tok: BPETokenizer, text: str) -> None:
    for tok in (char_tok, bpe_tok):
        assert tok.decode(tok.encode(text)) == text


def test_char_vocab_layout(char_tok: CharTokenizer) -> None:
    assert char_tok.eot_id == 0 and char_tok.decode([0]) == EOT
    ids = char_tok.encode("Hello")
    assert all(0 < i < 1 + len(char_tok.chars) for i in ids)  # seen characters are single tokens
    unseen = char_tok.encode("Ж")  # unseen: UTF-8 byte fallback, two bytes
    assert len(unseen) == 2 and all(i > len(char_tok.chars) for i in unseen)
    assert char_tok.vocab_size == 1 + len(char_tok.chars) + 256


def test_save_load_round_trip(tmp_path, char_tok: CharTokenizer, bpe_tok: BPETokenizer) -> None:
    for tok in (char_tok, bpe_tok):
        d = tmp_path / tok.kind
        tok.save(d)
        again = load_tokenizer(d)
        text = "To be, 人民 🙂"
        assert again.encode(text) == tok.encode(text)
        assert again.vocab_size == tok.vocab_size


def test_bpe_file_is_hugging_face_format(tmp_path, bpe_tok: BPETokenizer) -> None:
    bpe_tok.save(tmp_path)
    obj = json.loads((tmp_path / "tokenizer.json").read_text())
    assert obj["model"]["type"] == "BPE" and obj["pre_tokenizer"]["type"] == "ByteLevel"


def test_bpe_vocab_too_small() -> None:
    with pytest.raises(LMForgeError, match="too small"):
        BPETokenizer.train(TRAIN, vocab_size=100)


def test_bpe_learns_merges(bpe_tok: BPETokenizer) -> None:
    assert bpe_tok.vocab_size > 257
    assert len(bpe_tok.encode("to be or not to be")) < len("to be or not to be")


def test_corrupted_tokenizer_file(tmp_path) -> None:
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(LMForgeError, match="corrupted"):
        load_tokenizer(tmp_path)
