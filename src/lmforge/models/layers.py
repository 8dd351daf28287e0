"""Transformer building blocks shared by the decoder-only GPT and the encoder-decoder models.

The math, as in the textbooks:

* scaled dot-product attention   Attention(Q, K, V) = softmax(Q K^T / sqrt(d_k) + M) V
  (M = 0 where a query may look, -inf where it may not: the causal mask for a decoder);
* multi-head attention           MultiHead(X) = Concat(head_1..head_h) W^O,
                                 head_i = Attention(X W^Q_i, X W^K_i, X W^V_i)
  (grouped-query attention shares each K/V head between n_head / n_kv_head query heads);
* position information           learned embeddings, fixed sinusoids (Vaswani et al. 2017), or
                                 rotary embeddings (RoPE, Su et al. 2021) that rotate Q and K;
* position-wise MLP              GELU(x W_1) W_2, or SwiGLU: (SiLU(x W_g) * x W_u) W_d;
* pre-norm residual block        x + Attn(Norm(x)), then x + MLP(Norm(x)), LayerNorm or RMSNorm.

The fast path uses ``F.scaled_dot_product_attention`` (fused kernels), and for training passes over short
windows lmforge's own causal-attention kernel (``kernels.causal_attention``); :func:`attention_reference`
spells the formula out and the tests check that the two agree. For looking inside a model
(``lmforge inspect``), :func:`record_attention` switches the attention modules to an opt-in exact path
that computes the weights softmax(Q K^T / sqrt(d_k) + M) explicitly and keeps them; training and
decoding never take it.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import kernels
from ..utils import zeros

#: training passes of at most this many positions take lmforge's causal-attention kernel instead of PyTorch's
#: flash kernel (CausalSelfAttention._own_kernel); 0 turns it off (how bench/train_throughput.py measures both)
CAUSAL_KERNEL_MAX_T = 512

#: chunks after a cached prefix of at most this many tokens attend row by row, bit for bit as one-token steps
#: (speculative decoding verifies at most this many rows per pass; see CausalSelfAttention._attend)
EXACT_CHUNK = 16


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * g   (Zhang & Sennrich 2019; no mean subtraction, no bias).

    When a gradient flows on the CPU, lmforge's kernels (``rms_norm`` and ``rms_norm_backward``, lmforge/kernels)
    compute it: autograd through ``F.rms_norm`` runs six ops forward and a dozen backward."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad) and x.dtype == self.weight.dtype \
                and _kernel_ok(x):
            return torch.ops.lmforge.rms_norm(x.contiguous(), self.weight, self.eps)
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


def _kernel_ok(x: torch.Tensor, in_compiled_graphs: bool = False) -> bool:
    """Whether a training step's op on x can take lmforge's kernel with its backward: fp32 or bf16, and
    ``kernels.usable`` (the CPU, built; eager unless ``in_compiled_graphs``)."""
    return x.dtype in (torch.float32, torch.bfloat16) and kernels.usable(x.device, in_compiled_graphs)


class LayerNorm(nn.Module):
    """LayerNorm with an optional bias (PyTorch's always has one; GPT-2 uses it, many newer models don't)."""

    def __init__(self, dim: int, bias: bool = True, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, self.eps)


def init_weights(m: nn.Module) -> None:
    """GPT-2's initialisation: N(0, 0.02) for Linear and Embedding weights, zero biases."""
    if isinstance(m, nn.Linear):
        nn.init.normal_(m.weight, mean=0.0, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.Embedding):
        nn.init.normal_(m.weight, mean=0.0, std=0.02)


