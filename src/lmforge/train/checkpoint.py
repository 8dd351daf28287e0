"""Atomic training checkpoints.

A run directory holds the loadable model at its top level (config.json, model.safetensors,
tokenizer.json) and the full training state in ``checkpoint/``::

    checkpoint/model.safetensors   weights
    checkpoint/optimizer.pt        optimizer state (AdamW moments)
    checkpoint/rng.pt              torch, sampler and python RNG states
    checkpoint/state.json          step, tokens seen, elapsed time, the training config

A new checkpoint is written whole into ``checkpoint.tmp/``, then swapped in by two renames
(``checkpoint`` -> ``checkpoint.old``, ``checkpoint.tmp`` -> ``checkpoint``). A crash at any point
leaves a complete checkpoint in ``checkpoint/`` or ``checkpoint.old/``, which resume finds.
"""

from __future__ import annotations

import os
import pickle
import re
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch

from ..errors import LMForgeError, first_line
from ..models.weights import load_weights, save_weights
from ..utils import atomic_write_json, read_json

CKPT, TMP, OLD = "checkpoint", "checkpoint.tmp", "checkpoint.old"


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def save_checkpoint(run_dir: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    rng: dict[str, Any], state: dict[str, Any]) -> None:
    run_dir = Path(run_dir)
    tmp, cur, old = run_dir / TMP, run_dir / CKPT, run_dir / OLD
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_weights(model, tmp / "model.safetensors")
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    torch.save(rng, tmp / "rng.pt")
    atomic_write_json(tmp / "state.json", state)  # written last: its presence marks completeness
    _fsync_dir(tmp)
    if cur.exists():
        shutil.rmtree(old, ignore_errors=True)
        cur.rename(old)
    tmp.rename(cur)
    _fsync_dir(run_dir)
    shutil.rmtree(old, ignore_errors=True)


def find_checkpoint(run_dir: Path) -> Path | None:
    for name in (CKPT, OLD):
        d = Path(run_dir) / name
        if (d / "state.json").exists():
            return d
    return None


STATE_FIELDS = {"step": int, "tokens_seen": int, "train_time": (int, float), "config": dict}


def read_state(ckpt: Path) -> dict[str, Any]:
    """``state.json``, checked: a damaged one (``{}``, a wrong type) is a one-line error, not a KeyError."""
    path = Path(ckpt) / "state.json"
    state = read_json(path, "checkpoint state")
    if not isinstance(state, dict):
        raise LMForgeError(f"{path} is damaged: expected a JSON object; restore it or start a new run")
    for key, kind in STATE_FIELDS.items():
        v = state.get(key)
        if isinstance(v, bool) or not isinstance(v, kind) or (kind is int and v < 0):
            raise LMForgeError(f"{path} is damaged: {key!r} is {'missing' if v is None else repr(v)[:40]}; "
                               "restore it or start a new run")
    return state


def _torch_load(path: Path) -> Any:
    """Tensors and plain containers only (``weights_only``): a pickle that would build any other object
    (run code) is refused with one line. PyTorch's multi-line explanation and its warning about the
    pickle protocol are not shown."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.load(path, weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"(?:GLOBAL|global:?)\s+([\w.]+)", str(e))
        what = f" ({found.group(1)})" if found else ""
        raise LMForgeError(f"{path} holds objects other than tensors{what}, which lmforge never unpickles (the file "
                           "may be malicious); restore the checkpoint or start a new run") from None


def load_checkpoint(ckpt: Path, model: torch.nn.Module,
                    optimizer: torch.optim.Optimizer | None) -> tuple[dict[str, Any], dict[str, Any]]:
    """Restore weights (and optimizer state); return (state, rng)."""
    state = read_state(ckpt)
    load_weights(model, ckpt / "model.safetensors")
    try:
        if optimizer is not None:
            optimizer.load_state_dict(_torch_load(ckpt / "optimizer.pt"))
        rng = _torch_load(ckpt / "rng.pt")
    except FileNotFoundError as e:
        raise LMForgeError(f"checkpoint {ckpt} is incomplete: {Path(e.filename).name} is missing") from None
    except (RuntimeError, EOFError, ValueError, OSError, KeyError, TypeError, IndexError) as e:
        raise LMForgeError(f"checkpoint {ckpt} is truncated or corrupted ({first_line(e)})") \
            from None
    if not isinstance(rng, dict) or not isinstance(rng.get("torch"), torch.Tensor) or \
            not isinstance(rng.get("sampler"), dict):
        raise LMForgeError(f"checkpoint {ckpt} is damaged: rng.pt does not hold lmforge's RNG states")
    return state, rng
