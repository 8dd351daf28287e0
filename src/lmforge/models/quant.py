"""Linear layers laid out for decoding: fp32, bf16, weight-only int8 and group-wise int4.

Batch-1 decoding reads every weight once per token, so it is bound by memory bandwidth: what counts is
how many bytes each token reads and how fast the kernel streams them. ``QuantLinear`` holds one layout:

* ``fp32``: W in the int8 layout's tiles (below) through lmforge's ``tiled_linear`` where the kernels are built
  (1.3x PyTorch's product at one thread, 1.9x at two); otherwise stored transposed, (in, out), so that
  ``x @ W^T`` streams whole contiguous output rows.
* ``bf16``: W in bf16, half the bytes: in the same tiles through ``tiled_linear`` (2.25x PyTorch's bf16 product at
  one row), or on the usual (out, in) layout (``F.linear``) without the kernels.
* ``int8``: ``w[o, i] ~ s[o] * q[o, i]``, one scale per output channel, q in [-127, 127], through PyTorch's
  ``_weight_int8pack_mm``: a quarter of fp32's bytes (layers whose input width is not a multiple of 16
  fall back to bf16: the kernel crashes on them).
* ``int4``: group-wise asymmetric 4-bit, ``w[o, i] ~ (q[o, i] - 8) * s[o, g] + z[o, g]`` with q in [0, 15]
  and one (scale, zero) pair per group of ``group_size`` inputs (g = i // group_size), through
  ``_weight_int4pack_mm_for_cpu`` (the weight packed by ``_convert_weight_to_int4pack_for_cpu``): an eighth
  of fp32's bytes plus 4 bytes per group (layers the kernel cannot take fall back to int8). This is
  exactly llama.cpp's Q4_0 (z = 0), Q4_1 (z = m + 8 d) and Q4_K (per 32-weight sub-block) formats, so GGUF
  files load into it without a detour through fp32 (hub/gguf_io.py).

int8 and int4 run on lmforge's own kernels (lmforge/kernels: C++ built for this machine on first use) where they
are available and the shape allows, PyTorch's otherwise (``kernel`` says which). int8 (outputs a multiple of 4,
inputs of 32): q stored tiled -- 4 output channels interleaved in chunks of 32 inputs, so one tile is one
contiguous stream -- with an fp32 scale per row (PyTorch's: q row-major, a bf16 scale); :meth:`QuantLinear.int8_weight`
gives q row-major either way. It streams the weights 2-3x faster than PyTorch's and takes 1-8 rows of
activations for little more than one (a speculative verify pass, a small batch). On CPUs with AVX512-VNNI
(``kernels.int8_vnni()``; inputs a multiple of 64) int8 weights are laid out for integer dot products instead
(:func:`int8_vnni_layout`: q + 128 as uint8, 16 channels x 4 inputs per 64 bytes) and the kernel quantises the
activations per 64 inputs (as llama.cpp does for Q8_0): the same speed at one row, 1.3-2x the rows per second
at 4-170 rows (prompts, verify passes, batches), with every row count on the kernel. int4 (with AVX512-VNNI too:
integer dot products of the 4-bit weights with the activations rounded to int8 per 32 inputs; int4_ops.cpp): 16
output channels per tile, the nibbles of 32 inputs in the order vpdpbusd takes them, fp16 (d, m) per group (``w =
d q + m``, llama.cpp's Q4_1 numbers as the file holds them); 8 rows per pass; 1.1-2x its bf16 predecessor and
more against PyTorch's int4 kernel at 1-170 rows (``bench/int8_rows.py --layout int4``, docs/hub.md). Without
AVX512-VNNI int4 keeps PyTorch's kernel (lmforge's loops were no faster there: docs/hub.md).

The int8/int4 kernels take bf16 activations (with fp32 activations PyTorch 2.13 has no fast CPU path:
~50x slower); the output is bf16, or ``out_dtype`` (an output head's fp32 logits). int8/fp32/bf16 layers whose
output width is no multiple of 4 (a vocabulary) are padded with zero channels and the output trimmed. Layers
live in models/ because both the GGUF loader (hub/) and the decoding preparation (generation/fast.py) build them.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import kernels
from ..utils import huge_page_buffer, resolve_dtype, return_freed_memory

QUANT_MODES = ("fp32", "bf16", "int8", "int4")
INT4_GROUP_SIZES = (32, 64, 128, 256)
#: above this many rows of activations (a long prompt's prefill) an int8 layer dequantises its weight and runs one
#: matrix product (in bf16 where the training probe measures bf16 matmuls faster, else fp32) instead of the
#: row-block kernel. ``python bench/int8_rows.py`` (SmolLM2's 120 int8 matrices, one thread of an AMD EPYC with
#: AVX512-BF16, ms; bf16 GEMM / lmforge's kernel / PyTorch's): 170 rows 239 / 254 / 512; 64: 127 / 94 / 206;
#: 8: 57 / 16.5 / 37.5; 1 row: 56 / 7.1 / 17.9. Without bf16 dot products (the kernel's fp32 body) the kernel
#: and an fp32 GEMM cost about the same at 170 rows.
GEMM_ROWS = 128
#: lmforge's int8 layout: output channels in tiles of INT8_TILE, inputs in chunks of INT8_CHUNK (decode_ops.cpp)
INT8_TILE, INT8_CHUNK = 4, 32
#: the int8 layout for AVX512-VNNI: tiles of VNNI_TILE channels, activations quantised per VNNI_GROUP inputs
VNNI_TILE, VNNI_GROUP = 16, 64
#: lmforge's int4 layout: output channels in tiles of INT4_TILE, inputs in blocks of INT4_BLOCK (int4_ops.cpp)
INT4_TILE, INT4_BLOCK = 16, 32
#: rows of activations PyTorch 2.13's int8/int4 CPU kernels multiply together (their BLOCK_M): a forward of 2-4
#: tokens costs little more than one, the 5th starts a new block (measured for SmolLM2 in docs/hub.md,
#: "Speculative decoding"); speculative decoding sizes its verify passes by :func:`kernel_rows`
KERNEL_ROWS = {"int8": 4, "int4": 4}


def kernel_rows(dtype: str | None) -> int:
    """Rows of activations one pass of a layout's int8/int4 weight kernel takes: lmforge's int8 and int4 kernels 8
    (lmforge/kernels; int8: 8 rows cost ~2.3x one, 4 rows ~1.4x; int4 on AVX512-VNNI: 8 rows ~2.3x, 4 rows ~1.3x,
    bench/int8_rows.py), PyTorch's 4 (KERNEL_ROWS); 1 (no blocks) for fp32/bf16, whose cost grows smoothly with
    the rows."""
    if dtype == "int8" and kernels.available() or dtype == "int4" and kernels.int4_native():
        return 8
    return KERNEL_ROWS.get(dtype or "", 1)


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel int8: returns (q (out, in) int8, scale (out,) fp32)."""
    wf = w.float()
    scale = wf.abs().amax(dim=1).clamp(min=1e-12) / 127.0
    return torch.round(wf / scale[:, None]).clamp(-127, 127).to(torch.int8), scale


