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


def inspect(model: LanguageModel | str | Path, text: str | None = None, *, source: str | None = None,
            html: str | Path | None = None, json: str | Path | None = None, **kwargs: Any) -> dict:
    """Per-token surprisal and ranks, attention maps, logit lens, n-gram back-off of ``model`` on ``text``;
    writes the offline HTML page and/or the JSON report when paths are given and returns the report.
    A seq2seq model reads ``source``; without ``text`` it is inspected on its own greedy translation.
    See :func:`lmforge.evaluate.inspect.inspect` for the other arguments (top_k, layers, heads, stride)."""
    from .evaluate.inspect import inspect as _inspect
    from .evaluate.inspect import report_json
    from .evaluate.inspect_html import render_html
    from .utils import atomic_write_text

    name = kwargs.pop("name", None) or (str(model) if isinstance(model, (str, Path)) else None)
    if isinstance(model, (str, Path)):
        model = load(model)
    if model.is_seq2seq and text is None and source is not None and "tokens" not in kwargs:
        from .apps.translate import decode_batch, encode_sources

        eot = model.tokenizer.eot_id  # type: ignore[union-attr]
        kwargs["tokens"] = [eot, *decode_batch(model, encode_sources(model, [source]))[0][0].tokens, eot]
    report = _inspect(model, text, source=source, name=name, **kwargs)
    if html is not None:
        atomic_write_text(html, render_html(report))
    if json is not None:
        import json as _json

        atomic_write_text(json, _json.dumps(report_json(report), ensure_ascii=False, separators=(",", ":")) + "\n")
    return report


__all__ = ["__version__", "load", "prepare", "evaluate", "inspect"]
