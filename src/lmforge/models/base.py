"""The one protocol that joins every model family.

Every language model factorises the probability of a token sequence by the chain rule,

    log p(x_1..x_T) = sum_t log p(x_t | x_<t),

so every family (n-gram, RNN/LSTM, GPT, ...) exposes the same two operations:

* ``forward_logits(input_ids, state)``: next-token logits (log-probabilities up to a constant)
  at every position, continuing from ``state`` (a KV cache, an RNN hidden state, an n-gram
  history) and returning the updated state. ``state=None`` means "no prefix, no cache".
* ``score(input_ids, targets, state)``: ``log p(targets[t] | prefix, input_ids[..t])``. The default
  derives it from the logits; a family can override it with something cheaper (n-grams).

Evaluation (``lmforge.evaluate``) and decoding (``lmforge.generation``) are written once against
this protocol and never branch on the family.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..tokenizers import Tokenizer


class LanguageModel:
    """Mixin/base class for all lmforge models.

    Attributes every model sets:
      model_type:     registry name written to config.json ("gpt", "ngram", "lstm", ...)
      vocab_size:     size of the output distribution
      context_length: the most tokens the model can condition on at once (a Transformer's block
                      size), or None when its state summarises an unbounded prefix (RNN, n-gram)
      tokenizer:      attached by ``lmforge.load`` / ``from_pretrained`` when the run has one
    """

    model_type: str = "base"
    tokenizer: Tokenizer | None = None
    #: a Jinja chat template from the model's files (GGUF metadata, tokenizer_config.json, a fine-tuning run's
    #: chat_template.jinja); None = none
    chat_template: str | None = None

    # --- the protocol -------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:  # pragma: no cover - overridden
        raise NotImplementedError

    @property
    def context_length(self) -> int | None:
        return None

    def init_state(self, batch_size: int, max_length: int) -> Any:
        """A fresh state for incremental decoding of ``batch_size`` sequences of at most
        ``max_length`` tokens (a pre-allocated KV cache for Transformers). None when the model
        has no incremental state (then callers re-feed the whole sequence)."""
        return None

    def forward_logits(self, input_ids: torch.Tensor, state: Any = None,
                       last_only: bool = False) -> tuple[torch.Tensor, Any]:
        """Logits of shape (B, T, V) for the token after each input position; (B, 1, V) for the last
        position only with ``last_only`` (a prompt's prefill needs no more)."""
        raise NotImplementedError

    def score(self, input_ids: torch.Tensor, targets: torch.Tensor,
              state: Any = None) -> tuple[torch.Tensor, Any]:
        """Log-probabilities (natural log, shape (B, T)) of ``targets`` given the inputs."""
        logits, state = self.forward_logits(input_ids, state)
        logp = F.log_softmax(logits.float(), dim=-1)
        return logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1), state

    def state_select(self, state: Any, index: torch.Tensor) -> Any:
        """Reorder/select batch rows of a state (beam search); default for tensor tuples."""
        if state is None:
            return None
        raise NotImplementedError(f"{type(self).__name__} does not support state reordering")

    # --- persistence --------------------------------------------------------------------------
    #: the config dataclass of a torch model (with to_dict/from_dict); families without one override
    #: save_pretrained/from_pretrained (n-grams)
    config_class: Any = None

    #: named configurations (``--preset``) and the one used when none is given
    presets: dict[str, dict[str, Any]] = {}
    default_preset: str = ""

    @classmethod
    def preset_fields(cls) -> dict[str, Any]:
        """Config fields fixed by the class itself (e.g. the recurrent cell of LSTMLM)."""
        return {}

    @classmethod
    def from_preset(cls, preset: str | None, vocab_size: int, **overrides: Any) -> LanguageModel:
        """A fresh model: the preset's config, then ``overrides``, for a vocabulary of ``vocab_size``."""
        from dataclasses import fields

        from ..errors import LMForgeError

        preset = preset or cls.default_preset
        if preset not in cls.presets:
            raise LMForgeError(f"unknown {cls.model_type} preset {preset!r}; choose one of {', '.join(cls.presets)}")
        unknown = set(overrides) - {f.name for f in fields(cls.config_class)}
        if unknown:
            raise LMForgeError(f"unknown {cls.model_type} option(s) {', '.join(sorted(unknown))}")
        cfg = {**cls.presets[preset], **cls.preset_fields(), **overrides, "vocab_size": vocab_size}
        return cls(cls.config_class(**cfg))  # type: ignore[call-arg]

    def save_pretrained(self, directory: str | Path, save_tokenizer: bool = True) -> None:
        """config.json (model_type + config), model.safetensors and tokenizer.json, like Hugging Face."""
        from ..hub.checkpoint import save_weights
        from ..utils import atomic_write_json

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        save_weights(self, directory / "model.safetensors")  # type: ignore[arg-type]
        atomic_write_json(directory / "config.json",
                          {"model_type": self.model_type, **self.config.to_dict()})  # type: ignore[attr-defined]
        if save_tokenizer and self.tokenizer is not None:
            self.tokenizer.save(directory)
        if self.chat_template is not None:  # Hugging Face's file name for it
            from ..utils import atomic_write_text

            atomic_write_text(directory / "chat_template.jinja", self.chat_template)

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> LanguageModel:
        from ..hub.checkpoint import load_weights
        from ..tokenizers import load_tokenizer
        from ..utils import read_json

        directory = Path(directory)
        model = cls(cls.config_class.from_dict(read_json(directory / "config.json", "model config")))  # type: ignore
        load_weights(model, directory / "model.safetensors")  # type: ignore[arg-type]
        model.eval()  # type: ignore[attr-defined]
        if (directory / "tokenizer.json").exists():
            model.tokenizer = load_tokenizer(directory)
        if (directory / "chat_template.jinja").exists():
            model.chat_template = (directory / "chat_template.jinja").read_text(encoding="utf-8")
        return model

    def num_parameters(self) -> int:
        if isinstance(self, torch.nn.Module):
            return sum(p.numel() for p in self.parameters())
        return 0

    # --- conveniences (Hugging Face style) ----------------------------------------------------
    def generate(self, prompt: str | list[str], **kwargs: Any) -> str | list[str]:
        """Decode text from ``prompt``; see :func:`lmforge.generation.generate` for arguments."""
        from ..generation import generate_text

        return generate_text(self, prompt, **kwargs)

    def evaluate(self, data: str | Path, split: str = "val", **kwargs: Any) -> dict[str, float]:
        from ..evaluate import evaluate

        return evaluate(self, data, split=split, **kwargs)
