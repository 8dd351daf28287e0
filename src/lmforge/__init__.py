"""lmforge: build, train, evaluate, run and serve every family of language model.

    >>> import lmforge
    >>> m = lmforge.load("runs/shk")
    >>> print(m.generate("ROMEO:", max_new_tokens=50))
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from .models.base import LanguageModel


def load(path: str | Path) -> LanguageModel:
    """Load a run directory (config.json + model.safetensors + tokenizer.json) as a model."""
    from .models import load_model

    return load_model(path)


def prepare(corpus: str, out: str, tokenizer: str = "char", **kwargs: Any) -> dict:
    """Prepare a corpus into token shards; see :class:`lmforge.data.PrepareConfig`."""
    from .data import PrepareConfig
    from .data import prepare as _prepare

    return _prepare(PrepareConfig(corpus=corpus, out=out, tokenizer=tokenizer, **kwargs))


def evaluate(model: LanguageModel | str | Path, data: str | Path, split: str = "val", **kwargs: Any) -> dict:
    from .evaluate import evaluate as _evaluate

    if isinstance(model, (str, Path)):
        model = load(model)
    return _evaluate(model, data, split=split, **kwargs)


__all__ = ["__version__", "load", "prepare", "evaluate"]