def decay_param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: weight decay on matrices (embeddings, Linear weights) only, not on norms and biases."""
    decay, no_decay = [], []
    seen: set[int] = set()
    for p in model.parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (decay if p.dim() >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_norm(kind: str, dim: int, bias: bool, eps: float) -> nn.Module:
    if kind == "rmsnorm":
        return RMSNorm(dim, eps)
    if kind == "layernorm":
        return LayerNorm(dim, bias, eps)
    raise ValueError(f"unknown norm {kind!r}; choose layernorm or rmsnorm")


def sinusoidal_table(length: int, dim: int, base: float = 10000.0) -> torch.Tensor:
    """PE[pos, 2i] = sin(pos / base^(2i/d)),  PE[pos, 2i+1] = cos(pos / base^(2i/d))."""
    pos = torch.arange(length, dtype=torch.float32)[:, None]
    inv = torch.exp(-math.log(base) * torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    pe = torch.zeros(length, dim)
    pe[:, 0::2] = torch.sin(pos * inv)
    pe[:, 1::2] = torch.cos(pos * inv)[:, : dim // 2]
    return pe


def rope_tables(length: int, head_dim: int, theta: float = 10000.0,
                scaling: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables of shape (length, head_dim) for rotary embeddings.

    Frequencies theta^(-2i/d) for i < d/2 (the "rotate-half" layout used by Llama and Hugging Face).
    ``scaling`` supports {"type": "linear", "factor": f} (positions divided by f).
    """
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    pos = torch.arange(length, dtype=torch.float64)
    if scaling and scaling.get("type") == "linear":
        pos = pos / float(scaling["factor"])
    freqs = torch.outer(pos, inv_freq)
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos().float(), emb.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x_i, x_{i+d/2}) by the position's angle: x*cos + rotate_half(x)*sin."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


def attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        mask: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(Q K^T / sqrt(d_k)) V, written out. ``mask`` is True where attention is allowed."""
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return torch.softmax(scores, dim=-1) @ v


def attention_weights(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """A = softmax(Q K^T / sqrt(d_k)) with -inf where ``mask`` is False: (B, H, T, S), rows sum to 1.
    Computed in fp32 whatever the inputs' dtype (the weights are for looking at, not for speed)."""
    scores = q.float() @ k.float().transpose(-2, -1) / math.sqrt(q.shape[-1])
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return torch.softmax(scores, dim=-1)


