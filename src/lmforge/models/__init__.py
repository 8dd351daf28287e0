"""Model families and the registry that maps ``config.json``'s ``model_type`` to a class."""

from __future__ import annotations

import importlib
from pathlib import Path

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
    # Hugging Face checkpoint directories, read into lmforge's GPT
    "gpt2": "lmforge.hub.hf:HFCheckpoint",
    "llama": "lmforge.hub.hf:HFCheckpoint",
    "mistral": "lmforge.hub.hf:HFCheckpoint",
    "qwen2": "lmforge.hub.hf:HFCheckpoint",
}


def model_class(model_type: str) -> type[LanguageModel]:
    if model_type not in MODEL_REGISTRY:
        raise LMForgeError(f"unknown model type {model_type!r}; known: {', '.join(sorted(MODEL_REGISTRY))}")
    module, name = MODEL_REGISTRY[model_type].split(":")
    return getattr(importlib.import_module(module), name)


def create_model(model_type: str, vocab_size: int, preset: str | None = None, **overrides) -> LanguageModel:
    """A freshly initialised model of a family from a preset plus overrides (``None`` values ignored)."""
    cls = model_class(model_type)
    if not getattr(cls, "presets", None):
        raise LMForgeError(f"model type {model_type!r} is not trained by gradient descent; see lmforge train --help")
    return cls.from_preset(preset, vocab_size, **{k: v for k, v in overrides.items() if v is not None})


def load_model(path: str | Path) -> LanguageModel:
    """Load a run directory (or any directory written by ``save_pretrained``)."""
    from ..apps.chat import resolve_model

    path = Path(resolve_model(str(path)))
    if not path.exists():
        raise LMForgeError(f"{path} does not exist; give a run directory such as runs/shk")
    if path.is_file() and path.suffix.lower() == ".gguf":
        from ..hub.gguf_io import load_gguf

        return load_gguf(path)
    if path.is_dir() and (path / "adapter_config.json").exists() and not (path / "config.json").exists():
        from ..hub.peft import load_adapter_run  # a LoRA run: its base model with the adapter merged

        return load_adapter_run(path)
    if not path.is_dir() or not (path / "config.json").exists():
        raise LMForgeError(f"{path} is not a run directory (no config.json); give one written by "
                           "lmforge train")
    cfg = read_json(path / "config.json", "model config")
    model_type = cfg.get("model_type") if isinstance(cfg, dict) else None
    if not model_type:
        raise LMForgeError(f"{path / 'config.json'} has no model_type")
    return model_class(model_type).from_pretrained(path)


__all__ = ["LanguageModel", "MODEL_REGISTRY", "model_class", "create_model", "load_model"]
