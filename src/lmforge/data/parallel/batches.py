"""Batches of (source, target) pairs for training and decoding: padding, teacher-forcing targets, a
seeded sampler whose state is checkpointed."""

from __future__ import annotations

import warnings

import numpy as np
import torch

from ..dataset import Sampler
from .reader import ParallelSplit


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


class ParallelBatchSampler(Sampler):
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

    def draw(self, read: bool = True) -> tuple[dict[str, torch.Tensor], torch.Tensor] | None:
        if self.pos >= len(self._batches):
            self.epoch, self.pos = self.epoch + 1, 0
            self._epoch_start = self.generator.get_state()
            self._batches = self._plan()
        idx = self._batches[self.pos]
        self.pos += 1
        if not read:  # another rank's micro-batch: advance past it without reading it
            return None
        return make_batch([self.split.ids("src", int(i)) for i in idx], [self.split.ids("tgt", int(i)) for i in idx],
                          self.eot, self.src_eot, self.max_source, self.max_target)

    def state_dict(self) -> dict:
        return {"generator": self._epoch_start, "epoch": torch.tensor(self.epoch), "pos": torch.tensor(self.pos)}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
        self._epoch_start = state["generator"]
        self.epoch, self.pos = int(state["epoch"]), int(state["pos"])
        self._batches = self._plan()
