"""Parallel (source -> target) corpora for encoder-decoder models: translation and summarisation.

Corpora:
  de-en      German -> English sentence pairs from Debian's ``trans-de-en`` dictionary (the example
             sentences of the Ding dictionary). Full sentences only: both sides end in . ? or !, at
             least four words each side, bracketed annotations removed, duplicates removed. The
             test/val split is fixed by a hash of the German sentence, so it never depends on options.
  code-doc   Python standard-library functions -> the first sentence of their docstring (the
             docstring is removed from the source), split by file so a module never straddles splits.
  X.tsv      any file of ``source<TAB>target`` lines
  X + --target-file Y   two line-aligned files

A prepared parallel data directory (``meta.json`` with ``"task": "seq2seq"``) holds, per split,
the token ids of each side (``train.src.bin``/``train.tgt.bin``, uint16/uint32) with the start
offset of every pair (``train.src.idx``/``train.tgt.idx``, int64, one more entry than pairs), and
the raw text pairs (``train.jsonl``) that BLEU is computed against.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
import warnings
import zlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
import torch

from ..errors import LMForgeError
from ..tokenizers import SOURCE_TOKENIZER, BPETokenizer, CharTokenizer, Tokenizer, load_tokenizer
from ..utils import atomic_directory, atomic_write_json, read_json
from .corpora import read_text_file, stdlib_files

FORMAT = "lmforge-data"
SPLITS = ("train", "val", "test")
TRANS_DE_EN = Path("/usr/share/trans/de-en")


@dataclass
class ParallelCorpus:
    name: str
    pairs: list[tuple[str, str]]
    description: str = ""
    #: a fixed split per pair ("train"/"val"/"test"), or None to split by a seeded permutation
    fixed_split: list[str] | None = field(default=None, repr=False)

    def __len__(self) -> int:
        return len(self.pairs)


# --- de-en: Debian's trans-de-en -------------------------------------------------------------------
def cache_dir() -> Path:
    return Path(os.environ.get("LMFORGE_CACHE", Path.home() / ".cache" / "lmforge"))


def trans_de_en_path(fetch: bool = True) -> Path:
    """The ``de-en`` dictionary file: the system's, else a cached copy fetched with ``apt-get download``
    and unpacked with ``dpkg -x`` (nothing is installed system-wide)."""
    env = os.environ.get("LMFORGE_TRANS_DE_EN")
    if env:
        if not Path(env).is_file():
            raise LMForgeError(f"LMFORGE_TRANS_DE_EN={env} is not a file")
        return Path(env)
    if TRANS_DE_EN.is_file():
        return TRANS_DE_EN
    cached = cache_dir() / "trans-de-en" / "usr" / "share" / "trans" / "de-en"
    if cached.is_file():
        return cached
    if not fetch:
        raise LMForgeError(f"{TRANS_DE_EN} is absent and not cached; run make setup")
    if not shutil.which("apt-get") or not shutil.which("dpkg"):
        raise LMForgeError(f"the de-en corpus needs Debian's trans-de-en package: {TRANS_DE_EN} is absent and "
                           "apt-get/dpkg are not available to fetch it; copy the file there or set "
                           "LMFORGE_TRANS_DE_EN=/path/to/de-en")
    root = cache_dir() / "trans-de-en"
    root.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root.parent) as tmp:
        print("lmforge: fetching Debian package trans-de-en (apt-get download) ...", file=sys.stderr)
        r = subprocess.run(["apt-get", "download", "trans-de-en"], cwd=tmp, capture_output=True, text=True)
        debs = list(Path(tmp).glob("trans-de-en*.deb"))
        if r.returncode != 0 or not debs:
            last = (r.stderr.strip().splitlines() or ["no output"])[-1]
            raise LMForgeError(f"apt-get download trans-de-en failed ({last}); install trans-de-en or set "
                               "LMFORGE_TRANS_DE_EN=/path/to/de-en")
        unpack = Path(tmp) / "x"
        r = subprocess.run(["dpkg", "-x", str(debs[0]), str(unpack)], capture_output=True, text=True)
        if r.returncode != 0 or not (unpack / "usr/share/trans/de-en").is_file():
            raise LMForgeError(f"dpkg -x {debs[0].name} failed: {r.stderr.strip()[:200]}")
        if root.exists():
            shutil.rmtree(root)
        unpack.rename(root)
    return cached


_ANNOTATION = re.compile(r"\s*(\[[^\]]*\]|\{[^}]*\})")
_END = (".", "?", "!")


def parse_trans(text: str) -> list[tuple[str, str]]:
    """Full-sentence pairs of a ``German :: English`` dictionary (sub-entries split by `` | ``)."""
    pairs: dict[tuple[str, str], None] = {}
    seen_src: set[str] = set()
    for line in text.splitlines():
        if line.startswith("#") or " :: " not in line:
            continue
        de, en = line.split(" :: ", 1)
        des, ens = de.split(" | "), en.split(" | ")
        if len(des) != len(ens):
            continue
        for d, e in zip(des, ens):
            d, e = _ANNOTATION.sub("", d).strip(), _ANNOTATION.sub("", e).strip()
            if not (d.endswith(_END) and e.endswith(_END)) or len(d.split()) < 4 or len(e.split()) < 4:
                continue
            if d in seen_src:  # one translation per source sentence: the first
                continue
            seen_src.add(d)
            pairs[(d, e)] = None
    return list(pairs)


def hash_split(key: str, val_per_mille: int = 50, test_per_mille: int = 50) -> str:
    """A split fixed by the key's CRC-32: the same pair lands in the same split on every machine."""
    h = zlib.crc32(key.encode("utf-8")) % 1000
    return "test" if h < test_per_mille else "val" if h < test_per_mille + val_per_mille else "train"


