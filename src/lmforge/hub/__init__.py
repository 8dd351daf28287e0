"""Checkpoint formats in and out of lmforge: Hugging Face, GGUF, ARPA, and model resolution."""

from __future__ import annotations

from .resolve import SHORTCUTS, load_model, resolve_model

__all__ = ["SHORTCUTS", "load_model", "resolve_model"]
