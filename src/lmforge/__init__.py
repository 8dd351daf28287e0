"""lmforge: build, train, evaluate and run every family of language model.

    >>> import lmforge
    >>> m = lmforge.load("runs/shk")
    >>> print(lmforge.generate(m, "ROMEO:", max_new_tokens=50))
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# The functions below import their rooms when called: `import lmforge` stays light (no torch) until used.
# (`lmforge.evaluate` is rebound to the `evaluate` room once that is imported; the room is callable alike.)
if TYPE_CHECKING:
    from .models.base import LanguageModel


def load(path: str | Path, adapter: str | Path | None = None) -> LanguageModel:
    """Load a run directory (config.json + model.safetensors + tokenizer.json), a Hugging Face checkpoint
    directory, a ``.gguf`` file or a shortcut (``smollm2``) as a model; ``adapter`` applies a LoRA adapter
    (PEFT format: a run of ``lmforge finetune``) and merges it into the weights."""
    from .hub import load_model

    model = load_model(path)
    if adapter is not None:
        from .hub.peft import apply_adapter

        apply_adapter(model, adapter)  # type: ignore[arg-type]
    return model


def finetune(model: str | Path, data: str | Path, out: str | Path, resume: bool = False, **options: Any) -> Any:
    """Fine-tune ``model`` on ``data`` into the run directory ``out`` (LoRA by default); ``options`` are the
    fields of :class:`lmforge.train.finetune.FineTuneConfig` (``method="full"``, ``lora_r=16``, ``max_time=600``,
    ``epochs=1``, ``packing=True``, ...). Returns the trainer's result."""
    from .train.finetune import finetune as _finetune

    return _finetune(str(model), str(data), str(out), resume=resume, **options)


def compare(data: str | Path, budget: str | float, models: list[str], out: str | Path, **options: Any) -> list[dict]:
    """Train (or reuse) and evaluate each of ``models`` (``"ngram:3"``, ``"gpt:tiny"``, ...) on ``data`` with the
    same ``budget`` per model: seconds (a number) or text, ``"5m"`` (5 minutes) or ``"5M"`` (5 million training
    tokens); the report goes to ``out``. ``options``: ``split``, ``progress``, ``eval_max_tokens``, ``force``,
    ``device`` (see :func:`lmforge.apps.compare.compare`). Returns one dict per model."""
    from .apps.compare import compare as _compare

    return _compare(str(data), budget, list(models), str(out), **options)


def generate(model: LanguageModel | str | Path, prompt: str | list[str], **kwargs: Any) -> str | list[str]:
    """Decode text from ``prompt``; see :func:`lmforge.generation.generate_text` for the arguments."""
    from .generation import generate_text

    return generate_text(load(model) if isinstance(model, (str, Path)) else model, prompt, **kwargs)


def translate(model: LanguageModel | str | Path, texts: str | list[str], **kwargs: Any) -> str | list[str]:
    """Translate (or summarise) with a seq2seq model; see :func:`lmforge.generation.seq2seq.translate`."""
    from .generation.seq2seq import translate as _translate

    model = load(model) if isinstance(model, (str, Path)) else model
    single = isinstance(texts, str)
    out = _translate(model, [texts] if single else list(texts), **kwargs)
    return out[0] if single else out


def prepare(corpus: str, out: str, tokenizer: str = "char", **kwargs: Any) -> dict:
    """Prepare a corpus into token shards; see :class:`lmforge.data.PrepareConfig`."""
    from .data import PrepareConfig
    from .data import prepare as _prepare

    return _prepare(PrepareConfig(corpus=corpus, out=out, tokenizer=tokenizer, **kwargs))


def evaluate(model: LanguageModel | str | Path, data: str | Path, split: str = "val", **kwargs: Any) -> dict:
    """Loss, perplexity and bits per byte of ``model`` on a split of prepared ``data``."""
    from .evaluate import evaluate as _evaluate

    if isinstance(model, (str, Path)):
        model = load(model)
    return _evaluate(model, data, split=split, **kwargs)


def inspect(model: LanguageModel | str | Path, text: str | None = None, *, source: str | None = None,
            html: str | Path | None = None, json: str | Path | None = None, force: bool = False,
            **kwargs: Any) -> dict:
    """Per-token surprisal and ranks, attention maps, logit lens, n-gram back-off of ``model`` on ``text``;
    writes the offline HTML page and/or the JSON report when paths are given and returns the report.
    An existing file at either path is replaced only with ``force=True`` (checked before any work).
    A seq2seq model reads ``source``; without ``text`` it is inspected on its own greedy translation.
    See :func:`lmforge.evaluate.inspect.inspect` for the other arguments (top_k, layers, heads, stride)."""
    from .errors import LMForgeError
    from .evaluate.inspect import inspect as _inspect
    from .evaluate.inspect import report_json
    from .evaluate.inspect_html import render_html
    from .utils import atomic_write_text, refuse_overwrite

    if html is not None and json is not None and Path(html).resolve() == Path(json).resolve():
        raise LMForgeError(f"--html and --json both name {html}; give two different files")
    for path, opt in ((html, "--html"), (json, "--json")):
        if path is not None:
            refuse_overwrite(path, opt, force)
    name = kwargs.pop("name", None) or (str(model) if isinstance(model, (str, Path)) else None)
    if isinstance(model, (str, Path)):
        model = load(model)
    if model.is_seq2seq and text is None and source is not None and "tokens" not in kwargs:
        from .generation.seq2seq import decode_batch, encode_sources

        eot = model.tokenizer.eot_id  # type: ignore[union-attr]
        kwargs["tokens"] = [eot, *decode_batch(model, encode_sources(model, [source]))[0][0].tokens, eot]
    report = _inspect(model, text, source=source, name=name, **kwargs)
    if html is not None:
        atomic_write_text(html, render_html(report))
    if json is not None:
        import json as _json

        atomic_write_text(json, _json.dumps(report_json(report), ensure_ascii=False, separators=(",", ":")) + "\n")
    return report


__all__ = ["__version__", "load", "prepare", "evaluate", "generate", "translate", "inspect", "finetune", "compare"]