def quantize_int4(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric group-wise 4-bit (min/max per group, round to nearest): returns q (out, in) in [0, 15]
    (int32), scale and zero (out, in / group_size) with w ~ (q - 8) * scale + zero."""
    out_f, in_f = w.shape
    g = w.float().reshape(out_f, in_f // group_size, group_size)
    lo, hi = g.amin(-1), g.amax(-1)
    scale = ((hi - lo) / 15).clamp(min=1e-12)
    q = torch.round((g - lo[..., None]) / scale[..., None]).clamp(0, 15)
    return q.reshape(out_f, in_f).to(torch.int32), scale, lo + 8 * scale


def tile_rows(w: torch.Tensor) -> torch.Tensor:
    """A weight (out, in) in lmforge's int8/fp32 layout (decode_ops.cpp): (out / 4, in / 32, 4, 32) -- tile, chunk,
    channel in the tile, input -- stored as (out, in), so that a pass over a tile is one contiguous stream; out is
    padded with zero rows to a whole number of tiles."""
    N, K = w.shape
    w = F.pad(w, (0, 0, 0, -N % INT8_TILE))
    N = w.shape[0]
    return w.reshape(N // INT8_TILE, INT8_TILE, K // INT8_CHUNK, INT8_CHUNK).transpose(1, 2).reshape(N, K).contiguous()


def int8_vnni_layout(q: torch.Tensor) -> torch.Tensor:
    """q (out, in) int8 -> lmforge's int8 layout for AVX512-VNNI (decode_ops.cpp): u = q + 128 as uint8 (vpdpbusd's
    unsigned operand), (out / 16, in / 4, 16, 4) -- tile, four inputs, channel, input -- stored as (out, in), out
    padded with zero weights (u = 128) to whole tiles."""
    N, K = q.shape
    u = (F.pad(q.to(torch.int16), (0, 0, 0, -N % VNNI_TILE)) + 128).to(torch.uint8)
    N = u.shape[0]
    return u.view(N // VNNI_TILE, VNNI_TILE, K // 4, 4).transpose(1, 2).reshape(N, K).contiguous()


def int4_layout(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """q (out, in) in [0, 15] and scale/zero (out, groups) with w = (q - 8) * scale + zero -> lmforge's int4 layout
    (int4_ops.cpp): the nibbles, (out, in / 2) bytes in tiles of 16 channels and blocks of 32 inputs, each block 4
    loads of 64 bytes where byte (4 c + j) of load i holds q[c][4 i + j] (low nibble) and q[c][16 + 4 i + j] (high
    nibble) -- one 32-bit lane per channel c of the tile, 4 consecutive inputs in it, as AVX512-VNNI's vpdpbusd
    takes them; the pairs (k, k + 16) are GGUF's Q4_0/Q4_1 nibble pairs -- and fp16 (out / 16, groups, 2, 16) =
    [d, m] with w = d q + m."""
    N, K = q.shape
    v = q.to(torch.uint8).view(N // INT4_TILE, INT4_TILE, K // INT4_BLOCK, 2, 4, 4)  # tile, c, block, nib, i, j
    v = v.permute(0, 2, 4, 1, 5, 3)                                                  # tile, block, i, c, j, nib
    packed = (v[..., 0] | (v[..., 1] << 4)).contiguous().view(N, K // 2)
    d, m = scale.float(), zero.float() - 8 * scale.float()
    G = d.shape[1]
    dm = torch.stack([d.view(N // INT4_TILE, INT4_TILE, G), m.view(N // INT4_TILE, INT4_TILE, G)], dim=1)
    return packed, dm.permute(0, 3, 1, 2).contiguous().half()                       # (N / 16, G, [d, m], 16)


def int4_unpack(packed: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`int4_layout`'s nibble order: q (out, in) in [0, 15] (uint8) from the packed bytes."""
    N, K = packed.shape[0], packed.shape[1] * 2
    v = packed.view(N // INT4_TILE, K // INT4_BLOCK, 4, INT4_TILE, 4)              # tile, block, i, c, j
    v = torch.stack([v & 15, v >> 4], dim=-1)                                       # ..., nib
    return v.permute(0, 3, 1, 5, 2, 4).reshape(N, K)                                 # tile, c, block, nib, i, j


def int4_supported(out_features: int, in_features: int, group_size: int) -> bool:
    """The packed int4 kernel needs whole groups along the input and outputs in multiples of 16."""
    return in_features % group_size == 0 and out_features % 16 == 0 and in_features >= group_size


class QuantLinear(nn.Module):
    """y = x W^T + b with W in one decoding layout (see the module docstring); inference only."""

    def __init__(self, mode: str, out_features: int, in_features: int, group_size: int = 0) -> None:
        super().__init__()
        if mode not in QUANT_MODES:
            raise ValueError(f"unknown layout {mode!r}; choose {', '.join(QUANT_MODES)}")
        self.mode, self.out_features, self.in_features, self.group_size = mode, out_features, in_features, group_size
        # int8/fp32: outputs that are no multiple of the tile are padded with zero channels (a vocabulary's 50257)
        self.kernel = "lmforge" if (mode in ("int8", "fp32", "bf16") and in_features % INT8_CHUNK == 0
                                    and kernels.available()
                                    or mode == "int4" and out_features % INT4_TILE == 0 and group_size % INT4_BLOCK == 0
                                    and kernels.int4_native()) else "torch"
        self.bias: torch.Tensor | None
        self.register_buffer("bias", None)

    # --- constructors ------------------------------------------------------------------------------
    @classmethod
    def from_weight(cls, w: torch.Tensor, bias: torch.Tensor | None, mode: str, group_size: int = 32) -> QuantLinear:
        """Lay out a float weight (out, in); an int4 layer whose shape the kernel cannot take falls back to int8."""
        w = w.detach()
        out_f, in_f = w.shape
        if mode == "int4" and not int4_supported(out_f, in_f, group_size):
            mode = "int8"
        if mode == "int8" and in_f % 16:  # PyTorch 2.13's int8 kernel crashes (SIGSEGV) on such shapes
            mode = "bf16"
        m = cls(mode, out_f, in_f, group_size if mode == "int4" else 0)
        if mode == "int8":
            q, scale = quantize_int8(w)
            m.set_int8(q, scale)
        elif mode == "int4":
            m.set_int4(*quantize_int4(w, group_size))
        elif m.kernel == "lmforge":  # lmforge's kernel: int8's tiles, in fp32 or bf16
            m.register_buffer("weight_tiles", tile_rows(w.to(torch.float32 if mode == "fp32" else torch.bfloat16)))
        elif mode == "bf16":  # PyTorch's bf16 GEMV is fastest on the (out, in) layout (F.linear)
            m.register_buffer("weight", w.to(torch.bfloat16))
        else:
            m.register_buffer("weight_t", w.float().t().contiguous())
        act = torch.float32 if mode == "fp32" else torch.bfloat16
        m.bias = None if bias is None else bias.detach().to(act)
        return m

    @property
    def vnni(self) -> bool:
        """Whether this int8 layer is laid out for the AVX512-VNNI kernel (a uint8 ``qweight``)."""
        return self.mode == "int8" and self.qweight.dtype == torch.uint8

    @property
    def gemm_rows(self) -> int | None:
        """Above this many rows of activations the layer multiplies by its dequantised weight (GEMM_ROWS for int8
        without VNNI); None: its kernel takes every row count."""
        return GEMM_ROWS if self.mode == "int8" and not self.vnni else None

    @property
    def padded(self) -> bool:
        """Whether the stored weight has zero channels beyond ``out_features`` (outputs are trimmed)."""
        stored = {"int8": "qweight", "fp32": "weight_tiles", "bf16": "weight_tiles"}.get(self.mode)
        return self.kernel == "lmforge" and stored is not None and getattr(self, stored).shape[0] != self.out_features

    def set_int8(self, q: torch.Tensor, scale: torch.Tensor) -> None:
        q = q.to(torch.int8)
        if self.kernel != "lmforge":
            qw = q.contiguous()
        elif self.in_features % VNNI_GROUP == 0 and kernels.int8_vnni():
            qw = int8_vnni_layout(q)
        else:
            qw = tile_rows(q)
        self.register_buffer("qweight", qw)
        if self.kernel == "lmforge":  # the padding channels' scale: 1 (their weights are 0)
            scale = F.pad(scale.float(), (0, qw.shape[0] - scale.numel()), value=1.0)
        self.register_buffer("scale", scale.to(torch.float32 if self.kernel == "lmforge" else torch.bfloat16))

    def int8_weight(self) -> torch.Tensor:
        """q (out, in) row-major, whichever kernel's layout holds it (``w = scale[:, None] * q``)."""
        if self.kernel != "lmforge":
            return self.qweight
        N, K = self.qweight.shape
        if self.vnni:
            u = self.qweight.view(N // VNNI_TILE, K // 4, VNNI_TILE, 4).transpose(1, 2).reshape(N, K)
            return (u.to(torch.int16) - 128).to(torch.int8)[:self.out_features]
        tiles = self.qweight.reshape(N // INT8_TILE, K // INT8_CHUNK, INT8_TILE, INT8_CHUNK)
        return tiles.transpose(1, 2).reshape(N, K)[:self.out_features]

    def set_int4(self, q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> None:
        """q (out, in) in [0, 15]; scale/zero (out, in / group) with w = (q - 8) * scale + zero."""
        if self.kernel == "lmforge":
            packed, dm = int4_layout(q, scale, zero)
            self.register_buffer("qweight", packed)
            self.register_buffer("scales_dm", dm)
            return
        self.register_buffer("qweight", torch._convert_weight_to_int4pack_for_cpu(q.to(torch.int32).contiguous(), 1))
        # the kernel's layout: (groups, out, 2) holding [scale, zero]
        sz = torch.stack([scale.float(), zero.float()], dim=-1).transpose(0, 1).contiguous()
        self.register_buffer("scales_zeros", sz.to(torch.bfloat16))

    #: buffers whose dtype is part of the layout: casting the model (``model.to(torch.bfloat16)``) moves them
    #: to its device but keeps their dtype
    _LAYOUT_DTYPES = ("scale", "scales_dm")

    def _apply(self, fn, recurse=True):  # noqa: ANN001, ANN202  (nn.Module's signature)
        kept = {n: self._buffers[n] for n in self._LAYOUT_DTYPES if self._buffers.get(n) is not None}
        super()._apply(fn, recurse)
        for n, t in kept.items():
            if self._buffers[n].dtype != t.dtype:
                self._buffers[n] = t.to(self._buffers[n].device)
        return self

    @property
    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers())

    def forward(self, x: torch.Tensor, out_dtype: torch.dtype | None = None) -> torch.Tensor:
        """``out_dtype``: the output's dtype (an output head's fp32 logits: lmforge's kernels write their fp32 sums
        unrounded; a bf16 logit near 25 moves in steps of 0.125, enough to tie two tokens)."""
        if self.mode == "bf16" and self.kernel == "torch":
            y = F.linear(x.to(torch.bfloat16), self.weight, self.bias)
            return y if out_dtype is None else y.to(out_dtype)
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if self.gemm_rows is not None and x2.shape[0] > self.gemm_rows:
            dt = torch.bfloat16 if resolve_dtype("auto", "train", announce=False) == "bf16" else torch.float32
            w = self.int8_weight().to(dt) * self.scale[:self.out_features].to(dt)[:, None]  # (out, in)
            y = F.linear(x2.to(dt), w).to(torch.bfloat16)
        elif self.mode == "int8" and self.kernel == "lmforge":
            y = torch.ops.lmforge.int8_linear(x2.to(torch.bfloat16), self.qweight, self.scale, out_dtype)
        elif self.mode == "int8":
            y = torch._weight_int8pack_mm(x2.to(torch.bfloat16), self.qweight, self.scale)
        elif self.mode == "int4" and self.kernel == "lmforge":
            y = torch.ops.lmforge.int4_linear(x2.to(torch.bfloat16), self.qweight, self.scales_dm, self.group_size,
                                              out_dtype)
        elif self.mode == "int4":
            y = torch._weight_int4pack_mm_for_cpu(x2.to(torch.bfloat16), self.qweight, self.group_size,
                                                  self.scales_zeros)
        elif self.kernel == "lmforge":  # fp32 or bf16 tiles
            act = torch.float32 if self.mode == "fp32" else torch.bfloat16
            y = torch.ops.lmforge.tiled_linear(x2.to(act), self.weight_tiles, out_dtype)
        else:
            y = x2.to(torch.float32) @ self.weight_t
        if y.shape[-1] != self.out_features:  # lmforge's padded tiles
            y = y[:, :self.out_features]
        if out_dtype is not None:
            y = y.to(out_dtype)
        if self.bias is not None:
            y = y + self.bias
        return y.view(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        g = f", group_size={self.group_size}" if self.mode == "int4" else ""
        k = f", kernel={self.kernel}"
        return f"{self.in_features}, {self.out_features}, mode={self.mode}{g}{k}"


def finish_decoding_layout(model: nn.Module, dtype: str) -> None:
    """After the Linear layers are laid out: norms, embeddings and the KV cache follow the activations
    (bf16 for bf16/int8/int4), gradients are off, and ``model.decode_dtype`` records the layout."""
    if dtype != "fp32":
        model.to(torch.bfloat16)  # QuantLinear's int8/uint8 buffers stay as they are
    for p in model.parameters():
        p.requires_grad_(False)
    pack_on_huge_pages(model)
    return_freed_memory()  # the replaced weights' memory, back to the system
    model.decode_dtype = dtype  # type: ignore[assignment]


def pack_on_huge_pages(model: nn.Module) -> int:
    """Move every CPU parameter and buffer of ``model`` into one buffer on transparent huge pages, in module order
    (the order a decoding step reads them), each tensor keeping its identity (``.data`` is swapped, so tied weights
    stay tied and anything holding the tensors sees the new memory). Returns the bytes moved; 0 where huge pages
    are unavailable (utils.huge_page_buffer). Tensors sharing their storage with another tensor stay where they are.

    A decoding step at batch 1 is a stream through all weights; on 4 KiB pages the prefetchers restart at every
    page: SmolLM2-135M's int8 step took 4.39 ms there, 3.17 ms on 2 MiB pages (``python bench/huge_pages.py``, AMD
    EPYC, two threads; docs/hub.md)."""
    tensors: dict[int, torch.Tensor] = {}
    owners: dict[int, set[int]] = {}
    for mod in model.modules():
        for t in [*mod._parameters.values(), *mod._buffers.values()]:
            if t is None or t.device.type != "cpu" or t.numel() == 0:
                continue
            tensors.setdefault(id(t), t)
            owners.setdefault(t.untyped_storage().data_ptr(), set()).add(id(t))
    slots, size = [], 0
    for t in tensors.values():
        nbytes = t.numel() * t.element_size()
        if len(owners[t.untyped_storage().data_ptr()]) > 1 or not t.is_contiguous() \
                or t.untyped_storage().nbytes() != nbytes:
            continue  # a view, or viewed by another tensor: moving it would untie them
        slots.append((t, size, nbytes))
        size += -(-nbytes // 64) * 64  # cache-line aligned
    arena = huge_page_buffer(size) if slots else None
    if arena is None:
        return 0
    for t, start, nbytes in slots:
        view = arena[start:start + nbytes].view(t.dtype).view(t.shape)
        view.copy_(t.detach())
        t.data = view  # the old storage is freed here
    return size
