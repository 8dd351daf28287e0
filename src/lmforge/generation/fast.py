"""Fast decoding: weight layouts, and a fixed-shape decode step that ``torch.compile`` captures once.

**Layouts.** ``prepare_for_decoding(model, dtype)`` rewrites a model's Linear layers in place, for
inference only, into :class:`lmforge.models.quant.QuantLinear` (batch-1 decoding reads every weight once
per token, so the bytes per weight and the kernel's streaming rate decide the speed):

* ``fp32``: weights stored transposed, (in, out) (``x @ W^T`` streams whole output rows).
* ``bf16``: the whole model in bf16 (half the bytes).
* ``int8``: weight-only int8, one scale per output channel, bf16 activations (lmforge's int8 kernel, PyTorch's
  ``_weight_int8pack_mm`` without it).
* ``int4``: weight-only 4-bit with a scale and a zero per group of 32 inputs (``group_size``; 64 halves
  the scale bytes), bf16 activations (lmforge's int4 kernel with AVX512-VNNI, which rounds them to int8 per 32
  inputs for its integer dot products; ``_weight_int4pack_mm_for_cpu`` elsewhere).

int8 and int4 round the weights, so logits move slightly (greedy outputs can differ from fp32's where
two tokens are nearly tied). The model keeps working through the common protocol (``forward_logits``,
KV cache, generation), but cannot be trained or saved afterwards. The continuous-batching server calls
``prepare_for_decoding(model, dtype)`` too: the layouts serve any batch size.

**Compiled decode step.** :class:`StaticDecoder` decodes with a ``StaticKVCache`` (positions as
tensors, attention over the whole buffer under a mask, nothing reallocated), so every step has the same
shapes, and the step -- forward one token per row, repetition penalty, temperature, top-k, top-p and
the sampling itself (an exponential race over pre-drawn noise: argmax p_i / E_i with E_i ~ Exp(1)
picks i with probability p_i) -- is one function that ``torch.compile`` captures once per model, batch
size and cache length (the cache length is rounded up to a multiple of 64 so nearby lengths share a
graph). The compiled step is kept per model in this process, and Inductor's on-disk caches make the
next process's compile cheaper. Compiling takes minutes on a small CPU, so with ``compile="auto"`` it
is only done for long generations (see :func:`should_compile`).
"""

from __future__ import annotations

import os
import weakref
from typing import Any

import torch
import torch.nn as nn

from ..errors import LMForgeError
from ..models.quant import QUANT_MODES, QuantLinear, finish_decoding_layout
from ..utils import resolve_dtype
from .logits import pick_tokens

DECODE_DTYPES = QUANT_MODES  # ("fp32", "bf16", "int8", "int4")
#: what --dtype takes for decoding: a layout, or auto = fp32 or bf16, whichever a matrix-vector probe measures faster
DECODE_CHOICES = ("auto", *DECODE_DTYPES)
DecodeLinear = QuantLinear  # the name this module used before the layers moved to models/quant.py

#: --compile choices: auto compiles when the generation is long enough to repay the compile time
COMPILE_CHOICES = ("auto", "on", "off")
#: auto: compile a decode step only when a generation decodes at least this many tokens (all rows). Measured
#: (bench/decode_compile.py, SmolLM2 int4, shared 2-core EPYC): 74 s of compile with warm Inductor caches
#: (541 s cold), then 1.22x per step: break-even after ~1,700 tokens
AUTO_COMPILE_MIN_TOKENS = int(os.environ.get("LMFORGE_AUTO_COMPILE_MIN_TOKENS", "4096"))
CACHE_ROUND = 64


def prepare_for_decoding(model: nn.Module, dtype: str = "fp32", group_size: int = 32) -> nn.Module:
    """Rewrite ``model``'s Linear layers for fast decoding (in place; returns the model). ``auto``: fp32 or
    bf16, whichever batch-1 matrix-vector products run faster on this machine (measured once, cached).

    ``group_size`` applies to ``int4`` (inputs per scale/zero pair: 32, 64, 128 or 256). A model that is
    already prepared (e.g. loaded from a GGUF file straight into a layout) is returned as it is when the
    dtype matches; asking for another layout is an error (the original weights are gone)."""
    from ..models.quant import INT4_GROUP_SIZES

    if dtype not in DECODE_CHOICES:
        raise LMForgeError(f"unknown decoding dtype {dtype!r}; choose {', '.join(DECODE_CHOICES)}")
    if dtype == "auto":  # measured on this machine (utils.resolve_dtype), unless the model is already laid out
        first = next(model.parameters(), None)
        device = first.device if first is not None else torch.device("cpu")
        dtype = model.decode_dtype or resolve_dtype("auto", "decode", device)
    if dtype == "int4" and group_size not in INT4_GROUP_SIZES:
        raise LMForgeError(f"int4 group size {group_size} is not supported; choose "
                           f"{', '.join(map(str, INT4_GROUP_SIZES))}")
    current = model.decode_dtype
    if current is not None:
        if current != dtype:
            raise LMForgeError(f"this model is already laid out as {current}; load it again to use {dtype}")
        return model
    model.eval()
    for parent in list(model.modules()):  # quantize/transpose from the original (fp32) weights
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear):
                setattr(parent, name, QuantLinear.from_weight(child.weight, child.bias, dtype, group_size))
    finish_decoding_layout(model, dtype)
    return model


