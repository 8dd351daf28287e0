"""Reading prepared token data: memory-mapped shards and random training batches."""

from __future__ import annotations

import hashlib
from functools import cached_property
from pathlib import Path

import numpy as np
import torch

from ..errors import LMForgeError
from ..tokenizers import Tokenizer, load_tokenizer
from ..utils import read_json
from .prepare import FORMAT, PARALLEL_FORMAT


class TokenSplit:
    """One split (train/val/test) as a sequence of token ids backed by memory-mapped shards."""

    def __init__(self, paths: list[Path], dtype: np.dtype, vocab_size: int | None = None) -> None:
        self.vocab_size = vocab_size  # ids at or above it mean a damaged shard (checked on every read)
        self.arrays, self.paths = [], paths
        for p in paths:
            if not p.exists():
                raise LMForgeError(f"missing token shard {p}; re-run lmforge prepare")
            if p.stat().st_size % dtype.itemsize:
                raise LMForgeError(f"token shard {p} is truncated; re-run lmforge prepare")
            self.arrays.append(np.memmap(p, dtype=dtype, mode="r") if p.stat().st_size else
                               np.zeros(0, dtype=dtype))
        self.offsets = np.cumsum([0] + [len(a) for a in self.arrays])

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def read(self, start: int, length: int) -> np.ndarray:
        """Tokens [start, start+length) as int64, spanning shards when needed."""
        out = np.empty(length, dtype=np.int64)
        pos, filled = start, 0
        while filled < length:
            k = int(np.searchsorted(self.offsets, pos, side="right") - 1)
            a = self.arrays[k]
            local = pos - int(self.offsets[k])
            take = min(length - filled, len(a) - local)
            out[filled:filled + take] = a[local:local + take]
            filled += take
            pos += take
        return self._checked(out)

    def _checked(self, ids: np.ndarray) -> np.ndarray:
        if self.vocab_size is not None and ids.size and int(ids.max()) >= self.vocab_size:
            where = ", ".join(str(p) for p in self.paths)
            raise LMForgeError(f"token shard {where} holds id {int(ids.max())}, outside the vocabulary of "
                               f"{self.vocab_size}; the shard is damaged: re-run lmforge prepare")
        return ids

    def windows(self, starts: np.ndarray, length: int) -> np.ndarray:
        """A (len(starts), length) int64 matrix of windows; vectorised for a single shard."""
        if len(self.arrays) == 1:
            idx = starts[:, None] + np.arange(length)[None, :]
            return self._checked(self.arrays[0][idx].astype(np.int64))
        return np.stack([self.read(int(s), length) for s in starts])


class TokenData:
    """A prepared data directory (see :mod:`lmforge.data.prepare`)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.is_dir():
            raise LMForgeError(f"data directory {self.path} does not exist; create it with lmforge prepare")
        self.meta = read_json(self.path / "meta.json", "data meta")
        if isinstance(self.meta, dict) and (self.meta.get("format") == PARALLEL_FORMAT or
                                            self.meta.get("task") == "seq2seq"):
            raise LMForgeError(f"{self.path} holds parallel (source, target) pairs, which only seq2seq models use: "
                               "train one with lmforge train --model seq2seq, or prepare a text corpus for this "
                               "model")
        if not isinstance(self.meta, dict) or self.meta.get("format") != FORMAT:
            raise LMForgeError(f"{self.path} is not an lmforge data directory (bad meta.json); "
                               "re-run lmforge prepare")
        if self.meta.get("task") == "seq2seq":
            raise LMForgeError(f"{self.path} holds parallel (source, target) pairs for seq2seq models; this model "
                               "reads a token stream: prepare a text corpus (lmforge prepare --corpus FILE)")
        splits = self.meta.get("splits")
        tok = self.meta.get("tokenizer")
        if not (isinstance(tok, dict) and isinstance(tok.get("vocab_size"), int) and tok["vocab_size"] > 0):
            raise LMForgeError(f"{self.path}/meta.json is damaged (tokenizer vocab_size); re-run lmforge prepare")
        if self.meta.get("dtype") not in ("uint16", "uint32") or not isinstance(splits, dict) or not all(
                isinstance(s, dict) and isinstance(s.get("tokens"), int) and isinstance(s.get("shards"), list)
                and all(isinstance(f, str) and "/" not in f and f not in ("", ".", "..") for f in s["shards"])
                for s in splits.values()):
            raise LMForgeError(f"{self.path}/meta.json is damaged (dtype or splits); re-run lmforge prepare")
        self.dtype = np.dtype(self.meta["dtype"])
        self._splits: dict[str, TokenSplit] = {}

    @cached_property
    def tokenizer(self) -> Tokenizer:
        return load_tokenizer(self.path)

    @property
    def vocab_size(self) -> int:
        return int(self.meta["tokenizer"]["vocab_size"])

    def has_split(self, name: str) -> bool:
        return name in self.meta["splits"] and self.meta["splits"][name]["tokens"] > 0

    def split(self, name: str) -> TokenSplit:
        if name not in self.meta["splits"]:
            raise LMForgeError(f"unknown split {name!r}; choose train, val or test")
        if name not in self._splits:
            info = self.meta["splits"][name]
            if info["tokens"] == 0:
                raise LMForgeError(f"split {name!r} of {self.path} is empty (prepared with a zero fraction); "
                                   "choose another split or re-run lmforge prepare")
            self._splits[name] = TokenSplit([self.path / s for s in info["shards"]], self.dtype, self.vocab_size)
        return self._splits[name]

    def bytes_per_token(self, name: str) -> float:
        info = self.meta["splits"][name]
        return info["bytes"] / max(info["tokens"], 1)


class Sampler:
    """What the trainer draws batches from: ``(inputs, labels)`` pairs, resumable from ``state_dict``.

    One optimizer step trains on a *global batch* of ``world x accum`` micro-batches, drawn in one
    order that depends only on the seed. Rank ``r`` of ``world`` processes trains micro-batches
    ``r*accum .. r*accum+accum-1`` and skips the others (advancing the generator without reading
    their tokens), so 1 process with accumulation and N processes see the same sequences in every
    step, and the shares of the ranks are disjoint."""

    wrapped = False  # the last step started the data over (the trainer resets carried state)

    def draw(self, read: bool = True) -> tuple[torch.Tensor, torch.Tensor] | None:  # pragma: no cover
        raise NotImplementedError

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        batch = self.draw()
        assert batch is not None
        return batch

    def step_batches(self, rank: int = 0, world: int = 1, accum: int = 1) -> list:
        """This rank's ``accum`` micro-batches of the next global batch."""
        out = []
        for j in range(world * accum):
            b = self.draw(read=j // accum == rank)
            if b is not None:
                out.append(b)
        return out


class BatchSampler(Sampler):
    """Random contiguous windows (nanoGPT's ``get_batch``) from a split, driven by its own seeded
    generator whose state is saved in checkpoints, so a resumed run sees the same batches."""

    def __init__(self, split: TokenSplit, batch_size: int, block_size: int, seed: int) -> None:
        if len(split) < block_size + 2:
            raise LMForgeError(f"block size {block_size} is larger than the data ({len(split)} tokens); "
                               "use a smaller --block-size or more data")
        self.split, self.batch_size, self.block_size = split, batch_size, block_size
        self.generator = torch.Generator().manual_seed(seed)

    def draw(self, read: bool = True) -> tuple[torch.Tensor, torch.Tensor] | None:
        hi = len(self.split) - self.block_size - 1
        starts = torch.randint(0, hi + 1, (self.batch_size,), generator=self.generator).numpy()
        if not read:
            return None
        w = torch.from_numpy(self.split.windows(starts, self.block_size + 1))
        return w[:, :-1], w[:, 1:]

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])