class RecordsAttention:
    """Mixin of the attention modules: with ``record`` set (see :func:`record_attention`), forward takes
    the exact path and keeps the weights of its last call in ``weights`` (B, H, T, S)."""

    record: bool = False
    weights: torch.Tensor | None = None

    def _exact(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        if k.shape[1] != q.shape[1]:  # grouped-query attention: each K/V head serves n_head / n_kv_head queries
            k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
            v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
        self.weights = attention_weights(q, k, mask)
        return (self.weights @ v.float()).to(q.dtype)


@contextmanager
def record_attention(model: nn.Module) -> Iterator[list[RecordsAttention]]:
    """Within the block, every attention module of ``model`` takes the exact path and records its weights;
    yields the modules in registration order (a decoder block's self-attention before its cross-attention)."""
    mods = [m for m in model.modules() if isinstance(m, RecordsAttention)]
    for m in mods:
        m.record, m.weights = True, None
    try:
        yield mods
    finally:
        for m in mods:
            m.record = False


@contextmanager
def record_residual_stream(blocks: nn.ModuleList) -> Iterator[list[torch.Tensor]]:
    """Within the block, the list yielded fills with the residual stream of a stack of blocks: the first
    block's input, then every block's output (forward hooks: the model's code is unchanged)."""
    out: list[torch.Tensor] = []
    hooks = [blocks[0].register_forward_pre_hook(lambda m, args: out.append(args[0].detach()))]
    hooks += [b.register_forward_hook(lambda m, args, y: out.append(y.detach())) for b in blocks]
    try:
        yield out
    finally:
        for h in hooks:
            h.remove()


class KVCache:
    """A pre-allocated (static) key/value cache for incremental decoding.

    Keys and values of every layer live in two tensors of shape
    (n_layer, batch, n_kv_head, max_length, head_dim) that are written in place, so decoding a
    token allocates nothing and never concatenates. ``pos`` is how many positions are filled.
    """

    #: True for StaticKVCache (tensor positions, fixed shapes for torch.compile)
    static = False

    def __init__(self, n_layer: int, batch: int, n_kv_head: int, max_length: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> None:
        shape = (n_layer, batch, n_kv_head, max_length, head_dim)
        self.k = zeros(shape, dtype, device)  # on huge pages where it is large (a step reads all of it)
        self.v = zeros(shape, dtype, device)
        self.pos = 0
        self.max_length = max_length

    @property
    def batch_size(self) -> int:
        return self.k.shape[1]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store new keys/values at [pos, pos+T) and return the filled prefix [0, pos+T)."""
        t = k.shape[2]
        end = self.pos + t
        if end > self.max_length:
            raise ValueError(f"KV cache overflow: {end} > {self.max_length}")
        self.k[layer, :, :, self.pos:end] = k
        self.v[layer, :, :, self.pos:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def advance(self, T: int) -> None:
        self.pos += T

    def select(self, index: torch.Tensor) -> KVCache:
        """Keep/reorder batch rows (beam search)."""
        self.k = self.k.index_select(1, index)
        self.v = self.v.index_select(1, index)
        return self


class StaticKVCache(KVCache):
    """A KV cache whose every decoding step has the same shapes, for ``torch.compile`` (gpt-fast's design).

    Positions are a tensor, not a Python int: the caller writes them with :meth:`set_positions`, keys and
    values go in with ``index_copy_`` at those positions, and attention always spans the whole buffer
    under a mask (key j visible to a query at position p iff j <= p, and p - j < window with a sliding
    window). Nothing is reallocated and no shape depends on how far decoding has got, so one captured
    graph serves every step; the positions past the end hold stale or zero entries that the mask hides.
    """

    static = True

    def __init__(self, n_layer: int, batch: int, n_kv_head: int, max_length: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                 sliding_window: int | None = None) -> None:
        super().__init__(n_layer, batch, n_kv_head, max_length, head_dim, dtype, device)
        self.window = sliding_window
        self.key_pos = torch.arange(max_length, device=device)
        self.positions = torch.zeros(1, dtype=torch.long, device=device)          # (T,)
        self.mask = torch.zeros(1, max_length, dtype=torch.bool, device=device)    # (T, max_length)

    def set_positions(self, positions: torch.Tensor) -> None:
        """Positions (T,) of the next tokens fed; written in place when T is unchanged."""
        if positions.shape != self.positions.shape:
            self.positions = positions.clone()
            self.mask = torch.zeros(positions.shape[0], self.max_length, dtype=torch.bool,
                                    device=self.mask.device)
        else:
            self.positions.copy_(positions)
        p, j = self.positions[:, None], self.key_pos[None, :]
        visible = j <= p
        if self.window is not None:
            visible &= j > p - self.window
        self.mask.copy_(visible)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.k[layer].index_copy_(2, self.positions, k)
        self.v[layer].index_copy_(2, self.positions, v)
        return self.k[layer], self.v[layer]

    def advance(self, T: int) -> None:
        """Nothing: the caller writes the next positions (set_positions)."""


class SlotKVCache:
    """A key/value cache for continuous batching: ``slots`` rows, each holding ONE sequence at its own length.

    Keys/values live in (n_layer, slots, n_kv_head, max_length, head_dim) tensors, like :class:`KVCache`, but
    ``lengths[s]`` counts the filled positions of slot ``s`` separately, so sequences that started at different
    times decode together: a forward over rows ``rows`` writes row b's T new keys at positions
    ``lengths[b] .. lengths[b] + T - 1`` and lets its queries see keys ``j <= lengths[b] + t`` only (a per-row
    causal mask over the longest row's prefix; shorter rows' stale keys beyond their length are masked out).

    The decoding engine (generation/engine.py) calls :meth:`select` before each forward: the slots of new
    prompts to prefill together (right-padded to the longest; ``valid`` says how many tokens of each row are
    real: padding lands beyond the row's length, where causal masking hides it from the real tokens and the
    next tokens overwrite it), or the prefix ``0 .. n`` of slots to decode one token for each in one pass.
    """

    def __init__(self, n_layer: int, slots: int, n_kv_head: int, max_length: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> None:
        shape = (n_layer, slots, n_kv_head, max_length, head_dim)
        self.k = zeros(shape, dtype, device)  # zeros: masked keys must be finite
        self.v = zeros(shape, dtype, device)
        self.lengths = torch.zeros(slots, dtype=torch.long)
        self.max_length = max_length
        self.rows: slice | torch.Tensor = slice(0, slots)
        self.valid: torch.Tensor | None = None
        self._pos: torch.Tensor | None = None
        self._mask: torch.Tensor | None = None

    @property
    def slots(self) -> int:
        return self.k.shape[1]

    def select(self, rows: slice | torch.Tensor, valid: torch.Tensor | None = None) -> None:
        """The rows (a slice: a view; a tensor of slot indices: a copy) the next forward reads and writes, and,
        for right-padded prompts, the number of real tokens in each row (None: all of them)."""
        self.rows, self.valid = rows, valid

    def take_last(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, C) -> (B, 1, C): each row's last real position (``last_only``)."""
        if self.valid is None:
            return x[:, -1:]
        return x[torch.arange(x.shape[0], device=x.device), self.valid.to(x.device) - 1][:, None]

    def begin(self, T: int, sliding_window: int | None = None) -> torch.Tensor:
        """Positions (B, T) of the next forward's tokens, row by row; prepares the attention mask."""
        start = self.lengths[self.rows]                                      # (B,)
        pos = start[:, None] + torch.arange(T)                               # (B, T)
        end = int(pos.max()) + 1 if pos.numel() else 0
        if end > self.max_length:
            raise ValueError(f"KV cache overflow: {end} > {self.max_length}")
        kpos = torch.arange(end)
        mask = kpos[None, None, :] <= pos[:, :, None]                        # (B, T, L): causal, per row
        if sliding_window is not None:
            mask &= kpos[None, None, :] > pos[:, :, None] - sliding_window
        device = self.k.device
        self._pos, self._mask = pos.to(device), mask[:, None].to(device)    # mask (B, 1, T, L) over heads
        return self._pos

    @property
    def positions(self) -> torch.Tensor:
        """(B, T) positions of the current forward's tokens (after :meth:`begin`)."""
        assert self._pos is not None, "call begin() first"
        return self._pos

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Write (B, H, T, hd) keys/values at each row's own positions; return the rows' keys, values and mask."""
        assert self._pos is not None and self._mask is not None, "call begin() first"
        rows = (torch.arange(self.rows.start, self.rows.stop) if isinstance(self.rows, slice)
                else self.rows)[:, None].to(self.k.device)                             # (B, 1)
        self.k[layer, rows, :, self._pos] = k.transpose(1, 2)  # advanced indices first: (B, T, H, hd)
        self.v[layer, rows, :, self._pos] = v.transpose(1, 2)
        L = self._mask.shape[-1]
        return self.k[layer, self.rows, :, :L], self.v[layer, self.rows, :, :L], self._mask

    def advance(self, T: int) -> None:
        self.lengths[self.rows] += T if self.valid is None else self.valid
        self._pos = self._mask = None


#: keys per thread from which one bf16 query per head (no grouped heads) attends by three fp32 ops instead of the
#: fused kernel (CausalSelfAttention._one_query): the kernel spreads heads over threads, the small ops do not
ONE_QUERY_KEYS_PER_THREAD = 64


@torch.compiler.assume_constant_result  # a compiled decode step reads it once, as a constant
def one_query_min_keys() -> int:
    return ONE_QUERY_KEYS_PER_THREAD * torch.get_num_threads()


def one_query_fp32(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   mask: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(q k^T / sqrt(D)) v for one query per row by three small fp32 ops, rounded once to q's dtype.
    q (B, H, 1, D); k, v (B, H_kv, S, D), H a multiple of H_kv (query heads h share key/value head h // G);
    ``mask`` broadcastable to (B, 1, 1, S), True where a key is visible."""
    B, H, _, D = q.shape
    Hkv = k.shape[1]
    qg = q.reshape(B, Hkv, H // Hkv, D).float()                  # (B, H_kv, G, D)
    att = (qg @ k.float().transpose(-1, -2)) * D ** -0.5         # (B, H_kv, G, S): scores in fp32
    if mask is not None:
        att = att.masked_fill(~mask, float("-inf"))
    return (att.softmax(dim=-1) @ v.float()).to(q.dtype).reshape(B, H, 1, D)


class CausalSelfAttention(nn.Module, RecordsAttention):
    """Multi-head (optionally grouped-query) self-attention with an optional KV cache.

    Causal (a decoder: position t sees positions <= t) unless ``causal=False`` (an encoder, which
    sees the whole sequence; ``attn_mask`` then hides padding keys)."""

    def __init__(self, d_model: int, n_head: int, n_kv_head: int | None = None, bias: bool = False,
                 qkv_bias: bool | None = None, dropout: float = 0.0, layer_idx: int = 0, causal: bool = True,
                 sliding_window: int | None = None, qk_norm: bool = False) -> None:
        super().__init__()
        self.causal = causal
        self.sliding_window = sliding_window
        n_kv_head = n_kv_head or n_head
        assert d_model % n_head == 0 and n_head % n_kv_head == 0
        self.n_head, self.n_kv_head, self.head_dim = n_head, n_kv_head, d_model // n_head
        self.layer_idx = layer_idx
        qkv_bias = bias if qkv_bias is None else qkv_bias
        # W^Q, W^K, W^V fused in one matmul: output is [Q | K | V].
        self.qkv = nn.Linear(d_model, (n_head + 2 * n_kv_head) * self.head_dim, bias=qkv_bias)
        self.proj = nn.Linear(d_model, d_model, bias=bias)  # W^O
        # QK-norm (Dehghani et al. 2023; OLMo 2, Qwen3): RMSNorm over each head's query and key bounds the
        # attention logits, which lets a small model take a higher learning rate without loss spikes.
        self.q_norm = RMSNorm(self.head_dim) if qk_norm else None
        self.k_norm = RMSNorm(self.head_dim) if qk_norm else None
        self.dropout = dropout
        self.resid_dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None = None,
                cache: KVCache | SlotKVCache | None = None, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        B, T, C = x.shape
        hd = self.head_dim
        q, k, v = self.qkv(x).split([self.n_head * hd, self.n_kv_head * hd, self.n_kv_head * hd], dim=-1)
        q = q.view(B, T, self.n_head, hd).transpose(1, 2)  # (B, H, T, hd)
        k = k.view(B, T, self.n_kv_head, hd).transpose(1, 2)
        v = v.view(B, T, self.n_kv_head, hd).transpose(1, 2)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        out_dtype = q.dtype
        if (cache is None and attn_mask is None and (rope is None or rope[0].dim() == 2)
                and self._own_kernel(q, T)):
            # a training pass over a short window: lmforge's kernel, RoPE included, fp32 or bf16 in and out
            # (fp32 inside)
            y = kernels.causal_attention(q, k, v, rope)
        elif out_dtype == torch.bfloat16 and q.device.type == "cpu" and torch.is_grad_enabled():
            # PyTorch's CPU flash-attention backward is about 4x slower in bf16 than in fp32 (1.05 vs
            # 4.3 ms for nanoGPT's CPU shape), and RoPE on mixed bf16/fp32 operands is slow too, so
            # under bf16 autocast training, RoPE and attention run in fp32 (autocast, which would
            # cast attention back to bf16, is disabled here); the matmuls around them stay bf16.
            with torch.autocast("cpu", enabled=False):
                y = self._attend(q.float(), k.float(), v.float(), rope, cache, T, attn_mask)
        else:
            y = self._attend(q, k, v, rope, cache, T, attn_mask)
        y = y.to(out_dtype).transpose(1, 2).reshape(B, T, C)  # concatenate heads
        return self.resid_dropout(self.proj(y))

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                rope: tuple[torch.Tensor, torch.Tensor] | None, cache: KVCache | SlotKVCache | None, T: int,
                attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        gqa = self.n_kv_head != self.n_head
        if isinstance(cache, SlotKVCache):  # continuous batching: every row at its own position
            k, v, mask = cache.update(self.layer_idx, k, v)
            if T == 1:  # a decoding step of every active slot
                return self._one_query(q, k, v, 0.0, mask)
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        past = 0
        if cache is not None and cache.static:  # fixed shapes: the whole buffer under the cache's mask
            k, v = cache.update(self.layer_idx, k, v)
            if T == 1:
                return self._one_query(q, k, v, 0.0, cache.mask)
            return F.scaled_dot_product_attention(q, k, v, attn_mask=cache.mask, enable_gqa=gqa)
        if cache is not None:
            past = cache.pos
            k, v = cache.update(self.layer_idx, k, v)
        if self.record:
            return self._exact(q, k, v, self._mask(past, T, q.device, attn_mask))
        p = self.dropout if self.training else 0.0
        if not self.causal:  # an encoder: every position sees every (non-padding) position
            return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=p, enable_gqa=gqa)
        if attn_mask is not None:  # a caller's own causal mask (packed examples: block-diagonal)
            return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=p, enable_gqa=gqa)
        W = self.sliding_window
        if W is not None and past + T > W:
            # sliding-window attention (Mistral): query at position i sees keys j with i - W < j <= i
            qpos = torch.arange(past, past + T, device=q.device)[:, None]
            kpos = torch.arange(past + T, device=q.device)[None, :]
            mask = (kpos <= qpos) & (kpos > qpos - W)
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p, enable_gqa=gqa)
        if past == 0 and attn_mask is None and self._own_kernel(q, T):
            y = kernels.causal_attention(q, k, v)
        elif past == 0:
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=T > 1, enable_gqa=gqa)
        elif T == 1:  # one new token attends to every cached position
            y = self._one_query(q, k, v, p)
        elif T <= EXACT_CHUNK and p == 0.0:
            # a short chunk after a cached prefix (speculative decoding's verify pass): each query row exactly
            # as a one-token step computes it (one fused masked call rounds differently in the last bits,
            # enough to flip a near-tie between two tokens), so verifying reproduces plain decoding
            y = torch.cat([self._one_query(q[:, :, i:i + 1], k[:, :, :past + i + 1], v[:, :, :past + i + 1], p)
                           for i in range(T)], dim=2)
        else:  # a chunk after a cached prefix: query i sees keys j <= past + i
            mask = torch.ones(T, past + T, dtype=torch.bool, device=q.device).tril(diagonal=past)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p, enable_gqa=gqa)
        return y

    def _own_kernel(self, q: torch.Tensor, T: int) -> bool:
        """Whether this pass takes lmforge's causal-attention kernel (kernels/train_ops.cpp) instead of PyTorch's
        flash kernel: a causal training pass (gradients on) on the CPU, fp32 or bf16, without attention dropout,
        a sliding window that binds or recorded weights, over at most CAUSAL_KERNEL_MAX_T positions, where it is
        the faster (docs/training.md)."""
        p = self.dropout if self.training else 0.0
        return (1 < T <= CAUSAL_KERNEL_MAX_T and p == 0.0 and self.causal and not self.record
                and (self.sliding_window is None or T <= self.sliding_window)
                and q.shape[-1] in kernels.CAUSAL_HEAD_DIMS and torch.is_grad_enabled()
                and _kernel_ok(q, in_compiled_graphs=True))

    def _one_query(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, p: float,
                   mask: torch.Tensor | None = None) -> torch.Tensor:
        """One query per row over the keys (``mask``: the cache's visible positions, (1, S) or (B, 1, 1, S)):
        the decoding step, and each verify row identically.

        In bf16/fp16 with grouped-query heads the G = n_head / n_kv_head query heads that share a key/value
        head are folded into the query axis, (B, H, 1, D) -> (B, H_kv, G, D): one call of PyTorch's fused
        CPU kernel then reads each key/value head once for G queries, instead of ``enable_gqa``'s path, which
        costs 4-7x more for one bf16 query (SmolLM2's 9 heads over 144 keys, one thread of an AMD EPYC: 31
        vs 139 us at batch 1, 196 vs 1084 us at batch 8). The kernel computes in fp32 and rounds once to bf16
        either way; the folded call rounds ~1 output element in 10,000 to the neighbouring bf16 value (the
        same accuracy against an fp64 reference; tests/test_fast_decoding.py). fp32 keeps the unfolded call:
        there it is as fast.

        Without grouped heads (nothing to fold: GPT-2, lmforge's own GPTs) one bf16 query per head costs the fused
        kernel 2-4x what three small fp32 ops cost (GPT-2's 12 heads, one thread: 82 vs 41 us over 64 keys,
        319 vs 106 over 256, 1316 vs 296 over 1024), so from ONE_QUERY_KEYS_PER_THREAD keys per thread on
        those three ops attend (below, their dispatch costs more than the kernel loses)."""
        B, H, _, D = q.shape
        Hkv = k.shape[1]
        if q.dtype != torch.float32 and Hkv != H:
            y = F.scaled_dot_product_attention(q.reshape(B, Hkv, H // Hkv, D), k, v, attn_mask=mask, dropout_p=p)
            return y.reshape(B, H, 1, D)
        if q.dtype != torch.float32 and p == 0.0 and k.shape[2] >= one_query_min_keys():
            return one_query_fp32(q, k, v, mask)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p, enable_gqa=Hkv != H)

    def _mask(self, past: int, T: int, device: torch.device, attn_mask: torch.Tensor | None) -> torch.Tensor | None:
        """The exact path's mask, True where query i (at position past + i) may look at key j."""
        if not self.causal:
            return attn_mask
        qpos = torch.arange(past, past + T, device=device)[:, None]
        kpos = torch.arange(past + T, device=device)[None, :]
        mask = kpos <= qpos
        if self.sliding_window is not None:
            mask = mask & (kpos > qpos - self.sliding_window)
        return mask


class MLP(nn.Module):
    """Position-wise feed-forward network: GELU (exact, as nanoGPT), GELU with GPT-2's tanh approximation
    (``gelu_tanh``; twice as slow on a CPU, kept for checkpoint parity), ReLU^2 (``relu2``: max(0, x)^2,
    So et al. 2021, Primer; cheaper than GELU and sparse), or SwiGLU (Llama)."""

    def __init__(self, d_model: int, hidden: int, kind: str = "gelu", bias: bool = False,
                 dropout: float = 0.0) -> None:
        super().__init__()
        self.kind = kind
        if kind in ("gelu", "gelu_tanh", "relu2"):
            self.fc = nn.Linear(d_model, hidden, bias=bias)
        elif kind == "swiglu":
            self.fc = nn.Linear(d_model, 2 * hidden, bias=bias)  # [gate | up] fused
        else:
            raise ValueError(f"unknown mlp {kind!r}; choose gelu, gelu_tanh, relu2 or swiglu")
        self.proj = nn.Linear(hidden, d_model, bias=bias)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.proj(self.act(self.fc(x))))

    def act(self, u: torch.Tensor) -> torch.Tensor:
        """The nonlinearity on fc's output u (..., hidden); SwiGLU's u is (..., 2 hidden): [gate | up]."""
        if self.kind == "relu2":
            return F.relu(u).square()
        if self.kind != "swiglu":
            return F.gelu(u, approximate="tanh" if self.kind == "gelu_tanh" else "none")
        if torch.is_grad_enabled() and u.requires_grad and _kernel_ok(u):  # one pass each way (kernels)
            return torch.ops.lmforge.silu_mul(u.contiguous())
        gate, up = u.chunk(2, dim=-1)
        return F.silu(gate) * up


