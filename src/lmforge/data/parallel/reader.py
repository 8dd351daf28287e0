"""Reading prepared parallel data (``ParallelData``, ``load_data`` for either kind of data)."""

from __future__ import annotations

import json
from functools import cached_property
from pathlib import Path

import numpy as np

from ...errors import LMForgeError
from ...tokenizers import SOURCE_TOKENIZER, Tokenizer, load_tokenizer
from ...utils import read_json
from ..dataset import TokenData
from ..prepare import FORMAT, PARALLEL_FORMAT


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
        if not is_parallel_meta(self.meta):
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


def is_parallel_meta(meta: object) -> bool:
    """Parallel data: ``format: lmforge-parallel-data`` (older directories: ``lmforge-data`` with
    ``task: seq2seq``)."""
    return isinstance(meta, dict) and (meta.get("format") == PARALLEL_FORMAT or
                                       (meta.get("format") == FORMAT and meta.get("task") == "seq2seq"))


def load_data(path: str | Path) -> TokenData | ParallelData:
    """A prepared data directory of either kind (language modelling or parallel)."""
    p = Path(path)
    if p.is_dir() and (p / "meta.json").exists():
        meta = read_json(p / "meta.json", "data meta")
        if is_parallel_meta(meta):
            return ParallelData(p, meta)
    return TokenData(p)
