"""A decoder-only Transformer language model (GPT-2 / Llama style), written from scratch.

    p(x_1..x_T) = prod_t p(x_t | x_<t),   p(. | x_<t) = softmax(h_t W_vocab^T)

where h_t is the output of n_layer pre-norm blocks of causal self-attention and MLP over the token
embeddings (plus position information). One config dataclass covers GPT-2 (learned positions,
LayerNorm, GELU, tied embeddings) and Llama-style models (RoPE, RMSNorm, SwiGLU, grouped-query
attention, untied head); see ``PRESETS``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import kernels
from ..errors import LMForgeError
from ..options import Options, option
from .base import MAX_CONTEXT, MAX_LAYERS, MAX_VOCAB, MAX_WIDTH, PRESET, LanguageModel, Trace
from .layers import (
    EXACT_CHUNK,
    MLP,
    Block,
    KVCache,
    LayerNorm,
    RMSNorm,
    SlotKVCache,
    StaticKVCache,
    decay_param_groups,
    init_weights,
    make_norm,
    record_attention,
    record_residual_stream,
    rope_tables,
    sinusoidal_table,
)
from .quant import QuantLinear

#: how lmforge's decode_stack (kernels/decode_ops.cpp) runs each Linear layout, by (mode, kernel)
STACK_KINDS = {("linear", ""): 0, ("bf16", "torch"): 0, ("fp32", "torch"): 1, ("int8", "lmforge"): 2,
               ("int8", "torch"): 3, ("int4", "lmforge"): 4, ("int4", "torch"): 5, ("fp32", "lmforge"): 6,
               ("bf16", "lmforge"): 6}
#: ... each norm (by its class) and each MLP (by MLP.kind)
STACK_NORMS = {RMSNorm: 0, LayerNorm: 1}
STACK_MLPS = {"swiglu": 0, "gelu": 1, "gelu_tanh": 2, "relu2": 3}


#: the most rows (batch x new tokens) of one decode_stack pass (its attention goes token by token: beyond this
#: PyTorch's fused attention in the general path costs less); int8 layers without VNNI stop at their gemm_rows
PREFILL_ROWS = 256


def _stack_linear(m: nn.Module) -> tuple[list, list[int]] | None:
    """One Linear layer as decode_stack takes it: ([t1, t2, bias], [kind, group]); None if it cannot."""
    if type(m) is nn.Linear:
        return [m.weight, None, m.bias], [0, 0]
    if not isinstance(m, QuantLinear) or m.padded:
        return None  # e.g. a LoRA wrapper, or channels padded to whole tiles (an output head's)
    kind = STACK_KINDS[(m.mode, m.kernel)]
    t1 = "weight_tiles" if m.mode in ("fp32", "bf16") and m.kernel == "lmforge" else \
        {"bf16": "weight", "fp32": "weight_t"}.get(m.mode, "qweight")
    t2 = {"int8": "scale", "int4": "scales_dm" if m.kernel == "lmforge" else "scales_zeros"}.get(m.mode)
    return [getattr(m, t1), None if t2 is None else getattr(m, t2), m.bias], [kind, m.group_size]


@dataclass
class GPTConfig(Options):
    vocab_size: int = option(50304, ge=1, le=MAX_VOCAB, cli=False, help="output vocabulary (from the data)")
    block_size: int = option(256, ge=1, le=MAX_CONTEXT, help="context length (tokens)", default_text=PRESET)
    n_layer: int = option(6, ge=1, le=MAX_LAYERS, help="Transformer blocks", default_text=PRESET)
    n_head: int = option(6, ge=1, le=MAX_WIDTH, help="attention heads", default_text=PRESET)
    n_kv_head: int | None = option(None, ge=1, le=MAX_WIDTH, default_text="n_head (multi-head attention)",
                                   help="key/value heads (fewer than n_head = grouped-query attention)")
    n_embd: int = option(384, ge=1, le=MAX_WIDTH, help="model width (embedding size)", default_text=PRESET)
    mlp_hidden: int | None = option(None, ge=1, le=MAX_WIDTH * 8, help="MLP hidden width",
                                    default_text="4 x n_embd (gelu) or ~8/3 x n_embd rounded to 64 (swiglu)")
    mlp: Literal["gelu", "gelu_tanh", "relu2", "swiglu"] = option(
        "gelu", help="MLP: exact GELU, GPT-2's tanh GELU, ReLU^2 (Primer), or SwiGLU (Llama)", default_text=PRESET)
    norm: Literal["layernorm", "rmsnorm"] = option("layernorm", help="normalisation", default_text=PRESET)
    norm_eps: float = option(1e-5, gt=0, lt=1, cli=False, help="epsilon of the norms")
    pos: Literal["learned", "sinusoidal", "rope"] = option("learned", help="position encoding", default_text=PRESET)
    rope_theta: float = option(10000.0, gt=0, cli=False, help="RoPE base")
    rope_scaling: dict | None = option(None, cli=False, help="RoPE scaling ({type: linear, factor: F})")
    qk_norm: bool = option(False, help="RMSNorm on each head's queries and keys (QK-norm)", default_text=PRESET)
    bias: bool = option(False, cli=False, help="biases in Linear and LayerNorm")
    qkv_bias: bool | None = option(None, cli=False, help="QKV biases only (Qwen2); None = same as bias")
    tie_embeddings: bool = option(True, help="share the token embedding with the output head", default_text=PRESET)
    sliding_window: int | None = option(None, ge=1, cli=False, help="attend to the last N positions only (Mistral)")
    dropout: float = option(0.0, ge=0, lt=1, help="dropout probability", default_text=PRESET)
    extra: dict = option(default_factory=dict, cli=False, help="free-form (e.g. an imported model's name)")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.n_embd % self.n_head:
            raise LMForgeError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if self.n_kv_head is not None and self.n_head % self.n_kv_head:
            raise LMForgeError(f"n_head ({self.n_head}) must be divisible by n_kv_head ({self.n_kv_head})")
        if self.pos == "rope" and (self.n_embd // self.n_head) % 2:
            raise LMForgeError("rope needs an even head dimension (n_embd / n_head)")

    @property
    def hidden(self) -> int:
        if self.mlp_hidden:
            return self.mlp_hidden
        if self.mlp == "swiglu":
            return 64 * math.ceil(8 * self.n_embd / 3 / 64)
        return 4 * self.n_embd



# Presets. `tiny` is the demo recipe (tuned for ~5 CPU minutes on Tiny Shakespeare, see
# docs/demo.md); `nano` is nanoGPT's CPU recipe; `small` is nanoGPT's shakespeare_char "baby GPT";
# `gpt2` is GPT-2 124M's shape.
PRESETS: dict[str, dict[str, Any]] = {
    "nano": dict(n_layer=4, n_head=4, n_embd=128, block_size=64),
    "tiny": dict(n_layer=4, n_head=4, n_embd=128, block_size=128, pos="rope", norm="rmsnorm", mlp="gelu",
                 tie_embeddings=False),
    "small": dict(n_layer=6, n_head=6, n_embd=384, block_size=256, dropout=0.2),
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768, block_size=1024, bias=True, vocab_size=50257,
                 mlp="gelu_tanh"),
}


def packed_positions_and_mask(doc_ids: torch.Tensor, window: int | None = None
                              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions that restart at each example of a packed row, and the (B, 1, T, T) attention mask that lets
    query i see key j only when j <= i and both belong to the same example (and, with a sliding window,
    i - j < window). The diagonal is always allowed, so no row of the mask is empty."""
    B, T = doc_ids.shape
    idx = torch.arange(T, device=doc_ids.device).expand(B, T)
    first = torch.ones_like(doc_ids, dtype=torch.bool)
    first[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    starts = torch.where(first, idx, torch.zeros_like(idx)).cummax(dim=1).values
    pos = idx - starts                                                      # (B, T)
    same = doc_ids[:, :, None] == doc_ids[:, None, :]                       # (B, T, T)
    causal = torch.ones(T, T, dtype=torch.bool, device=doc_ids.device).tril()
    mask = same & causal
    if window is not None:
        mask &= (idx[:, :, None] - idx[:, None, :]) < window
    return pos, mask[:, None]


class GPT(nn.Module, LanguageModel):
    model_type = "gpt"
    batches_slots = True
    config_class = GPTConfig
    presets = PRESETS
    default_preset = "tiny"
    has_attention = True
    has_logit_lens = True

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        self._stack: tuple | bool | None = None  # decode_stack's weights (_decode_stack), built on first use
        c = config
        self.wte = nn.Embedding(c.vocab_size, c.n_embd)  # token embedding
        if c.pos == "learned":
            self.wpe = nn.Embedding(c.block_size, c.n_embd)
        elif c.pos == "sinusoidal":
            self.register_buffer("pe", sinusoidal_table(c.block_size, c.n_embd), persistent=False)
        else:
            cos, sin = rope_tables(c.block_size, c.n_embd // c.n_head, c.rope_theta, c.rope_scaling)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        self.drop = nn.Dropout(c.dropout)
        self.blocks = nn.ModuleList(
            Block(c.n_embd, c.n_head, c.n_kv_head, c.hidden, c.mlp, c.norm, c.norm_eps, c.bias, c.qkv_bias,
                  c.dropout, i, sliding_window=c.sliding_window, qk_norm=c.qk_norm) for i in range(c.n_layer))
        self.ln_f = make_norm(c.norm, c.n_embd, c.bias, c.norm_eps)
        self.lm_head = nn.Linear(c.n_embd, c.vocab_size, bias=False)
        if c.tie_embeddings:
            self.lm_head.weight = self.wte.weight  # weight tying (Press & Wolf 2017)
        self.apply(self._init_weights)
        # GPT-2: scale the residual projections by 1/sqrt(2 * n_layer) so the residual stream's
        # variance does not grow with depth.
        for name, p in self.named_parameters():
            if name.endswith("proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * c.n_layer))

    _init_weights = staticmethod(init_weights)

    # --- the model -----------------------------------------------------------------------------
    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None,
                cache: KVCache | SlotKVCache | None = None, last_only: bool = False,
                doc_ids: torch.Tensor | None = None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Logits (B, T, V); given targets, (None, the mean cross-entropy in nats over the targets that are not
        -100). Only target positions go through the output head: fine-tuning data with masked prompts skips the
        (T, V) logits of every prompt token. ``doc_ids`` (B, T) packs several examples in one row: attention
        stays inside each example (block-diagonal causal mask) and positions restart at each example's start."""
        B, T = idx.shape
        x = self.wte(idx)
        mask = None
        rope = None
        if doc_ids is not None or isinstance(cache, SlotKVCache):
            if doc_ids is not None:  # packed examples: positions restart per example, attention stays inside
                pos, mask = packed_positions_and_mask(doc_ids, self.config.sliding_window)
            else:  # continuous batching: row b's tokens sit at positions lengths[b] .. lengths[b] + T - 1
                pos = cache.begin(T, self.config.sliding_window)  # (B, T), checked against the cache's length
            if self.config.pos == "learned":
                x = x + self.wpe(pos)
            elif self.config.pos == "sinusoidal":
                x = x + self.pe[pos]
            else:
                rope = (self.rope_cos[pos][:, None], self.rope_sin[pos][:, None])  # (B, 1, T, hd): per row
        elif isinstance(cache, StaticKVCache):
            # fixed shapes for a compiled step: positions are a tensor the caller wrote (no Python int)
            pos = cache.positions                              # (T,)
            if self.config.pos == "learned":
                x = x + self.wpe(pos)
            elif self.config.pos == "sinusoidal":
                x = x + self.pe[pos]
            else:
                rope = (self.rope_cos[pos], self.rope_sin[pos])
        else:
            start = cache.pos if cache is not None else 0
            if start + T > self.config.block_size:
                raise ValueError(f"sequence of {start + T} tokens exceeds the context length "
                                 f"{self.config.block_size}")
            if self.config.pos == "learned":
                x = x + self.wpe(torch.arange(start, start + T, device=idx.device))
            elif self.config.pos == "sinusoidal":
                x = x + self.pe[start:start + T]
            else:
                rope = (self.rope_cos[start:start + T], self.rope_sin[start:start + T])
        x = self.drop(x)
        # at inference, a decoding step or a verify pass (a few tokens after a cached prefix) over a plain cache,
        # or a decoding step of a run of slots: each block takes its fused step (Block._step)
        fused = cache is not None and not torch.is_grad_enabled() and not torch.is_autocast_enabled(x.device.type) \
            and x.dtype == cache.k.dtype and self.fused_step
        step = fused and (type(cache) is KVCache and (T == 1 or 0 < cache.pos and T <= EXACT_CHUNK)
                          or isinstance(cache, SlotKVCache) and T == 1 and isinstance(cache.rows, slice))
        # over a plain cache, any pass of a few rows -- a step, a verify pass, a prompt (attention row by row, as in
        # a verify pass) -- takes every block in one call where the model has the stack (decode_stack)
        stack = self._decode_stack() if fused and (type(cache) is KVCache or step) else None
        if stack is not None and B * T > stack[3]:
            stack = None
        if stack is not None:  # every block's step in one call of lmforge's kernels, the same ops from C++
            rows = cache.rows if isinstance(cache, SlotKVCache) else slice(0, B)
            row_pos = cache.positions[:, 0] if isinstance(cache, SlotKVCache) else None
            start = 0 if isinstance(cache, SlotKVCache) else cache.pos
            cos, sin = rope if rope is not None else (None, None)
            x = torch.ops.lmforge.decode_stack(x, stack[0], stack[1], cache.k, cache.v, rows.start or 0, start,
                                               row_pos, cos, sin, self.config.n_head,
                                               self.config.n_kv_head or self.config.n_head, stack[2])
        else:
            for block in self.blocks:
                x = block(x, rope, cache, mask, step)
        if cache is not None:
            cache.advance(T)
        x = self.ln_f(x)
        if targets is not None:
            keep = targets != -100
            if torch.compiler.is_compiling():
                # no data-dependent shapes inside a compiled graph (they break it): every position goes through
                # the head and cross_entropy skips the -100 targets (ignore_index)
                return None, F.cross_entropy(self._head(x).flatten(0, 1).float(), targets.flatten())
            if bool(keep.all()):
                h, y = x.reshape(-1, x.size(-1)), targets.reshape(-1)
            else:
                h, y = x[keep], targets[keep]                    # (N, C), (N,)
            logits = self._head(h)
            if y.numel() == 0:  # nothing to learn from here (a batch of masked prompts only)
                return None, logits.sum() * 0.0
            return None, F.cross_entropy(logits.float(), y)
        if last_only:
            x = cache.take_last(x) if isinstance(cache, SlotKVCache) else x[:, -1:]
        return self._head(x), None

    def _head(self, h: torch.Tensor) -> torch.Tensor:
        """Logits; a head laid out for decoding gives them in fp32 (its kernels sum in fp32: bf16 logits near 25
        move in steps of 0.125, enough to tie the two best tokens and turn greedy decoding at random)."""
        return self.lm_head(h, out_dtype=torch.float32) if isinstance(self.lm_head, QuantLinear) else self.lm_head(h)

    def _decode_stack(self) -> tuple[list, list[int], float, int] | None:
        """The blocks' weights as decode_stack takes them (kernels/decode_ops.cpp: a decoding step through every
        block in one C++ call, Block._step's ops without Python between them), for models laid out for decoding
        (``decode_dtype`` set: the layers no longer change); None where it cannot run them exactly. Built once,
        dropped when the model is moved or cast (``_apply``)."""
        if self.decode_dtype is None:
            return None
        if self._stack is None:
            self._stack = self._build_decode_stack() or False
        return self._stack or None

    def _build_decode_stack(self) -> tuple[list, list[int], float, int] | None:
        """(params, spec, eps, the most rows of one pass). Per block 16 params and 10 spec entries
        (decode_ops.cpp): ln_1 and ln_2 as (weight, bias), then
        (t1, t2, bias) of qkv, proj, fc and down; the norm's and the MLP's kinds (STACK_NORMS, STACK_MLPS), then
        (kind, group) of each linear (STACK_KINDS). None for anything Block._step runs otherwise (a norm whose
        weight is not in the activations' dtype) or decode_stack cannot (a LoRA wrapper, norms of two kinds or
        epsilons)."""
        params: list = []
        spec: list[int] = []
        eps = self.blocks[0].ln_1.eps
        norm = type(self.blocks[0].ln_1)
        for b in self.blocks:
            norms = (b.ln_1, b.ln_2)
            if not (norm in STACK_NORMS and all(type(n) is norm and n.eps == eps for n in norms)
                    and all(n.weight.dtype == self.wte.weight.dtype for n in norms)
                    and type(b.mlp) is MLP and b.mlp.kind in STACK_MLPS):
                return None
            linears = [_stack_linear(m) for m in (b.attn.qkv, b.attn.proj, b.mlp.fc, b.mlp.proj)]
            if any(x is None for x in linears):
                return None
            for n in norms:
                params += [n.weight, n.bias if isinstance(n, LayerNorm) else None]
            spec += [STACK_NORMS[norm], STACK_MLPS[b.mlp.kind]]
            for tensors, kind in linears:  # type: ignore[misc]
                params += tensors
                spec += kind
        # the most rows of one pass: an int8 layer without VNNI loses to a GEMM on the dequantised weight above
        # its gemm_rows (what QuantLinear switches to), row-by-row attention to PyTorch's fused one above
        # PREFILL_ROWS
        limits = [m.gemm_rows for b in self.blocks for m in (b.attn.qkv, b.attn.proj, b.mlp.fc, b.mlp.proj)
                  if isinstance(m, QuantLinear) and m.gemm_rows is not None]
        return params, spec, eps, min(limits + [PREFILL_ROWS])

    def _apply(self, fn, recurse=True):  # noqa: ANN001, ANN202  (nn.Module's signature)
        self._stack = None  # a move or cast replaces tensors the stack holds
        return super()._apply(fn, recurse)

    @property
    def fused_step(self) -> bool:
        """Whether decoding steps and verify passes can take the fused block step (Block._step): lmforge's
        kernels are built (lmforge/kernels), and the model uses nothing they do not do (sliding windows, QK-norm)."""
        c = self.config
        return c.sliding_window is None and not c.qk_norm and kernels.available()

    # --- LanguageModel protocol ----------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size

    @property
    def context_length(self) -> int:
        return self.config.block_size

    supports_static_state = True
    rewindable_state = True

    def init_state(self, batch_size: int, max_length: int, static: bool = False) -> KVCache:
        c = self.config
        p = self.wte.weight  # (the head may have been rewritten for decoding: generation/fast.py)
        shape = (c.n_layer, batch_size, c.n_kv_head or c.n_head, min(max_length, c.block_size), c.n_embd // c.n_head)
        if static:
            return StaticKVCache(*shape, dtype=p.dtype, device=p.device, sliding_window=c.sliding_window)
        return KVCache(*shape, dtype=p.dtype, device=p.device)

    def state_rewind(self, state: KVCache, n: int) -> KVCache:
        state.pos -= n  # the stale entries are overwritten by the next tokens
        return state

    def init_slots(self, slots: int, max_length: int) -> SlotKVCache:
        """A cache of ``slots`` independent sequences of at most ``max_length`` tokens (continuous batching;
        see :class:`lmforge.generation.engine.Engine`)."""
        c = self.config
        p = self.wte.weight
        return SlotKVCache(c.n_layer, slots, c.n_kv_head or c.n_head, min(max_length, c.block_size),
                           c.n_embd // c.n_head, dtype=p.dtype, device=p.device)

    def forward_logits(self, input_ids: torch.Tensor, state: KVCache | None = None,
                       last_only: bool = False) -> tuple[torch.Tensor, KVCache | None]:
        logits, _ = self(input_ids, cache=state, last_only=last_only)
        return logits, state

    def state_select(self, state: KVCache | None, index: torch.Tensor) -> KVCache | None:
        return None if state is None else state.select(index)

    def trace(self, input_ids: torch.Tensor, targets: torch.Tensor, state: KVCache | None = None,
              source_ids: torch.Tensor | None = None) -> tuple[Trace, KVCache | None]:
        with record_attention(self), record_residual_stream(self.blocks) as hidden:
            logits, _ = self(input_ids, cache=state)
        return Trace(logits[0], {"self": [b.attn.weights[0] for b in self.blocks]}, [h[0] for h in hidden]), state

    def unembed(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.ln_f(hidden))

    # --- optimisation --------------------------------------------------------------------------
    def param_groups(self, weight_decay: float) -> list[dict]:
        return decay_param_groups(self, weight_decay)

    def hidden_matrices(self) -> list[nn.Parameter]:
        return [p for p in self.blocks.parameters() if p.dim() == 2]

    def loss(self, batch: tuple[torch.Tensor | dict[str, torch.Tensor], torch.Tensor], state: None = None
             ) -> tuple[torch.Tensor, torch.Tensor, None]:
        """``inputs`` is the ids (B, T), or ``{"input_ids", "doc_ids"}`` for rows packed with several examples
        (fine-tuning); only target positions go through the output head."""
        inputs, labels = batch                                # (B, T) each; labels -100 = no target
        doc_ids = None
        if isinstance(inputs, dict):
            inputs, doc_ids = inputs["input_ids"], inputs.get("doc_ids")
        _, loss = self(inputs, labels, doc_ids=doc_ids)
        return loss, (labels != -100).sum(), None

    def shard_units(self) -> list[nn.Module]:
        return list(self.blocks)

    def flops_per_token(self) -> float:
        """Training FLOPs per token, 6N + 12 L T d (Kaplan et al. 2020; PaLM appendix B)."""
        c = self.config
        n = self.num_parameters() - (self.wpe.weight.numel() if c.pos == "learned" else 0)
        return 6 * n + 12 * c.n_layer * c.block_size * c.n_embd
