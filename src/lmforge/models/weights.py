"""Weights on disk: safetensors files written atomically, loaded with clear errors."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..errors import LMForgeError, first_line
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


def save_weights(model: torch.nn.Module, path: str | Path, weights: dict[str, torch.Tensor] | None = None) -> None:
    """Write the model's weights to a safetensors file; ``weights``: given tensors instead (tied ones once)."""
    tensors = state_dict_for_saving(model) if weights is None else \
        {k: t.detach().contiguous().cpu() for k, t in weights.items()}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))


def load_weights(model: torch.nn.Module, path: str | Path) -> None:
    path = Path(path)
    if not path.exists():
        raise LMForgeError(f"weights file {path} is missing; the run directory is incomplete")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise LMForgeError(f"weights file {path} is truncated or corrupted ({first_line(e)}); "
                           "restore it or retrain") from None
    check_shapes(model, tensors, str(path))
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    # Tied weights are stored once; a missing key is fine when it shares storage with a loaded one.
    own = model.state_dict()
    really_missing = [k for k in missing
                      if not any(own[k].untyped_storage().data_ptr() == own[j].untyped_storage().data_ptr()
                                 for j in tensors)]
    if really_missing or unexpected:
        raise LMForgeError(f"weights file {path} does not match the model config "
                           f"(missing {really_missing[:3]}, unexpected {unexpected[:3]})")


def check_shapes(model: torch.nn.Module, tensors: dict[str, torch.Tensor], where: str) -> None:
    """Every tensor the model has must come with the model's shape: a one-line error naming the first
    that does not (``load_state_dict`` would list them all, one per line)."""
    own = model.state_dict()
    bad = [(k, list(v.shape), list(own[k].shape)) for k, v in tensors.items()
           if k in own and tuple(v.shape) != tuple(own[k].shape)]
    if bad:
        k, got, want = bad[0]
        more = f" (and {len(bad) - 1} more tensors)" if len(bad) > 1 else ""
        raise LMForgeError(f"{where}: tensor {k} has shape {got} but the model's config.json needs {want}{more}; "
                           "the weights and the config belong to different models")