class StreamSampler(Sampler):
    """Consecutive windows for truncated back-propagation through time (stateful models).

    The split is cut into ``n_streams`` equal, contiguous streams (Zaremba et al.'s batching; by
    default ``batch_size``, in training the global batch); a step returns window k of every stream,
    micro-batch j holding streams ``j*batch_size ..``, so row b of one batch continues row b of the
    last and the model's hidden state can be carried across steps. At the end the streams wrap
    around (``wrapped`` tells the trainer to reset the carried state)."""

    def __init__(self, split: TokenSplit, batch_size: int, block_size: int, seed: int = 0,
                 n_streams: int | None = None) -> None:
        n_streams = n_streams or batch_size
        self.stream_len = (len(split) - 1) // n_streams
        if self.stream_len < block_size + 1:
            raise LMForgeError(f"block size {block_size} is larger than the data: {len(split)} tokens make "
                               f"{n_streams} streams of only {self.stream_len}; use a smaller --block-size or "
                               "--batch-size")
        self.split, self.batch_size, self.block_size, self.n_streams = split, batch_size, block_size, n_streams
        self.pos = 0
        self.wrapped = False

    def _window(self, first_stream: int) -> tuple[torch.Tensor, torch.Tensor]:
        starts = (first_stream + np.arange(self.batch_size, dtype=np.int64)) * self.stream_len + self.pos
        w = torch.from_numpy(self.split.windows(starts, self.block_size + 1))
        return w[:, :-1], w[:, 1:]

    def step_batches(self, rank: int = 0, world: int = 1, accum: int = 1) -> list:
        if world * accum * self.batch_size != self.n_streams:
            raise ValueError(f"{world} x {accum} micro-batches of {self.batch_size} != {self.n_streams} streams")
        self.wrapped = False
        if self.pos + self.block_size + 1 > self.stream_len:
            self.pos, self.wrapped = 0, True
        out = [self._window((rank * accum + k) * self.batch_size) for k in range(accum)]
        self.pos += self.block_size
        return out

    def draw(self, read: bool = True) -> tuple[torch.Tensor, torch.Tensor] | None:
        return self.step_batches(0, 1, self.n_streams // self.batch_size)[0]

    def state_dict(self) -> dict:
        return {"pos": torch.tensor(self.pos)}

    def load_state_dict(self, state: dict) -> None:
        self.pos = int(state["pos"])


def data_fingerprint(path: str | Path) -> str:
    """sha256 of a prepared data directory's meta.json and tokenizer file(s): it changes whenever
    ``prepare`` rewrites the directory with other text, split or tokenizer. Runs record it in
    data.json; resuming refuses and evaluating warns when the data no longer matches."""
    h = hashlib.sha256()
    for name in sorted(p.name for p in Path(path).glob("*.json")):
        h.update(name.encode() + b"\0" + (Path(path) / name).read_bytes() + b"\0")
    return h.hexdigest()


def check_run_data(run_dir: str | Path, data_dir: str | Path) -> str | None:
    """None when ``data_dir`` is the data the run in ``run_dir`` recorded (or nothing was recorded),
    else a sentence saying what changed."""
    p = Path(run_dir) / "data.json"
    if not p.exists():
        return None
    rec = read_json(p, "run data pointer")
    want = rec.get("fingerprint") if isinstance(rec, dict) else None
    if not want or not Path(data_dir).is_dir():
        return None
    have = data_fingerprint(data_dir)
    if have == want:
        return None
    return (f"the data in {data_dir} changed since {run_dir} was trained on it (fingerprint {have[:12]} != "
            f"recorded {want[:12]}: prepare rewrote it)")
