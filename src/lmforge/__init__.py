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


def load(path: str | Path, adapter: str | Path | None = None) -> LanguageModel:
    """Load a run directory (config.json + model.safetensors + tokenizer.json), a Hugging Face directory, a GGUF
    file or ``smollm2`` as a model; ``adapter`` applies a LoRA adapter (PEFT format) and merges it."""
    from .models import load_model

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


__all__ = ["__version__", "load", "prepare", "evaluate", "finetune"]