class Block(nn.Module):
    """Pre-norm Transformer block: x + Attn(Norm(x)); x + MLP(Norm(x)). A decoder block (causal
    self-attention) by default; with ``causal=False`` an encoder block."""

    def __init__(self, d_model: int, n_head: int, n_kv_head: int | None, mlp_hidden: int, mlp: str,
                 norm: str, norm_eps: float, bias: bool, qkv_bias: bool | None, dropout: float,
                 layer_idx: int, causal: bool = True, sliding_window: int | None = None,
                 qk_norm: bool = False) -> None:
        super().__init__()
        self.ln_1 = make_norm(norm, d_model, bias, norm_eps)
        self.attn = CausalSelfAttention(d_model, n_head, n_kv_head, bias, qkv_bias, dropout, layer_idx, causal,
                                        sliding_window, qk_norm)
        self.ln_2 = make_norm(norm, d_model, bias, norm_eps)
        self.mlp = MLP(d_model, mlp_hidden, mlp, bias, dropout)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None = None,
                cache: KVCache | SlotKVCache | None = None, attn_mask: torch.Tensor | None = None,
                step: bool = False) -> torch.Tensor:
        if step and not self.attn.record:
            return self._step(x, rope, cache)
        x = x + self.attn(self.ln_1(x), rope, cache, attn_mask)
        return x + self.mlp(self.ln_2(x))

    def _step(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None,
              cache: KVCache | SlotKVCache) -> torch.Tensor:
        """The same block for a few new tokens per row at inference: a decoding step or a speculative verify
        pass over the plain KV cache (after ``cache.pos``), or one decoding step of the continuous-batching
        engine's slots (each row after its own length). Everything between the QKV and output projections --
        RoPE, the cache write, attention over the cached positions -- is one call of lmforge's kernel for the new
        tokens (``attend_rows``, each token exactly as a one-token ``attend_one`` call), which costs less than
        dispatching the ~10 small ops of the general path, and gives every token of a verify pass exactly what a
        one-token step gives it (the norms and SwiGLU are per
        row too), so speculative decoding reproduces plain decoding."""
        a, mlp = self.attn, self.mlp
        B, T, C = x.shape
        qkv = a.qkv(_norm_step(self.ln_1, x))                                 # (B, T, (H + 2 H_kv) D)
        if isinstance(cache, SlotKVCache):  # rows = a slice of slots, each at its own position
            k, v = cache.k[a.layer_idx, cache.rows], cache.v[a.layer_idx, cache.rows]
            start, row_pos = 0, cache.positions[:, 0]                          # (B,)
        else:
            k, v = cache.k[a.layer_idx], cache.v[a.layer_idx]                 # (B, H_kv, L, D)
            start, row_pos = cache.pos, None
        # token i goes in at its position p and sees positions 0 .. p, each token as a one-token call would
        cos, sin = (None, None) if rope is None else rope
        y = torch.ops.lmforge.attend_rows(qkv, k, v, start, row_pos, cos, sin, a.n_head, a.n_kv_head)  # (B, T, H D)
        x = x + a.proj(y)
        u = mlp.fc(_norm_step(self.ln_2, x))
        # SwiGLU: silu(gate) * up in one kernel call; no dropout at inference (as after the attention's proj)
        return x + mlp.proj(torch.ops.lmforge.silu_mul(u) if mlp.kind == "swiglu" else mlp.act(u))