def de_en_corpus() -> ParallelCorpus:
    path = trans_de_en_path()
    pairs = parse_trans(read_text_file(path))
    if not pairs:
        raise LMForgeError(f"{path} has no full-sentence pairs; is it the trans-de-en dictionary?")
    return ParallelCorpus("de-en", pairs, f"{len(pairs):,} German-English sentence pairs (Debian trans-de-en)",
                          fixed_split=[hash_split(d) for d, _ in pairs])


# --- code-doc: stdlib function -> first docstring sentence ---------------------------------------
_SENTENCE_END = re.compile(r"(?<=[.!?])\s")


def first_sentence(doc: str) -> str:
    para = doc.strip().split("\n\n")[0]
    para = " ".join(para.split())
    m = _SENTENCE_END.search(para)
    return para[: m.start()] if m else para


def function_doc_pairs(source: str, max_lines: int = 60) -> list[tuple[str, str]]:
    """(function source without its docstring, first sentence of the docstring) for every function
    (and method) of a module that has a docstring; functions longer than ``max_lines`` are skipped."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return []
    lines = source.splitlines()
    out = []
    for node in ast.walk(tree):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        doc = ast.get_docstring(node)
        if not doc or not node.body or node.end_lineno is None:
            continue
        summary = first_sentence(doc)
        if len(summary.split()) < 3:
            continue
        ds = node.body[0]
        start = min([d.lineno for d in node.decorator_list] + [node.lineno]) - 1
        if node.end_lineno - start > max_lines or len(node.body) < 2 or ds.end_lineno is None:
            continue  # a body that is only the docstring has nothing to summarise
        body = lines[start: ds.lineno - 1] + lines[ds.end_lineno:node.end_lineno]
        code = textwrap.dedent("\n".join(body)).strip("\n")
        if code:
            out.append((code, summary))
    return out


def code_doc_corpus() -> ParallelCorpus:
    root = Path(__import__("sysconfig").get_paths()["stdlib"])
    pairs, splits = [], []
    seen: set[str] = set()
    for f in stdlib_files():
        try:
            src = f.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        split = hash_split(str(f.relative_to(root)))
        for code, doc in function_doc_pairs(src):
            if code in seen:
                continue
            seen.add(code)
            pairs.append((code, doc))
            splits.append(split)
    if not pairs:
        raise LMForgeError(f"found no documented functions under {root}")
    return ParallelCorpus("code-doc", pairs, f"{len(pairs):,} Python standard-library functions -> first sentence "
                          "of their docstring", fixed_split=splits)


# --- files ---------------------------------------------------------------------------------------
def _check_pair(src: str, tgt: str, where: str) -> tuple[str, str]:
    if not src.strip():
        raise LMForgeError(f"{where}: empty source side; every pair needs text on both sides")
    if not tgt.strip():
        raise LMForgeError(f"{where}: empty target side; every pair needs text on both sides")
    return src.strip(), tgt.strip()


def tsv_corpus(path: Path, errors: str = "strict") -> ParallelCorpus:
    pairs = []
    for n, line in enumerate(read_text_file(path, errors).splitlines(), 1):
        if not line.strip():
            continue
        if "\t" not in line:
            raise LMForgeError(f"{path} line {n}: no tab; each line must be source<TAB>target")
        if line.count("\t") > 1:
            raise LMForgeError(f"{path} line {n}: {line.count(chr(9))} tabs; each line must be source<TAB>target "
                               "with exactly one tab")
        pairs.append(_check_pair(*line.split("\t"), f"{path} line {n}"))
    if not pairs:
        raise LMForgeError(f"{path} has no source<TAB>target lines")
    return ParallelCorpus(path.stem, pairs, f"{len(pairs):,} pairs from {path}")


def aligned_corpus(src_path: Path, tgt_path: Path, errors: str = "strict") -> ParallelCorpus:
    src = read_text_file(src_path, errors).splitlines()
    tgt = read_text_file(tgt_path, errors).splitlines()
    while src and not src[-1].strip() and tgt and not tgt[-1].strip():
        src.pop(), tgt.pop()
    if len(src) != len(tgt):
        raise LMForgeError(f"{src_path} has {len(src)} lines but {tgt_path} has {len(tgt)}; line-aligned files "
                           "need one target line per source line")
    pairs = [_check_pair(s, t, f"{src_path}/{tgt_path.name} line {n}") for n, (s, t) in enumerate(zip(src, tgt), 1)]
    if not pairs:
        raise LMForgeError(f"{src_path} is empty")
    return ParallelCorpus(src_path.stem, pairs, f"{len(pairs):,} pairs from {src_path} + {tgt_path}")


BUILTIN_PARALLEL = {"de-en": de_en_corpus, "code-doc": code_doc_corpus}


def is_parallel_spec(spec: str, target_file: str | None = None) -> bool:
    return bool(target_file) or spec in BUILTIN_PARALLEL or spec.lower().endswith(".tsv")


def load_parallel_corpus(spec: str, target_file: str | None = None, errors: str = "strict") -> ParallelCorpus:
    if spec in BUILTIN_PARALLEL:
        return BUILTIN_PARALLEL[spec]()
    path = Path(spec).expanduser()
    if not path.is_file():
        raise LMForgeError(f"parallel corpus {spec} is not a file; give a .tsv file, a source file with "
                           f"--target-file, or one of {', '.join(BUILTIN_PARALLEL)}")
    if target_file:
        tgt = Path(target_file).expanduser()
        if not tgt.is_file():
            raise LMForgeError(f"--target-file {target_file} is not a file")
        return aligned_corpus(path, tgt, errors)
    return tsv_corpus(path, errors)


# --- preparation ---------------------------------------------------------------------------------
def _train_tokenizer(kind: str, texts: Iterable[str], vocab_size: int) -> Tokenizer:
    if kind == "bpe":
        return BPETokenizer.train(texts, vocab_size)
    if kind == "char":
        return CharTokenizer.train(texts, byte_fallback=True)
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
    from .prepare import _check_out

    t0 = time.time()
    if tokenizer not in ("bpe", "char"):
        _train_tokenizer(tokenizer, [], vocab_size)  # raises the one-line error before any work
    out = Path(out)
    _check_out(out, force)
    corpus = load_parallel_corpus(corpus_spec, target_file, errors)
    if corpus.fixed_split is not None:
        split_of = corpus.fixed_split
    else:
        if not 0 <= val_frac < 1 or not 0 <= test_frac < 1 or val_frac + test_frac >= 1:
            raise LMForgeError("--val-frac and --test-frac must be in [0, 1) and sum to less than 1")
        n = len(corpus)
        perm = np.random.default_rng(seed).permutation(n)
        n_val = max(1, round(val_frac * n)) if val_frac > 0 and n >= 3 else 0
        n_test = max(1, round(test_frac * n)) if test_frac > 0 and n >= 3 else 0
        split_of = ["train"] * n
        for i in perm[:n_val]:
            split_of[int(i)] = "val"
        for i in perm[n_val:n_val + n_test]:
            split_of[int(i)] = "test"
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
            "format": FORMAT, "version": 1, "task": "seq2seq",
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
class ParallelSplit:
    """The pairs of one split: token ids of both sides (memory-mapped) and the raw text."""

    def __init__(self, directory: Path, split: str, dtype: np.dtype) -> None:
        self.directory, self.name = directory, split
        self.sides = {}
        for side in ("src", "tgt"):
            bin_, idx = directory / f"{split}.{side}.bin", directory / f"{split}.{side}.idx"
            if not bin_.exists() or not idx.exists():
                raise LMForgeError(f"missing {bin_.name} or {idx.name} in {directory}; re-run lmforge prepare")
            offsets = np.fromfile(idx, dtype=np.int64)
            ids = np.memmap(bin_, dtype=dtype, mode="r") if bin_.stat().st_size else np.zeros(0, dtype=dtype)
            if len(offsets) == 0 or offsets[-1] != len(ids):
                raise LMForgeError(f"{bin_} is truncated or does not match {idx.name}; re-run lmforge prepare")
            self.sides[side] = (ids, offsets)
        if len(self.sides["src"][1]) != len(self.sides["tgt"][1]):
            raise LMForgeError(f"{directory}: source and target of split {split} have different pair counts")

    def __len__(self) -> int:
        return len(self.sides["src"][1]) - 1

    def lengths(self, side: str) -> np.ndarray:
        return np.diff(self.sides[side][1])

    def ids(self, side: str, i: int) -> np.ndarray:
        data, off = self.sides[side]
        return np.asarray(data[off[i]:off[i + 1]], dtype=np.int64)

    @cached_property
    def texts(self) -> list[tuple[str, str]]:
        path = self.directory / f"{self.name}.jsonl"
        if not path.exists():
            raise LMForgeError(f"missing {path}; re-run lmforge prepare")
        with open(path, encoding="utf-8") as f:
            return [(r["src"], r["tgt"]) for r in map(json.loads, f)]


class ParallelData:
    """A prepared parallel data directory (``meta.json`` with ``task: seq2seq``)."""

    task = "seq2seq"

    def __init__(self, path: str | Path, meta: dict | None = None) -> None:
        self.path = Path(path)
        self.meta = meta if meta is not None else read_json(self.path / "meta.json", "data meta")
        if self.meta.get("task") != "seq2seq":
            raise LMForgeError(f"{self.path} is not parallel data; prepare one from a parallel corpus (de-en, "
                               "code-doc, a .tsv, or --target-file)")
        self.dtype = np.dtype(self.meta["dtype"])
        self._splits: dict[str, ParallelSplit] = {}

    @cached_property
    def tokenizer(self) -> Tokenizer:
        return load_tokenizer(self.path)

    @cached_property
    def source_tokenizer(self) -> Tokenizer:
        p = self.path / SOURCE_TOKENIZER
        return load_tokenizer(p) if p.exists() else self.tokenizer

    @property
    def vocab_size(self) -> int:
        return int(self.meta["tokenizer"]["vocab_size"])

    @property
    def source_vocab_size(self) -> int | None:
        st = self.meta.get("source_tokenizer")
        return int(st["vocab_size"]) if st else None

    def has_split(self, name: str) -> bool:
        return name in self.meta["splits"] and self.meta["splits"][name]["pairs"] > 0

    def split(self, name: str) -> ParallelSplit:
        if name not in self.meta["splits"]:
            raise LMForgeError(f"unknown split {name!r}; choose train, val or test")
        if not self.has_split(name):
            raise LMForgeError(f"split {name!r} of {self.path} has no pairs; choose another split")
        if name not in self._splits:
            self._splits[name] = ParallelSplit(self.path, name, self.dtype)
        return self._splits[name]


def pad_batch(seqs: list[np.ndarray] | list[list[int]], pad: int) -> torch.Tensor:
    width = max(len(s) for s in seqs)
    out = torch.full((len(seqs), width), pad, dtype=torch.long)
    for i, s in enumerate(seqs):
        out[i, :len(s)] = torch.as_tensor(np.asarray(s, dtype=np.int64))
    return out


def source_batch(src: list[np.ndarray], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Padded source ids (B, S) and the mask of real tokens (True) that the encoder attends to."""
    ids = pad_batch(src, pad)
    mask = torch.arange(ids.shape[1])[None, :] < torch.tensor([len(s) for s in src])[:, None]
    return ids, mask


