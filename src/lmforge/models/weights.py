"""Weights on disk: safetensors files written atomically, loaded with clear errors."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..errors import LMForgeError
from ..utils import atomic_write


def state_dict_for_saving(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The state dict with tied (shared) tensors stored once, as safetensors requires."""
    out: dict[str, torch.Tensor] = {}
    seen: dict[int, str] = {}
    for name, t in model.state_dict().items():
        key = t.untyped_storage().data_ptr()
        if key in seen and t.numel() > 0:
            continue
        seen[key] = name
        out[name] = t.detach().contiguous().cpu()
    return out


def save_weights(model: torch.nn.Module, path: str | Path) -> None:
    tensors = state_dict_for_saving(model)
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))


def load_weights(model: torch.nn.Module, path: str | Path) -> None:
    path = Path(path)
    if not path.exists():
        raise LMForgeError(f"weights file {path} is missing; the run directory is incomplete")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise LMForgeError(f"weights file {path} is truncated or corrupted ({str(e).splitlines()[0]}); "
                           "restore it or retrain") from None
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    # Tied weights are stored once; a missing key is fine when it shares storage with a loaded one.
    own = model.state_dict()
    really_missing = [k for k in missing
                      if not any(own[k].untyped_storage().data_ptr() == own[j].untyped_storage().data_ptr()
                                 for j in tensors)]
    if really_missing or unexpected:
        raise LMForgeError(f"weights file {path} does not match the model config "
                           f"(missing {really_missing[:3]}, unexpected {unexpected[:3]})")
