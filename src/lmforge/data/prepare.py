"""``lmforge prepare``: corpus -> tokenizer -> memory-mapped token shards + meta.json.

Layout of a prepared data directory (read by :class:`lmforge.data.TokenData`)::

    meta.json            tokenizer kind/vocab, dtype, corpus name and sha256, per-split counts
    tokenizer.json       the tokenizer (trained on the train split only)
    train-00000.bin ...  raw little-endian uint16 (vocab <= 65536) or uint32 token ids
    val-00000.bin
    test-00000.bin

Documents are assigned to splits by a seeded permutation, so the split is deterministic and a
document never straddles two splits. A single long text (one file) is split contiguously
instead: the first (1 - val - test) of its characters train, then val, then test, which is
exactly nanoGPT's split for Tiny Shakespeare with ``--val-frac 0.1 --test-frac 0``.
"""

from __future__ import annotations

import hashlib
import re
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from tqdm import tqdm

from ..errors import LMForgeError
from ..options import INT64_MAX, Options, option
from ..tokenizers import BPETokenizer, CharTokenizer, Tokenizer
from ..tokenizers.word import WordTokenizer
from ..utils import atomic_directory, atomic_write_json, read_json
from .corpora import Corpus, load_corpus

FORMAT = "lmforge-data"                    # token streams (language models)
PARALLEL_FORMAT = "lmforge-parallel-data"  # (source, target) pairs (seq2seq); see data/parallel/
SHARD_TOKENS = 1 << 28  # 256M tokens per shard file
SPLITS = ("train", "val", "test")


# The tokenizers library aborts the process (a Rust panic) on absurd sizes: bound them before the call.
MAX_VOCAB_SIZE = 1 << 20


@dataclass
class PrepareConfig(Options):
    corpus: str = option(help="built-in corpus (shakespeare, python-stdlib, peoples-daily; parallel: de-en, "
                         "code-doc), a file or folder of UTF-8 text, or a .tsv of source<TAB>target pairs")
    out: str = option(help="output data directory", metavar="DIR")
    tokenizer: Literal["char", "bpe", "word"] = option("char", help="tokenizer to train",
                                                       default_text="char (bpe for parallel corpora)")
    vocab_size: int = option(8192, ge=1, le=MAX_VOCAB_SIZE, help="BPE vocabulary size",
                             default_text="8192 (8000 for parallel corpora)")
    seed: int = option(1337, ge=0, le=INT64_MAX, help="seed of the document split")
    val_frac: float = option(0.05, ge=0, lt=1, help="share of the documents (or text) for validation")
    test_frac: float = option(0.05, ge=0, lt=1, help="share of the documents (or text) for testing")
    split: Literal["auto", "document", "contiguous"] = option(
        "auto", help="split whole documents (seeded) or cut one text contiguously (auto: by corpus)")
    errors: Literal["strict", "replace", "ignore"] = option(
        "strict", help="invalid UTF-8: stop with an error, replace it, or drop it")
    # word tokenizer options (n-gram models)
    word_pattern: str | None = option(None, metavar="REGEX", help="word tokenizer: regex of a token",
                                      default_text="whitespace-separated")
    min_count: int = option(1, ge=1, le=INT64_MAX, help="word tokenizer: rarer words become <unk>")
    lowercase: bool = option(False, help="word tokenizer: lowercase the text")
    # char tokenizer: add 256 byte tokens so unseen characters still encode (exact round trip)
    byte_fallback: bool = option(True, help="char tokenizer: byte tokens for unseen characters (--no-byte-fallback:"
                                 " nanoGPT's vocabulary; unseen characters then fail)")
    # parallel corpora
    target_file: str | None = option(None, metavar="FILE", help="parallel data from two line-aligned files: "
                                     "--corpus SOURCE --target-file TARGET")
    separate_vocab: bool = option(False, help="parallel data: one tokenizer per side instead of a shared one")
    force: bool = option(False, help="replace an existing data directory even if it holds files lmforge did not "
                         "write (they are deleted)")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.val_frac + self.test_frac >= 1:
            raise LMForgeError("--val-frac and --test-frac must sum to less than 1")


# Every file ``prepare`` (and ``prepare_parallel``) writes; anything else in a data directory is the user's.
DATA_FILES = re.compile(r"(meta\.json|tokenizer\.json|source_tokenizer\.json|(train|val|test)-\d{5}\.bin"
                        r"|(train|val|test)\.jsonl|(train|val|test)\.(src|tgt)\.(bin|idx))")


