"""``prepare_parallel``: tokenize a parallel corpus into per-side token files, offsets and raw text pairs."""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from ...errors import LMForgeError
from ...tokenizers import SOURCE_TOKENIZER, BPETokenizer, Tokenizer
from ...utils import atomic_directory, atomic_write_json
from ..prepare import PARALLEL_FORMAT, check_out_dir, seeded_split, train_tokenizer
from .corpora import SPLITS, load_parallel_corpus


def _train_tokenizer(kind: str, texts: Iterable[str], vocab_size: int) -> Tokenizer:
    if kind in ("bpe", "char"):
        return train_tokenizer(kind, texts, vocab_size)
    raise LMForgeError(f"a parallel corpus needs --tokenizer bpe or char, not {kind!r} (word tokenizers are for "
                       "n-gram models)")


def _encode_all(tok: Tokenizer, texts: list[str]) -> list[np.ndarray]:
    if isinstance(tok, BPETokenizer):
        return [np.asarray(ids, dtype=np.int64) for ids in tok.encode_batch(texts)]
    return [tok.encode_array(t) for t in texts]


def _write_side(directory: Path, name: str, seqs: list[np.ndarray], dtype: np.dtype) -> int:
    offsets = np.zeros(len(seqs) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum([len(s) for s in seqs])
    flat = np.concatenate(seqs) if seqs else np.zeros(0, dtype=np.int64)
    flat.astype(dtype).tofile(directory / f"{name}.bin")
    offsets.tofile(directory / f"{name}.idx")
    return int(offsets[-1])


def prepare_parallel(corpus_spec: str, out: str | Path, tokenizer: str = "bpe", vocab_size: int = 8000,
                     seed: int = 1337, val_frac: float = 0.05, test_frac: float = 0.05,
                     target_file: str | None = None, separate_vocab: bool = False, errors: str = "strict",
                     progress: bool = True, force: bool = False) -> dict:
    """Tokenize a parallel corpus: one tokenizer shared by both sides (default) or one per side."""
    t0 = time.time()
    if tokenizer not in ("bpe", "char"):
        _train_tokenizer(tokenizer, [], vocab_size)  # raises the one-line error before any work
    out = Path(out)
    check_out_dir(out, force)
    corpus = load_parallel_corpus(corpus_spec, target_file, errors)
    if corpus.fixed_split is not None:
        split_of = corpus.fixed_split
    else:
        if not 0 <= val_frac < 1 or not 0 <= test_frac < 1 or val_frac + test_frac >= 1:
            raise LMForgeError("--val-frac and --test-frac must be in [0, 1) and sum to less than 1")
        n = len(corpus)
        split_of = ["train"] * n
        if n >= 3:  # fewer pairs: all of them train
            for name, idx in seeded_split(n, val_frac, test_frac, seed).items():
                for i in idx:
                    split_of[i] = name
    by_split = {s: [p for p, k in zip(corpus.pairs, split_of) if k == s] for s in SPLITS}
    if not by_split["train"]:
        raise LMForgeError(f"corpus {corpus.name} left no training pairs")
    train_src = [s for s, _ in by_split["train"]]
    train_tgt = [t for _, t in by_split["train"]]
    if separate_vocab:
        src_tok = _train_tokenizer(tokenizer, train_src, vocab_size)
        tgt_tok = _train_tokenizer(tokenizer, train_tgt, vocab_size)
    else:
        src_tok = tgt_tok = _train_tokenizer(tokenizer, train_src + train_tgt, vocab_size)
    dtype = np.dtype(np.uint16 if max(src_tok.vocab_size, tgt_tok.vocab_size) <= 65536 else np.uint32)
    with atomic_directory(out) as tmp:
        sha = hashlib.sha256()
        splits = {}
        for s in SPLITS:
            pairs = by_split[s]
            for a, b in pairs:
                sha.update(a.encode() + b"\t" + b.encode() + b"\n")
            src_ids = _encode_all(src_tok, [a for a, _ in pairs])
            tgt_ids = _encode_all(tgt_tok, [b for _, b in pairs])
            with open(tmp / f"{s}.jsonl", "w", encoding="utf-8") as f:
                for a, b in pairs:
                    f.write(json.dumps({"src": a, "tgt": b}, ensure_ascii=False) + "\n")
            splits[s] = {"pairs": len(pairs),
                         "src_tokens": _write_side(tmp, f"{s}.src", src_ids, dtype),
                         "tgt_tokens": _write_side(tmp, f"{s}.tgt", tgt_ids, dtype),
                         "src_bytes": sum(len(a.encode()) for a, _ in pairs),
                         "tgt_bytes": sum(len(b.encode()) for _, b in pairs),
                         "src_max_tokens": max((len(x) for x in src_ids), default=0),
                         "tgt_max_tokens": max((len(x) for x in tgt_ids), default=0)}
        tgt_tok.save(tmp)
        if separate_vocab:
            src_tok.save(tmp, SOURCE_TOKENIZER)
        meta = {
            "format": PARALLEL_FORMAT, "version": 1, "task": "seq2seq",
            "corpus": {"name": corpus.name, "spec": str(corpus_spec), "description": corpus.description,
                       "documents": len(corpus), "sha256": sha.hexdigest()},
            "tokenizer": {"kind": tgt_tok.kind, "vocab_size": tgt_tok.vocab_size, "eot_id": tgt_tok.eot_id,
                          "lossless": tgt_tok.lossless},
            "source_tokenizer": ({"kind": src_tok.kind, "vocab_size": src_tok.vocab_size,
                                  "eot_id": src_tok.eot_id} if separate_vocab else None),
            "dtype": dtype.name, "split_mode": "fixed" if corpus.fixed_split is not None else "random",
            "seed": seed, "splits": splits, "prepare_seconds": round(time.time() - t0, 2),
        }
        atomic_write_json(tmp / "meta.json", meta)
    return meta


# --- reading -------------------------------------------------------------------------------------