def make_batch(src: list[np.ndarray], tgt: list[np.ndarray], eot: int, src_eot: int,
               max_source: int, max_target: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Teacher forcing: the decoder reads ``<eot> y_1 .. y_n`` and predicts ``y_1 .. y_n <eot>``.

    Sources longer than ``max_source`` and targets longer than ``max_target - 1`` are cut.
    Padding: sources are padded with ``src_eot`` and masked by ``src_mask``; labels with -100.
    """
    src = [s[:max_source] if len(s) else np.array([src_eot]) for s in src]
    tgt = [t[:max_target - 1] for t in tgt]
    src_ids, src_mask = source_batch(src, src_eot)
    dec_in = pad_batch([np.concatenate([[eot], t]) for t in tgt], eot)
    labels = pad_batch([np.concatenate([t, [eot]]) for t in tgt], -100)
    return {"src": src_ids, "src_mask": src_mask, "tgt": dec_in}, labels


class ParallelBatchSampler:
    """Length-bucketed, padding-aware batches of pairs for teacher-forced training.

    Each epoch shuffles the pairs, cuts them into pools of 50 batches, sorts each pool by length
    and cuts it into batches, then shuffles the batches: every batch holds pairs of similar
    length (little padding) while the order stays random. Driven by a seeded generator whose
    state (with the position in the epoch) is checkpointed, so a resumed run sees the same batches.
    """

    POOL = 50

    def __init__(self, split: ParallelSplit, batch_size: int, max_source: int, max_target: int, eot: int,
                 src_eot: int, seed: int, warn: bool = True) -> None:
        self.split, self.batch_size = split, batch_size
        self.max_source, self.max_target, self.eot, self.src_eot = max_source, max_target, eot, src_eot
        self.generator = torch.Generator().manual_seed(seed)
        self.src_len = np.minimum(split.lengths("src"), max_source)
        self.tgt_len = np.minimum(split.lengths("tgt"), max_target - 1)
        n_long = int((split.lengths("src") > max_source).sum() + (split.lengths("tgt") > max_target - 1).sum())
        if n_long and warn:
            warnings.warn(f"{n_long} of {len(split)} {split.name} pairs are longer than the model's context "
                          f"({max_source} source / {max_target} target tokens) and are truncated", stacklevel=2)
        self.epoch, self.pos = 0, 0
        self._epoch_start = self.generator.get_state()
        self._batches = self._plan()
        self.last_tokens = 0
        self.wrapped = False

    def _plan(self) -> list[np.ndarray]:
        perm = torch.randperm(len(self.split), generator=self.generator).numpy()
        size = self.batch_size * self.POOL
        batches = []
        for a in range(0, len(perm), size):
            pool = perm[a:a + size]
            pool = pool[np.argsort(self.src_len[pool] + self.tgt_len[pool], kind="stable")]
            batches += [pool[b:b + self.batch_size] for b in range(0, len(pool), self.batch_size)]
        order = torch.randperm(len(batches), generator=self.generator).numpy()
        return [batches[i] for i in order]

    def next(self) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        if self.pos >= len(self._batches):
            self.epoch, self.pos = self.epoch + 1, 0
            self._epoch_start = self.generator.get_state()
            self._batches = self._plan()
        idx = self._batches[self.pos]
        self.pos += 1
        x, y = make_batch([self.split.ids("src", int(i)) for i in idx], [self.split.ids("tgt", int(i)) for i in idx],
                          self.eot, self.src_eot, self.max_source, self.max_target)
        self.last_tokens = int((y != -100).sum())
        return x, y

    def state_dict(self) -> dict:
        return {"generator": self._epoch_start, "epoch": torch.tensor(self.epoch), "pos": torch.tensor(self.pos)}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
        self._epoch_start = state["generator"]
        self.epoch, self.pos = int(state["epoch"]), int(state["pos"])
        self._batches = self._plan()


def load_data(path: str | Path):  # -> TokenData | ParallelData
    """A prepared data directory of either kind (language modelling or parallel)."""
    from .dataset import TokenData

    p = Path(path)
    if p.is_dir() and (p / "meta.json").exists():
        meta = read_json(p / "meta.json", "data meta")
        if isinstance(meta, dict) and meta.get("task") == "seq2seq":
            return ParallelData(p, meta)
    return TokenData(p)


if __name__ == "__main__":  # used by the set-up: `python -m lmforge.data.parallel --fetch-de-en`
    if "--fetch-de-en" in sys.argv:
        try:
            print(f"de-en dictionary: {trans_de_en_path()}")
        except LMForgeError as e:
            print(f"warning: {e}", file=sys.stderr)
