"""Model families and the registry that maps ``config.json``'s ``model_type`` to a class."""

from __future__ import annotations

import importlib
from pathlib import Path

import torch

from ..errors import LMForgeError
from ..utils import read_json
from .base import LanguageModel

# model_type -> "module:Class"; imported lazily so the CLI starts fast.
MODEL_REGISTRY: dict[str, str] = {
    "gpt": "lmforge.models.gpt:GPT",
    "ngram": "lmforge.models.ngram:NGramModel",
    "lstm": "lmforge.models.rnn:LSTMLM",
    "gru": "lmforge.models.rnn:GRULM",
    "rnn": "lmforge.models.rnn:RNNLM",
    "seq2seq": "lmforge.models.seq2seq:Seq2Seq",
}
# Hugging Face checkpoints and GGUF files are read by lmforge.hub (hub.load_model, lmforge.load)


def model_class(model_type: str) -> type[LanguageModel]:
    if model_type not in MODEL_REGISTRY:
        raise LMForgeError(f"unknown model type {model_type!r}; known: {', '.join(sorted(MODEL_REGISTRY))}")
    module, name = MODEL_REGISTRY[model_type].split(":")
    return getattr(importlib.import_module(module), name)


def create_model(model_type: str, vocab_size: int, preset: str | None = None, **overrides) -> LanguageModel:
    """A freshly initialised model of a family from a preset plus overrides (``None`` values ignored)."""
    cls = model_class(model_type)
    if not cls.presets:
        raise LMForgeError(f"model type {model_type!r} is not trained by gradient descent; see lmforge train --help")
    return cls.from_preset(preset, vocab_size, **{k: v for k, v in overrides.items() if v is not None})


def load_model(path: str | Path) -> LanguageModel:
    """Load an lmforge run directory (or any directory written by ``save_pretrained``). Hugging Face
    directories, GGUF files and named shortcuts are resolved one room up: ``lmforge.hub.load_model``
    (what ``lmforge.load`` calls)."""
    path = Path(path)
    if not path.exists():
        raise LMForgeError(f"{path} does not exist; give a run directory such as runs/shk")
    if not path.is_dir() or not (path / "config.json").exists():
        raise LMForgeError(f"{path} is not a run directory (no config.json); give one written by "
                           "lmforge train")
    cfg = read_json(path / "config.json", "model config")
    model_type = cfg.get("model_type") if isinstance(cfg, dict) else None
    if not model_type:
        raise LMForgeError(f"{path / 'config.json'} has no model_type")
    if not isinstance(model_type, str) or model_type not in MODEL_REGISTRY:
        raise LMForgeError(f"{path}: unknown model type {model_type!r}; lmforge families: "
                           f"{', '.join(sorted(MODEL_REGISTRY))} (Hugging Face checkpoints load with lmforge.load)")
    return model_class(model_type).from_pretrained(path)


def on_device(model: LanguageModel, device: str | None) -> LanguageModel:
    """The model on ``--device`` (auto: CUDA when present). Families without tensors (n-grams) stay on
    the CPU; asking them for a GPU is an error."""
    from ..utils import resolve_device

    dev = resolve_device(device)
    if not isinstance(model, torch.nn.Module):
        if device not in (None, "auto", "cpu"):
            raise LMForgeError(f"a {model.model_type} model runs on the CPU only; drop --device {device}")
        return model
    return model.to(dev)


__all__ = ["LanguageModel", "MODEL_REGISTRY", "model_class", "create_model", "load_model", "on_device"]
