from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from lmforge.data import PrepareConfig, TokenData, load_corpus, prepare
from lmforge.data.corpora import stdlib_files
from lmforge.errors import LMForgeError
from lmforge.tokenizers import load_tokenizer


def test_prepare_layout_and_counts(char_data: Path) -> None:
    meta = json.loads((char_data / "meta.json").read_text())
    assert meta["format"] == "lmforge-data" and meta["dtype"] == "uint16"
    assert meta["split_mode"] == "document"
    assert len(meta["corpus"]["sha256"]) == 64
    td = TokenData(char_data)
    tok = load_tokenizer(char_data)
    total_docs = 0
    for split in ("train", "val", "test"):
        info = meta["splits"][split]
        arr = np.memmap(char_data / info["shards"][0], dtype=np.uint16, mode="r")
        assert len(arr) == info["tokens"] == len(td.split(split))
        # character level: one token per character plus one end-of-text per document
        assert info["tokens"] == info["characters"] + info["documents"]
        total_docs += info["documents"]
    assert total_docs == 12 and meta["splits"]["val"]["documents"] >= 1
    # the stream decodes back to the documents
    text = tok.decode(td.split("val").read(0, min(200, len(td.split("val")))))
    assert "<|endoftext|>" in tok.decode(td.split("val").read(0, len(td.split("val")))) and text


def test_split_is_deterministic_and_seeded(tmp_path: Path, corpus_dir: Path) -> None:
    metas = []
    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        metas.append(prepare(PrepareConfig(corpus=str(corpus_dir), out=str(tmp_path / name), seed=seed),
                             progress=False))
    assert metas[0]["splits"] == metas[1]["splits"]
    assert (tmp_path / "a" / "val-00000.bin").read_bytes() == (tmp_path / "b" / "val-00000.bin").read_bytes()
    va, vc = (tmp_path / "a" / "val-00000.bin").read_bytes(), (tmp_path / "c" / "val-00000.bin").read_bytes()
    assert va != vc  # another seed puts other documents in val


def test_contiguous_split_matches_nanogpt(tmp_path: Path) -> None:
    text = "abcdefghij" * 100
    f = tmp_path / "one.txt"
    f.write_text(text)
    meta = prepare(PrepareConfig(corpus=str(f), out=str(tmp_path / "d"), val_frac=0.1, test_frac=0.0),
                   progress=False)
    assert meta["split_mode"] == "contiguous"
    td = TokenData(tmp_path / "d")
    n = len(text)
    assert len(td.split("train")) == int(n * 0.9) and len(td.split("val")) == n - int(n * 0.9)
    assert td.tokenizer.decode(td.split("val").read(0, 10)) == text[int(n * 0.9):int(n * 0.9) + 10]


def test_bpe_prepare(tmp_path: Path, corpus_dir: Path) -> None:
    meta = prepare(PrepareConfig(corpus=str(corpus_dir), out=str(tmp_path / "bpe"), tokenizer="bpe",
                                 vocab_size=400), progress=False)
    # at most the asked size (fewer when the text has fewer pairs worth merging twice)
    assert meta["tokenizer"]["kind"] == "bpe" and 257 < meta["tokenizer"]["vocab_size"] <= 400
    assert meta["splits"]["train"]["tokens"] < meta["splits"]["train"]["bytes"]  # merges compress


def test_invalid_utf8_names_file_and_offset(tmp_path: Path) -> None:
    d = tmp_path / "c"
    d.mkdir()
    (d / "good.txt").write_text("fine text\n")
    (d / "bad.txt").write_bytes(b"hello \xff world")
    with pytest.raises(LMForgeError, match=r"bad\.txt: invalid UTF-8 at byte offset 6"):
        prepare(PrepareConfig(corpus=str(d), out=str(tmp_path / "o")), progress=False)
    assert not (tmp_path / "o").exists()
    with pytest.warns(UserWarning, match="byte offset 6"):
        meta = prepare(PrepareConfig(corpus=str(d), out=str(tmp_path / "o"), errors="replace", val_frac=0,
                                     test_frac=0), progress=False)
    assert meta["splits"]["train"]["tokens"] > 0


def test_bad_corpora(tmp_path: Path) -> None:
    with pytest.raises(LMForgeError, match="unknown corpus 'nosuch'"):
        load_corpus("nosuch")
    with pytest.raises(LMForgeError, match="does not exist"):
        load_corpus(str(tmp_path / "missing.txt"))
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(LMForgeError, match="is empty"):
        load_corpus(str(tmp_path / "empty.txt"))
    (tmp_path / "emptydir").mkdir()
    with pytest.raises(LMForgeError, match="no non-empty text files"):
        load_corpus(str(tmp_path / "emptydir"))


def test_unreadable_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    f = tmp_path / "secret.txt"
    f.write_text("text")

    def deny(self: Path) -> bytes:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(Path, "read_bytes", deny)
    with pytest.raises(LMForgeError, match="cannot read .*secret.txt: permission denied"):
        prepare(PrepareConfig(corpus=str(f), out=str(tmp_path / "o")), progress=False)


def test_never_overwrites_foreign_directory(tmp_path: Path, corpus_dir: Path) -> None:
    out = tmp_path / "mine"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    with pytest.raises(LMForgeError, match="refusing to overwrite"):
        prepare(PrepareConfig(corpus=str(corpus_dir), out=str(out)), progress=False)
    assert (out / "precious.txt").read_text() == "keep me"


def test_builtin_corpora() -> None:
    shk = load_corpus("shakespeare")
    assert len(shk) == 42
    assert "HAMLET" in next(d for d in shk.documents if d.name == "hamlet").text[:200]
    files = stdlib_files()
    assert files and not any("/test/" in str(f) or f.name.startswith("test_") for f in files)
    assert any(f.name == "json" or f.parent.name == "json" for f in files)
    pd = load_corpus("peoples-daily")
    first = pd.documents[0].text
    assert first.startswith("迈向充满希望的新世纪") and "/" not in first and " " not in first


def test_data_errors(tmp_path: Path, char_data: Path) -> None:
    with pytest.raises(LMForgeError, match="does not exist"):
        TokenData(tmp_path / "nope")
    (tmp_path / "x").mkdir()
    with pytest.raises(LMForgeError, match="not found"):
        TokenData(tmp_path / "x")
    with pytest.raises(LMForgeError, match="unknown split"):
        TokenData(char_data).split("dev")


def test_long_texts_are_encoded_in_pieces_with_identical_tokens() -> None:
    from lmforge.data.prepare import encode_long, text_pieces
    from lmforge.tokenizers import BPETokenizer

    text = ("To be, or not to be, that is the question:\n  Whether 'tis nobler in the mind to suffer\n\n" * 400)
    pieces = text_pieces(text, size=1000)
    assert len(pieces) > 10 and "".join(pieces) == text
    tok = BPETokenizer.train([text], vocab_size=300)
    import importlib

    prep = importlib.import_module("lmforge.data.prepare")

    old = prep.PIECE_CHARS
    try:
        prep.PIECE_CHARS = 1000
        assert encode_long(tok, text).tolist() == tok.encode(text)
    finally:
        prep.PIECE_CHARS = old