# --- the fixed-shape decode step ----------------------------------------------------------------

def _decode_step(model: Any, cache: Any, tok: torch.Tensor, pos: torch.Tensor, seen: torch.Tensor | None,
                 noise: torch.Tensor | None, temperature: float, top_k: int | None, top_p: float | None,
                 repetition_penalty: float) -> torch.Tensor:
    """One fixed-shape step: feed ``tok`` (B,) at position ``pos`` (1,), return the next tokens (B,)."""
    cache.set_positions(pos)
    logits, _ = model.forward_logits(tok[:, None], cache)
    return pick_tokens(logits[:, -1], seen, noise, temperature, top_k, top_p, repetition_penalty)


_COMPILED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> its compiled step


def compiled_step(model: Any) -> Any:
    """The model's compiled decode step (created once per model; Dynamo keeps one graph per shape)."""
    fn = _COMPILED.get(model)
    if fn is None:
        import torch._dynamo  # noqa: F401  (heavy: imported only when compiling)

        fn = torch.compile(_decode_step, dynamic=False, fullgraph=True)
        _COMPILED[model] = fn
    return fn


def compile_available() -> bool:
    """Inductor's CPU backend writes C++ and needs a compiler."""
    import shutil

    return any(shutil.which(c) for c in ("g++", "c++", "clang++"))


def should_compile(model: Any, tokens: int, mode: str) -> bool:
    """``on``/``off`` decide; ``auto`` compiles when the model supports fixed-shape steps, a C++ compiler
    is there, and either this model already has a compiled step or the generation decodes at least
    AUTO_COMPILE_MIN_TOKENS tokens (below that the compile costs more than it saves)."""
    if mode not in COMPILE_CHOICES:
        raise LMForgeError(f"unknown compile mode {mode!r}; choose {', '.join(COMPILE_CHOICES)}")
    if mode == "off" or not model.supports_static_state:
        return False
    if mode == "on":
        return True
    return compile_available() and (model in _COMPILED or tokens >= AUTO_COMPILE_MIN_TOKENS)


class StaticDecoder:
    """Decoding of ``batch`` rows with a StaticKVCache of ``max_length`` (rounded up) positions: the
    prompt is prefilled eagerly, then every step is the same fixed-shape function, compiled or not
    (the same tokens either way)."""

    def __init__(self, model: Any, batch: int, max_length: int, cfg: Any, compile: bool,
                 generator: torch.Generator | None = None) -> None:
        ctx = model.context_length
        length = -(-max_length // CACHE_ROUND) * CACHE_ROUND
        self.length = min(length, ctx) if ctx else length
        self.model, self.cfg, self.generator = model, cfg, generator
        self.cache = model.init_state(batch, self.length, static=True)
        self.device = self.cache.k.device
        V = model.vocab_size
        self.seen = torch.zeros(batch, V, dtype=torch.bool, device=self.device) \
            if cfg.repetition_penalty != 1.0 else None
        self.noise = torch.empty(batch, V, device=self.device) if cfg.temperature != 0 else None
        self.pos = torch.zeros(1, dtype=torch.long, device=self.device)
        self.filled = 0
        self.step_fn = compiled_step(model) if compile else _decode_step

    def _knobs(self) -> tuple:
        c = self.cfg
        return c.temperature, c.top_k, c.top_p, c.repetition_penalty

    def _draw(self) -> None:
        if self.noise is not None:
            self.noise.exponential_(generator=self.generator)

    @torch.no_grad()  # inference only, also when called directly (a bf16 model under grad attends in fp32)
    def prefill(self, seqs: torch.Tensor) -> torch.Tensor:
        """Feed the prompt (B, P); return the first new tokens (B,)."""
        P = seqs.shape[1]
        if self.seen is not None:
            self.seen.scatter_(1, seqs, True)
        self.cache.set_positions(torch.arange(P, device=self.device))
        logits, _ = self.model.forward_logits(seqs, self.cache, last_only=True)
        self.filled = P
        self.cache.set_positions(self.pos)  # back to one position per step before any compiled step
        self._draw()
        nxt = pick_tokens(logits[:, -1], self.seen, self.noise, *self._knobs())
        self._mark(nxt)
        return nxt

    def _mark(self, tok: torch.Tensor) -> None:
        if self.seen is not None:
            self.seen.scatter_(1, tok[:, None], True)

    @torch.no_grad()  # inference only, also when called directly (a bf16 model under grad attends in fp32)
    def step(self, tok: torch.Tensor) -> torch.Tensor:
        """Feed ``tok`` (B,) at the next position; return the following tokens (B,)."""
        if self.filled >= self.length:
            raise ValueError(f"static KV cache full ({self.length} positions)")
        self.pos.fill_(self.filled)
        self._draw()
        nxt = self.step_fn(self.model, self.cache, tok, self.pos, self.seen, self.noise, *self._knobs())
        self.filled += 1
        self._mark(nxt)
        return nxt
