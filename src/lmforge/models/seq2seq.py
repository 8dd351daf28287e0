"""An encoder-decoder Transformer (Vaswani et al. 2017; T5's pre-norm layout), written from scratch.

    p(y | x) = prod_t p(y_t | y_<t, x),   p(. | y_<t, x) = softmax(h_t W_vocab^T)

The **encoder** reads the whole source x with bidirectional self-attention (padding keys masked)
and produces one vector per source token, the *memory*. The **decoder** is a GPT-style stack of
causal self-attention blocks with one more sub-layer per block, *cross-attention*, whose queries
come from the target prefix and whose keys/values come from the memory. Training is teacher
forcing: the decoder reads ``<eot> y_1 .. y_n`` and is trained (cross-entropy with label
smoothing) to predict ``y_1 .. y_n <eot>``.

The blocks reuse ``layers.py``: the encoder block is the GPT block with ``causal=False``; the
decoder block adds :class:`~lmforge.models.layers.CrossAttention`.

In the common model protocol, the *state* of a seq2seq model is :class:`Seq2SeqState`: the encoded
source (memory, its mask and each layer's cross-attention keys/values) plus the decoder's static
KV cache. ``forward_logits(target_ids, state)`` then scores target tokens exactly like a
decoder-only model, so scoring, greedy decoding and beam search are shared with GPT.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import LMForgeError
from ..options import Options, option
from ..tokenizers import SOURCE_TOKENIZER, check_tokenizer_fits, load_tokenizer
from .base import MAX_CONTEXT, MAX_LAYERS, MAX_VOCAB, MAX_WIDTH, PRESET, LanguageModel, Trace, masked_cross_entropy
from .layers import (
    Block,
    CrossAttention,
    KVCache,
    decay_param_groups,
    init_weights,
    make_norm,
    record_attention,
    record_residual_stream,
    sinusoidal_table,
)


@dataclass
class Seq2SeqConfig(Options):
    vocab_size: int = option(8000, ge=1, le=MAX_VOCAB, cli=False,
                             help="target vocabulary (and source, when shared; from the data)")
    source_vocab_size: int | None = option(None, ge=1, le=MAX_VOCAB, cli=False,
                                           help="source vocabulary; None = shared with the target")
    n_embd: int = option(256, ge=1, le=MAX_WIDTH, help="model width", default_text=PRESET)
    n_head: int = option(4, ge=1, le=MAX_WIDTH, help="attention heads", default_text=PRESET)
    n_encoder_layer: int = option(3, ge=1, le=MAX_LAYERS, help="seq2seq: encoder blocks", default_text=PRESET)
    n_decoder_layer: int = option(3, ge=1, le=MAX_LAYERS, help="seq2seq: decoder blocks", default_text=PRESET)
    mlp_hidden: int | None = option(None, ge=1, le=MAX_WIDTH * 8, help="MLP hidden width",
                                    default_text="4 x n_embd")
    mlp: Literal["gelu", "gelu_tanh", "swiglu"] = option("gelu", help="MLP activation", default_text=PRESET)
    norm: Literal["layernorm", "rmsnorm"] = option("layernorm", help="normalisation", default_text=PRESET)
    norm_eps: float = option(1e-5, gt=0, lt=1, cli=False, help="epsilon of the norms")
    bias: bool = option(True, cli=False, help="biases in Linear and LayerNorm")
    pos: Literal["sinusoidal", "learned"] = option("sinusoidal", help="position encoding", default_text=PRESET)
    max_source_length: int = option(256, ge=1, le=MAX_CONTEXT, help="seq2seq: longest source (tokens)",
                                    default_text=PRESET)
    max_target_length: int = option(128, ge=2, le=MAX_CONTEXT, help="seq2seq: longest target (tokens)",
                                    default_text=PRESET)
    # Tie the output head to the (shared) token embedding? Off by default: measured here, tying made a
    # toy word-translation task stall (loss 2.75 vs 0.25 untied after 300 steps at lr 2e-3).
    tie_embeddings: bool = option(False, help="share the embedding with the head", default_text=PRESET)
    dropout: float = option(0.1, ge=0, lt=1, help="dropout probability", default_text=PRESET)
    label_smoothing: float = option(0.1, ge=0, lt=1, default_text=PRESET,
                                    help="seq2seq: label smoothing (Szegedy et al. 2016; training only)")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.n_embd % self.n_head:
            raise LMForgeError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")

    @property
    def hidden(self) -> int:
        return self.mlp_hidden or 4 * self.n_embd



# `small` is sized for ~30 CPU minutes on the 18k de-en pairs; `base` is Transformer-base's shape.
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(n_embd=64, n_head=4, n_encoder_layer=2, n_decoder_layer=2, dropout=0.1),
    "small": dict(n_embd=256, n_head=4, n_encoder_layer=3, n_decoder_layer=3, dropout=0.1),
    "base": dict(n_embd=512, n_head=8, n_encoder_layer=6, n_decoder_layer=6, dropout=0.1, max_target_length=256),
}


class DecoderBlock(nn.Module):
    """Pre-norm decoder block: causal self-attention, cross-attention to the memory, MLP."""

    def __init__(self, c: Seq2SeqConfig, layer_idx: int) -> None:
        super().__init__()
        self.self_block = Block(c.n_embd, c.n_head, None, c.hidden, c.mlp, c.norm, c.norm_eps, c.bias, None,
                                c.dropout, layer_idx)
        self.ln_cross = make_norm(c.norm, c.n_embd, c.bias, c.norm_eps)
        self.cross = CrossAttention(c.n_embd, c.n_head, c.bias, c.dropout)

    def forward(self, x: torch.Tensor, memory_kv: tuple[torch.Tensor, torch.Tensor], memory_mask: torch.Tensor,
                cache: KVCache | None = None) -> torch.Tensor:
        b = self.self_block
        x = x + b.attn(b.ln_1(x), None, cache)                           # y_t attends to y_<=t
        x = x + self.cross(self.ln_cross(x), memory_kv, memory_mask)    # ... and to the whole source
        return x + b.mlp(b.ln_2(x))


@dataclass
class Seq2SeqState:
    """What decoding needs besides the target prefix: the encoded source and the decoder's cache."""

    memory_kv: list[tuple[torch.Tensor, torch.Tensor]]   # per decoder layer, (B, H, S, hd) each
    memory_mask: torch.Tensor                            # (B, 1, 1, S) True at real source tokens
    cache: KVCache

    @property
    def batch_size(self) -> int:
        return self.memory_mask.shape[0]