def check_out_dir(out: Path, force: bool = False) -> None:
    """``--out`` may be new, empty, or an lmforge data directory to re-prepare, which is replaced whole;
    never a file, another kind of directory, or a data directory holding files the user put there
    (replacing it would delete them) unless ``force``."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        meta = out / "meta.json"
        if not (out.is_dir() and meta.exists()):
            kind = "a directory that is not an lmforge data directory" if out.is_dir() else "an existing file"
            raise LMForgeError(f"refusing to overwrite {out}: it is {kind}; choose another --out")
        try:
            m = read_json(meta)
            ok = isinstance(m, dict) and m.get("format") in (FORMAT, PARALLEL_FORMAT)
        except LMForgeError:
            ok = False
        if not ok:
            raise LMForgeError(f"refusing to overwrite {out}: its meta.json is not lmforge's; choose another --out")
        foreign = sorted(p.name for p in out.iterdir() if not DATA_FILES.fullmatch(p.name))
        if foreign and not force:
            shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
            raise LMForgeError(f"refusing to replace the data directory {out}: it also holds files lmforge did not "
                               f"write ({shown}); move them elsewhere, choose another --out, or pass --force to "
                               "delete them")


def _assign_splits(corpus: Corpus, cfg: PrepareConfig) -> tuple[str, dict[str, list[int]]]:
    mode = cfg.split if cfg.split != "auto" else corpus.default_split
    n = len(corpus)
    if mode == "document" and n < 3 and (cfg.val_frac > 0 or cfg.test_frac > 0):
        mode = "contiguous"
    if mode == "contiguous":
        return mode, {s: list(range(n)) for s in SPLITS}
    if mode != "document":
        raise LMForgeError(f"--split must be auto, document or contiguous, not {cfg.split!r}")
    assign = seeded_split(n, cfg.val_frac, cfg.test_frac, cfg.seed)
    if not assign["train"]:
        raise LMForgeError(f"corpus {corpus.name} has only {n} documents: too few for the val/test fractions")
    return mode, assign


def seeded_split(n: int, val_frac: float, test_frac: float, seed: int) -> dict[str, list[int]]:
    """Item indices per split from one seeded permutation (at least one item for a non-zero fraction);
    shared by text corpora (documents) and parallel corpora (pairs)."""
    perm = np.random.default_rng(seed).permutation(n).tolist()
    n_val = max(1, round(val_frac * n)) if val_frac > 0 else 0
    n_test = max(1, round(test_frac * n)) if test_frac > 0 else 0
    return {"val": sorted(perm[:n_val]), "test": sorted(perm[n_val:n_val + n_test]),
            "train": sorted(perm[n_val + n_test:])}


def _contiguous_bounds(length: int, cfg: PrepareConfig) -> dict[str, tuple[int, int]]:
    n_train = int(length * (1 - cfg.val_frac - cfg.test_frac))
    n_val = int(length * cfg.val_frac)
    return {"train": (0, n_train), "val": (n_train, n_train + n_val), "test": (n_train + n_val, length)}


def _split_texts(corpus: Corpus, mode: str, assign: dict[str, list[int]], cfg: PrepareConfig,
                 split: str) -> Iterator[str]:
    for i in assign[split]:
        text = corpus.documents[i].text
        if mode == "contiguous":
            a, b = _contiguous_bounds(len(text), cfg)[split]
            text = text[a:b]
        if text:
            yield text


def train_tokenizer(kind: str, texts: Iterable[str], vocab_size: int = 8192, byte_fallback: bool = True,
                    word_pattern: str | None = None, min_count: int = 1, lowercase: bool = False) -> Tokenizer:
    """The tokenizer of a prepared data directory, trained on its training texts (both prepares)."""
    if kind == "char":
        return CharTokenizer.train(texts, byte_fallback=byte_fallback)
    if kind == "bpe":
        return BPETokenizer.train(texts, vocab_size)
    if kind == "word":
        return WordTokenizer.train(texts, pattern=word_pattern, min_count=min_count, lowercase=lowercase)
    raise LMForgeError(f"unknown tokenizer {kind!r}; choose char, bpe or word")


def _train_tokenizer(cfg: PrepareConfig, texts: Iterator[str]) -> Tokenizer:
    return train_tokenizer(cfg.tokenizer, texts, cfg.vocab_size, cfg.byte_fallback, cfg.word_pattern, cfg.min_count,
                           cfg.lowercase)


PIECE_CHARS = 1 << 20


def text_pieces(text: str, size: int = PIECE_CHARS) -> list[str]:
    """Cut a long text into ~``size``-character pieces at line starts that are not whitespace, so
    that tokenizing the pieces separately gives the same tokens as tokenizing the whole (byte-level
    BPE's pre-tokenizer never joins across such a boundary), with bounded memory."""
    if len(text) <= size:
        return [text]
    pieces, start = [], 0
    while len(text) - start > size:
        cut = start + size
        while cut < len(text) and not (text[cut - 1] == "\n" and not text[cut].isspace()):
            cut += 1
        pieces.append(text[start:cut])
        start = cut
    pieces.append(text[start:])
    return [p for p in pieces if p]


def encode_long(tokenizer: Tokenizer, text: str) -> np.ndarray:
    pieces = text_pieces(text, PIECE_CHARS)
    if len(pieces) == 1:
        return tokenizer.encode_array(text)
    return np.concatenate([tokenizer.encode_array(p) for p in pieces])


class _ShardWriter:
    def __init__(self, directory: Path, split: str, dtype: np.dtype) -> None:
        self.directory, self.split, self.dtype = directory, split, dtype
        self.shards: list[str] = []
        self.tokens = 0
        self._f = None
        self._in_shard = 0

    def write(self, ids: np.ndarray) -> None:
        ids = ids.astype(self.dtype, copy=False)
        while len(ids):
            if self._f is None or self._in_shard >= SHARD_TOKENS:
                self._open()
            take = min(len(ids), SHARD_TOKENS - self._in_shard)
            ids[:take].tofile(self._f)
            self._in_shard += take
            self.tokens += take
            ids = ids[take:]

    def _open(self) -> None:
        if self._f is not None:
            self._f.close()
        name = f"{self.split}-{len(self.shards):05d}.bin"
        self.shards.append(name)
        self._f = open(self.directory / name, "wb")
        self._in_shard = 0

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
        if not self.shards:  # an empty split still gets a (zero-length) shard file
            self._open()
            self._f.close()


def prepare(cfg: PrepareConfig, progress: bool = True) -> dict:
    """Prepare a corpus; returns the meta dictionary written to ``meta.json``."""
    if cfg.separate_vocab or cfg.target_file:
        raise LMForgeError("--separate-vocab and --target-file apply to parallel corpora only (de-en, code-doc, "
                           ".tsv, --target-file); lmforge.prepare and lmforge prepare route those")
    t0 = time.time()
    out = Path(cfg.out)
    check_out_dir(out, cfg.force)
    corpus = load_corpus(cfg.corpus, errors=cfg.errors)
    mode, assign = _assign_splits(corpus, cfg)
    tokenizer = _train_tokenizer(cfg, _split_texts(corpus, mode, assign, cfg, "train"))
    dtype = np.dtype(np.uint16 if tokenizer.vocab_size <= 65536 else np.uint32)

    with atomic_directory(out) as tmp:
        sha = hashlib.sha256()
        splits: dict[str, dict] = {}
        total_docs = sum(len(v) for v in assign.values())
        bar = tqdm(total=total_docs, desc=f"prepare {corpus.name}", unit="doc", disable=not progress,
                   dynamic_ncols=True)
        for split in SPLITS:
            writer = _ShardWriter(tmp, split, dtype)
            n_bytes = n_docs = n_chars = 0
            for text in _split_texts(corpus, mode, assign, cfg, split):
                data = text.encode("utf-8")
                sha.update(data)
                ids = encode_long(tokenizer, text)
                if mode == "document" and not (len(ids) and ids[-1] == tokenizer.eot_id):
                    ids = np.append(ids, tokenizer.eot_id)  # document separator (GPT-2 convention)
                writer.write(ids)
                n_bytes += len(data)
                n_chars += len(text)
                n_docs += 1
                bar.update(1)
            writer.close()
            splits[split] = {"shards": writer.shards, "tokens": writer.tokens, "bytes": n_bytes,
                             "characters": n_chars, "documents": n_docs}
        bar.close()
        if splits["train"]["tokens"] == 0:
            raise LMForgeError(f"corpus {cfg.corpus} produced no training tokens (is it empty?)")
        tokenizer.save(tmp)
        meta = {
            "format": FORMAT, "version": 1,
            "corpus": {"name": corpus.name, "spec": str(cfg.corpus), "description": corpus.description,
                       "documents": len(corpus), "sha256": sha.hexdigest()},
            "tokenizer": {"kind": tokenizer.kind, "vocab_size": tokenizer.vocab_size,
                          "eot_id": tokenizer.eot_id, "lossless": tokenizer.lossless},
            "dtype": dtype.name, "split_mode": mode, "seed": cfg.seed,
            "val_frac": cfg.val_frac, "test_frac": cfg.test_frac, "splits": splits,
            "prepare_seconds": round(time.time() - t0, 2),
        }
        atomic_write_json(tmp / "meta.json", meta)
    return meta
