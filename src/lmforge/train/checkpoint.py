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
import shutil
from pathlib import Path
from typing import Any

import torch

from ..errors import LMForgeError
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


def load_checkpoint(ckpt: Path, model: torch.nn.Module,
                    optimizer: torch.optim.Optimizer | None) -> tuple[dict[str, Any], dict[str, Any]]:
    """Restore weights (and optimizer state); return (state, rng)."""
    state = read_json(ckpt / "state.json", "checkpoint state")
    load_weights(model, ckpt / "model.safetensors")
    try:
        if optimizer is not None:
            optimizer.load_state_dict(torch.load(ckpt / "optimizer.pt", weights_only=True))
        rng = torch.load(ckpt / "rng.pt", weights_only=True)
    except FileNotFoundError as e:
        raise LMForgeError(f"checkpoint {ckpt} is incomplete: {Path(e.filename).name} is missing") from None
    except (RuntimeError, EOFError, ValueError, OSError) as e:
        raise LMForgeError(f"checkpoint {ckpt} is truncated or corrupted ({str(e).splitlines()[0][:120]})") \
            from None
    return state, rng