class Seq2Seq(nn.Module, LanguageModel):
    model_type = "seq2seq"
    config_class = Seq2SeqConfig
    presets = PRESETS
    default_preset = "small"
    is_seq2seq = True
    has_attention = True
    has_logit_lens = True

    def __init__(self, config: Seq2SeqConfig) -> None:
        super().__init__()
        self.config = c = config
        self.embed = nn.Embedding(c.vocab_size, c.n_embd)            # target (and shared) token embedding
        self.src_embed = nn.Embedding(c.source_vocab_size, c.n_embd) if c.source_vocab_size else None
        if c.pos == "learned":
            self.enc_pos = nn.Embedding(c.max_source_length, c.n_embd)
            self.dec_pos = nn.Embedding(c.max_target_length, c.n_embd)
        else:
            self.register_buffer("pe", sinusoidal_table(max(c.max_source_length, c.max_target_length), c.n_embd),
                                 persistent=False)
        self.drop = nn.Dropout(c.dropout)
        self.encoder = nn.ModuleList(Block(c.n_embd, c.n_head, None, c.hidden, c.mlp, c.norm, c.norm_eps, c.bias,
                                           None, c.dropout, i, causal=False) for i in range(c.n_encoder_layer))
        self.enc_norm = make_norm(c.norm, c.n_embd, c.bias, c.norm_eps)
        self.decoder = nn.ModuleList(DecoderBlock(c, i) for i in range(c.n_decoder_layer))
        self.dec_norm = make_norm(c.norm, c.n_embd, c.bias, c.norm_eps)
        self.lm_head = nn.Linear(c.n_embd, c.vocab_size, bias=False)
        if c.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        self.apply(self._init_weights)
        n_layer = c.n_encoder_layer + c.n_decoder_layer
        for name, p in self.named_parameters():
            if name.endswith("proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * n_layer))
        # Embeddings are multiplied by sqrt(d) (Vaswani et al.) so that they are not drowned by the
        # unit-amplitude sinusoids; with a tied head this also keeps the logits' initial scale small.
        self.embed_scale = math.sqrt(c.n_embd)

    _init_weights = staticmethod(init_weights)

    # --- the model -----------------------------------------------------------------------------
    def _positions(self, which: str, start: int, length: int, device: torch.device) -> torch.Tensor:
        if self.config.pos == "learned":
            table = self.enc_pos if which == "enc" else self.dec_pos
            return table(torch.arange(start, start + length, device=device))
        return self.pe[start:start + length]

    def encode(self, src: torch.Tensor, src_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The memory (B, S, d): the source read bidirectionally. ``src_mask`` is True at real tokens."""
        B, S = src.shape
        if S > self.config.max_source_length:
            raise ValueError(f"source of {S} tokens exceeds max_source_length {self.config.max_source_length}")
        emb = self.src_embed if self.src_embed is not None else self.embed
        x = self.drop(emb(src) * self.embed_scale + self._positions("enc", 0, S, src.device))
        attn_mask = None if src_mask is None else src_mask[:, None, None, :]
        for block in self.encoder:
            x = block(x, attn_mask=attn_mask)
        return self.enc_norm(x)

    def decode(self, tgt: torch.Tensor, memory_kv: list[tuple[torch.Tensor, torch.Tensor]],
               memory_mask: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """Logits (B, T, V) for the next target token at every position of ``tgt``."""
        B, T = tgt.shape
        start = cache.pos if cache is not None else 0
        if start + T > self.config.max_target_length:
            raise ValueError(f"target of {start + T} tokens exceeds max_target_length "
                             f"{self.config.max_target_length}")
        x = self.drop(self.embed(tgt) * self.embed_scale + self._positions("dec", start, T, tgt.device))
        for block, kv in zip(self.decoder, memory_kv):
            x = block(x, kv, memory_mask, cache)
        if cache is not None:
            cache.pos += T
        return self.lm_head(self.dec_norm(x))

    def forward(self, batch: dict[str, torch.Tensor], labels: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Teacher forcing on a batch from :func:`lmforge.data.parallel.make_batch`: logits and, given
        labels (-100 at padding), the mean cross-entropy (label-smoothed while training)."""
        src, src_mask, tgt = batch["src"], batch["src_mask"], batch["tgt"]
        memory = self.encode(src, src_mask)
        kv = [blk.cross.memory_kv(memory) for blk in self.decoder]
        logits = self.decode(tgt, kv, src_mask[:, None, None, :])
        if labels is None:
            return logits, None
        smoothing = self.config.label_smoothing if self.training else 0.0
        loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), labels.reshape(-1), ignore_index=-100,
                               label_smoothing=smoothing)
        return logits, loss

    # --- LanguageModel protocol ----------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size

    @property
    def context_length(self) -> int:
        return self.config.max_target_length

    def encode_source(self, src: torch.Tensor, src_mask: torch.Tensor, max_length: int | None = None
                      ) -> Seq2SeqState:
        """Encode a padded source batch once; the returned state conditions ``forward_logits``."""
        memory = self.encode(src, src_mask)
        c = self.config
        p = self.embed.weight
        length = min(max_length or c.max_target_length, c.max_target_length)
        cache = KVCache(c.n_decoder_layer, src.shape[0], c.n_head, length, c.n_embd // c.n_head, dtype=p.dtype,
                        device=p.device)
        return Seq2SeqState([blk.cross.memory_kv(memory) for blk in self.decoder], src_mask[:, None, None, :],
                            cache)

    def init_state(self, batch_size: int, max_length: int) -> Any:
        raise LMForgeError("a seq2seq model decodes from a source sentence: use lmforge translate (or "
                           "model.translate) rather than generate")

    def forward_logits(self, input_ids: torch.Tensor, state: Seq2SeqState | None = None,
                       last_only: bool = False) -> tuple[torch.Tensor, Seq2SeqState]:
        if not isinstance(state, Seq2SeqState):
            raise LMForgeError("a seq2seq model needs an encoded source (model.encode_source) to score targets; "
                               "use lmforge translate")
        logits = self.decode(input_ids, state.memory_kv, state.memory_mask, state.cache)
        return (logits[:, -1:] if last_only else logits), state

    def trace(self, input_ids: torch.Tensor, targets: torch.Tensor, state: Seq2SeqState | None = None,
              source_ids: torch.Tensor | None = None) -> tuple[Trace, Seq2SeqState]:
        """Attention kinds: "encoder" (source x source), "self" (target x target, causal) and "cross"
        (target x source: the alignment). The residual stream is the decoder's."""
        if source_ids is None:
            raise LMForgeError("a seq2seq model is traced on a source sentence and its target")
        with record_attention(self), record_residual_stream(self.decoder) as hidden:
            state = self.encode_source(source_ids, torch.ones_like(source_ids, dtype=torch.bool),
                                       max_length=input_ids.shape[1])
            logits, state = self.forward_logits(input_ids, state)
        attention = {"encoder": [b.attn.weights[0] for b in self.encoder],
                     "self": [b.self_block.attn.weights[0] for b in self.decoder],
                     "cross": [b.cross.weights[0] for b in self.decoder]}
        return Trace(logits[0], attention, [h[0] for h in hidden]), state

    def unembed(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.dec_norm(hidden))

    def state_select(self, state: Seq2SeqState, index: torch.Tensor) -> Seq2SeqState:
        """Keep/reorder batch rows (beam search): the memory's keys/values, its mask and the cache."""
        state.memory_kv = [(k.index_select(0, index), v.index_select(0, index)) for k, v in state.memory_kv]
        state.memory_mask = state.memory_mask.index_select(0, index)
        state.cache.select(index)
        return state

    # --- optimisation --------------------------------------------------------------------------
    def param_groups(self, weight_decay: float) -> list[dict]:
        return decay_param_groups(self, weight_decay)

    def loss(self, batch: tuple[dict[str, torch.Tensor], torch.Tensor], state: None = None
             ) -> tuple[torch.Tensor, torch.Tensor, None]:
        inputs, labels = batch                                # {src, src_mask, tgt}, (B, T) with -100 at padding
        logits, _ = self(inputs)                              # (B, T, V)
        smoothing = self.config.label_smoothing if self.training else 0.0
        return (*masked_cross_entropy(logits, labels, smoothing), None)

    def shard_units(self) -> list[nn.Module]:
        return [*self.encoder, *self.decoder]

    # --- persistence: the source tokenizer too, when the vocabularies are separate -------------
    def save_pretrained(self, directory: Any, save_tokenizer: bool = True,
                        weights: dict[str, torch.Tensor] | None = None) -> None:
        super().save_pretrained(directory, save_tokenizer, weights)
        src_tok = self.source_tokenizer
        if save_tokenizer and src_tok is not None and src_tok is not self.tokenizer:
            src_tok.save(directory, SOURCE_TOKENIZER)

    @classmethod
    def from_pretrained(cls, directory: Any) -> Seq2Seq:
        model = super().from_pretrained(directory)
        p = Path(directory) / SOURCE_TOKENIZER
        model.source_tokenizer = load_tokenizer(p) if p.exists() else model.tokenizer  # type: ignore[attr-defined]
        c = model.config  # type: ignore[attr-defined]
        check_tokenizer_fits(model.source_tokenizer, c.source_vocab_size or c.vocab_size, str(p))
        return model  # type: ignore[return-value]