def _norm_step(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A norm in a fused step: RMSNorm by lmforge's kernel (one call; PyTorch's composes six), others as they are."""
    if isinstance(norm, RMSNorm) and norm.weight.dtype == x.dtype:
        return torch.ops.lmforge.rms_norm(x, norm.weight, norm.eps)
    return norm(x)


class CrossAttention(nn.Module, RecordsAttention):
    """Encoder-decoder attention: queries from the decoder, keys and values from the encoder output
    ("memory"), so every target position can look at every source position (Vaswani et al. 2017).

    The memory's keys/values do not change while decoding, so :meth:`memory_kv` computes them once
    per source and decoding steps reuse them (the cross-attention half of the KV cache)."""

    def __init__(self, d_model: int, n_head: int, bias: bool = False, dropout: float = 0.0) -> None:
        super().__init__()
        assert d_model % n_head == 0
        self.n_head, self.head_dim = n_head, d_model // n_head
        self.q = nn.Linear(d_model, d_model, bias=bias)
        self.kv = nn.Linear(d_model, 2 * d_model, bias=bias)  # [K | V] fused
        self.proj = nn.Linear(d_model, d_model, bias=bias)
        self.dropout = dropout
        self.resid_dropout = nn.Dropout(dropout)

    def memory_kv(self, memory: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        B, S, _ = memory.shape
        k, v = self.kv(memory).view(B, S, 2, self.n_head, self.head_dim).permute(2, 0, 3, 1, 4)
        return k, v  # each (B, H, S, hd)

    def forward(self, x: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor],
                mask: torch.Tensor | None = None) -> torch.Tensor:
        """``mask``: (B, 1, 1, S) bool, True for real (non-padding) source positions."""
        B, T, C = x.shape
        q = self.q(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        k, v = kv
        p = self.dropout if self.training else 0.0
        if q.dtype != k.dtype:
            k, v = k.to(q.dtype), v.to(q.dtype)
        if self.record:
            y = self._exact(q, k, v, mask)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
        return self.resid_dropout(self.proj(y.transpose(1, 2).reshape(B, T, C)))
