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
this protocol and never branch on the family. What a family may offer beyond it is *declared* below
(``is_seq2seq``, ``stateful``, ``source_tokenizer``, ``chat_template``, ``decode_dtype``,
``param_groups``) with a default, so callers read an attribute instead of probing with getattr/hasattr.

Training has one more operation, written once in ``lmforge.train`` for every gradient-trained family:

* ``loss(batch, state)``: the mean cross-entropy over the target positions of ``batch = (inputs,
  labels)`` (labels of -100 are not targets: padding, prompts, packed-document boundaries), the
  number of target positions, and the state to carry into the next window (stateful models).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import LMForgeError
from ..tokenizers import Tokenizer, check_tokenizer_fits, load_tokenizer
from ..utils import atomic_write_json
from .config_file import read_model_config
from .weights import load_weights, save_weights

# Bounds of model options: far beyond any CPU model, small enough to refuse typos before allocating.
MAX_VOCAB = 1 << 24
MAX_CONTEXT = 1 << 30
MAX_LAYERS = 4096
MAX_WIDTH = 1 << 16
PRESET = "from the preset"


def masked_cross_entropy(logits: torch.Tensor, labels: torch.Tensor,
                         label_smoothing: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean cross-entropy (nats) over positions whose label is not -100, and their number. A batch
    without targets gives loss 0 (not nan), so it adds nothing to an accumulated step."""
    n = (labels != -100).sum()
    total = F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), labels.reshape(-1), ignore_index=-100,
                            reduction="sum", label_smoothing=label_smoothing)
    return total / n.clamp(min=1), n


@dataclass
class Trace:
    """What a model computed on one sequence (batch row 0), for looking inside it (``lmforge inspect``).
    Fields a family cannot provide stay empty; its capability flags on :class:`LanguageModel` say which."""

    logits: torch.Tensor                                  # (T, V) next-token logits at every input position
    #: attention weights per kind ("self"; seq2seq: "self", "encoder", "cross"), one (H, T, S) tensor a layer
    attention: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    #: the residual stream (T, d): the block input (embeddings), then the output of every block
    hidden_states: list[torch.Tensor] = field(default_factory=list)
    backoff_order: np.ndarray | None = None               # (T,) the n-gram order that answered each target
    state_norm: torch.Tensor | None = None                # (T,) ||h_t|| of the top recurrent layer


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

    # --- declared capabilities (a family overrides what it offers) ----------------------------
    #: an encoder-decoder: conditions on a source sequence (``lmforge translate``), not a prompt
    is_seq2seq: bool = False
    #: the trainer reads consecutive windows and carries ``state`` across them (truncated BPTT, RNNs)
    stateful: bool = False
    #: the tokenizer of the source side (seq2seq with separate vocabularies); None = ``tokenizer``
    source_tokenizer: Tokenizer | None = None
    #: a Jinja chat template from the model's files (GGUF metadata, tokenizer_config.json, a
    #: fine-tuning run's chat_template.jinja); None = none
    chat_template: str | None = None
    #: the weight layout prepared for decoding (generation/fast.py: fp32, bf16, int8, int4; or a GGUF file
    #: loaded straight into int8/int4); None = training layout
    decode_dtype: str | None = None
    #: ``init_slots`` gives a cache in which many sequences decode at their own positions in one batched
    #: forward (continuous batching, generation/engine.py); False = served one sequence at a time
    batches_slots: bool = False

    def param_groups(self, weight_decay: float) -> list[dict]:
        """Optimizer parameter groups; the default decays every trainable parameter (families override it
        to exempt biases, norms and embeddings)."""
        params = [p for p in self.parameters() if p.requires_grad]  # type: ignore[attr-defined]
        return [{"params": params, "weight_decay": weight_decay}]

    def hidden_matrices(self) -> list[Any]:
        """The 2-D weight matrices inside the network (not embeddings, output head, norms or biases): what the
        Muon optimizer updates (``--optimizer muon``). Empty = the family does not support Muon."""
        return []

    @property
    def encoder_tokenizer(self) -> Tokenizer | None:
        """The tokenizer of the model's input side: ``source_tokenizer`` when separate, else ``tokenizer``."""
        return self.source_tokenizer or self.tokenizer

    # --- capabilities (what ``trace`` returns besides logits; ``lmforge inspect`` draws these views) ---
    #: ``trace`` returns every layer's attention weights, from the opt-in exact path (Transformers)
    has_attention: bool = False
    #: ``trace`` returns the residual stream of every layer and ``unembed`` maps it to logits (logit lens)
    has_logit_lens: bool = False
    #: ``trace`` returns the order of the n-gram that answered each target (n-gram back-off)
    has_backoff: bool = False
    #: ``trace`` returns the norm of the recurrent state at each position (RNN/GRU/LSTM)
    has_state_norm: bool = False

    # --- the protocol -------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:  # pragma: no cover - overridden
        raise NotImplementedError

    @property
    def context_length(self) -> int | None:
        return None

    #: ``init_state(..., static=True)`` gives a state whose decoding steps all have the same shapes
    #: (positions as tensors: a StaticKVCache), so ``torch.compile`` can capture one step (generation/fast.py)
    supports_static_state: bool = False
    #: ``state_rewind`` can forget the last tokens fed (speculative decoding drops rejected drafts);
    #: models without it are re-fed from scratch when used as draft models
    rewindable_state: bool = False

    def init_state(self, batch_size: int, max_length: int, static: bool = False) -> Any:
        """A fresh state for incremental decoding of ``batch_size`` sequences of at most
        ``max_length`` tokens (a pre-allocated KV cache for Transformers). None when the model
        has no incremental state (then callers re-feed the whole sequence). ``static`` asks for a
        fixed-shape state (only where ``supports_static_state``)."""
        return None

    def state_rewind(self, state: Any, n: int) -> Any:
        """Forget the last ``n`` tokens fed into ``state`` (only where ``rewindable_state``)."""
        raise NotImplementedError(f"{type(self).__name__} cannot rewind its state")

    def init_slots(self, slots: int, max_length: int) -> Any:
        """A cache of ``slots`` independent sequences of at most ``max_length`` tokens each (``batches_slots``)."""
        raise NotImplementedError(f"{type(self).__name__} does not decode sequences in slots")

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

    def trace(self, input_ids: torch.Tensor, targets: torch.Tensor, state: Any = None,
              source_ids: torch.Tensor | None = None) -> tuple[Trace, Any]:
        """Logits of a (1, T) sequence plus what the family can show of its insides (see :class:`Trace`),
        continuing from ``state`` like ``forward_logits`` (an encoder-decoder encodes ``source_ids``, (1, S),
        instead). Slower than ``forward_logits``: for looking only."""
        logits, state = self.forward_logits(input_ids, state)
        return Trace(logits=logits[0]), state

    def unembed(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits from a residual stream (the final norm, then the output head): the logit lens."""
        raise NotImplementedError(f"{type(self).__name__} has no logit lens")

    def state_select(self, state: Any, index: torch.Tensor) -> Any:
        """Reorder/select batch rows of a state (beam search); default for tensor tuples."""
        if state is None:
            return None
        raise NotImplementedError(f"{type(self).__name__} does not support state reordering")

    # --- training ---------------------------------------------------------------------------
    def loss(self, batch: tuple[Any, torch.Tensor], state: Any = None) -> tuple[torch.Tensor, torch.Tensor, Any]:
        """Teacher-forced loss on ``batch = (inputs, labels)``: ``(mean_loss, n_targets, state)``.

        ``inputs`` is what the family reads (token ids (B, T); a dict of tensors for seq2seq), ``labels``
        (B, T) the token to predict at each position, -100 where nothing is predicted. ``mean_loss`` is
        the mean cross-entropy over the ``n_targets`` positions with a label (a 0-dim tensor each), so
        the trainer can weight micro-batches and ranks by their share of the global batch's targets.
        The default reads ``forward_logits``; families override it to fuse or smooth."""
        inputs, labels = batch
        logits, state = self.forward_logits(inputs, state)
        return (*masked_cross_entropy(logits, labels), state)

    def detach_state(self, state: Any) -> Any:
        """The state cut from the autograd graph (truncated back-propagation through time)."""
        if state is None:
            return None
        if isinstance(state, torch.Tensor):
            return state.detach()
        return type(state)(self.detach_state(s) for s in state)

    @property
    def device(self) -> torch.device:
        """Where the model's weights are: callers put inputs there."""
        if isinstance(self, torch.nn.Module):
            p = next(self.parameters(), None)
            if p is not None:
                return p.device
        return torch.device("cpu")

    def shard_units(self) -> list[torch.nn.Module]:
        """Sub-modules that FSDP shards one by one (the Transformer blocks); the root shards the rest.
        Empty for families FSDP does not suit (``--strategy fsdp`` then refuses them)."""
        return []

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
    def config_for(cls, preset: str | None, vocab_size: int | None = None, **overrides: Any) -> Any:
        """The preset's config, then ``overrides`` (validated by the config's field declarations)."""
        preset = preset or cls.default_preset
        if preset not in cls.presets:
            raise LMForgeError(f"unknown {cls.model_type} preset {preset!r}; choose one of {', '.join(cls.presets)}")
        unknown = set(overrides) - {f.name for f in fields(cls.config_class)}
        if unknown:
            raise LMForgeError(f"unknown {cls.model_type} option(s) {', '.join(sorted(unknown))}")
        cfg = {**cls.presets[preset], **cls.preset_fields(), **overrides}
        if vocab_size is not None:
            cfg["vocab_size"] = vocab_size
        return cls.config_class(**cfg)  # type: ignore[call-arg]

    @classmethod
    def check_overrides(cls, preset: str | None, overrides: dict[str, Any]) -> dict[str, Any]:
        """``overrides`` converted and checked with the preset (cross-field rules too), before any data."""
        cfg = cls.config_for(preset, **overrides)
        return {k: getattr(cfg, k) for k in overrides}

    @classmethod
    def from_preset(cls, preset: str | None, vocab_size: int, **overrides: Any) -> LanguageModel:
        """A fresh model: the preset's config, then ``overrides``, for a vocabulary of ``vocab_size``."""
        return cls(cls.config_for(preset, vocab_size, **overrides))  # type: ignore[call-arg]

    def save_pretrained(self, directory: str | Path, save_tokenizer: bool = True,
                        weights: dict[str, torch.Tensor] | None = None) -> None:
        """config.json (model_type + config), model.safetensors and tokenizer.json, like Hugging Face.
        ``weights``: the full tensors to write instead of the module's own (gathered from FSDP shards)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        save_weights(self, directory / "model.safetensors", weights)  # type: ignore[arg-type]
        atomic_write_json(directory / "config.json",
                          {"model_type": self.model_type, **self.config.to_dict()})  # type: ignore[attr-defined]
        if save_tokenizer and self.tokenizer is not None:
            self.tokenizer.save(directory)
        if self.chat_template is not None:  # Hugging Face's file name for it
            from ..utils import atomic_write_text

            atomic_write_text(directory / "chat_template.jinja", self.chat_template)

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> LanguageModel:
        directory = Path(directory)
        model = cls(read_model_config(cls.config_class, directory))  # type: ignore[call-arg]
        load_weights(model, directory / "model.safetensors")  # type: ignore[arg-type]
        model.eval()  # type: ignore[attr-defined]
        if (directory / "tokenizer.json").exists():
            model.tokenizer = load_tokenizer(directory)
            check_tokenizer_fits(model.tokenizer, model.config.vocab_size, str(directory))  # type: ignore
        if (directory / "chat_template.jinja").exists():
            model.chat_template = (directory / "chat_template.jinja").read_text(encoding="utf-8")
        return model

    def num_parameters(self) -> int:
        if isinstance(self, torch.nn.Module):
            return sum(p.numel() for p in self.parameters())
        return 0
