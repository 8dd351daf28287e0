"""lmforge's C++ kernels (lmforge/kernels): each op against its PyTorch definition, the fused block step against
the general path, the training attention kernel against fp64 attention and inside a training step, and the
fallbacks when the kernels cannot be built."""

from __future__ import annotations

import copy
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from lmforge import kernels
from lmforge.models import layers
from lmforge.models.gpt import GPT, GPTConfig
from lmforge.models.layers import MLP, LayerNorm, RMSNorm, apply_rope, attention_reference
from lmforge.models.quant import QuantLinear, int4_layout, int4_unpack, quantize_int4, quantize_int8

needs_kernels = pytest.mark.skipif(not kernels.available(), reason="lmforge's kernels are not built here")


def vnni_reference(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, group: int = 64) -> torch.Tensor:
    """What the AVX512-VNNI int8 body computes, in fp64 after quantising x as it does (fp32 arithmetic, round half
    to even): per group s = absmax / 127, xq = round(x * (127 / absmax)), y = scale * sum_g s_g (xq_g . q_g)."""
    M, K = x.shape
    v = x.float().view(M, K // group, group)
    amax = v.abs().amax(-1, keepdim=True)
    inv = torch.where(amax > 0, 127.0 / amax, torch.zeros_like(amax))
    xq = torch.round(v * inv).double()
    dots = torch.einsum("mgk,ngk->mng", xq, q.double().view(-1, K // group, group))  # (M, N, groups)
    return (dots * (amax.double() / 127).view(M, 1, -1)).sum(-1) * scale.double()


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("M", [1, 3, 8, 11])
@pytest.mark.parametrize("N, K", [(64, 96), (12, 64), (48, 192)])
def test_int8_linear_matches_dequantised_matmul(dtype: torch.dtype, M: int, N: int, K: int) -> None:
    """The bf16/fp32 tiles against the dequantised matmul; the VNNI layout (inputs a multiple of 64, where the CPU
    has AVX512-VNNI) against its own definition exactly and the float matmul within the activations' rounding."""
    g = torch.Generator().manual_seed(M * N + K)
    w = torch.randn(N, K, generator=g)
    lin = QuantLinear.from_weight(w, None, "int8")
    assert lin.kernel == "lmforge" and not torch.equal(lin.qweight[:N].view(torch.int8), lin.int8_weight())  # tiled
    assert torch.equal(lin.int8_weight(), quantize_int8(w)[0])  # the tiles hold the row-major weights
    assert lin.vnni == (K % 64 == 0 and kernels.int8_vnni())
    x = torch.randn(M, K, generator=g).to(dtype)
    y = torch.ops.lmforge.int8_linear(x, lin.qweight, lin.scale)
    ref = x.double() @ (lin.int8_weight().double() * lin.scale[:N].double()[:, None]).t()
    assert y.dtype == dtype and y.shape == (M, lin.qweight.shape[0])
    y = y[:, :N].double()
    tol = 1e-5 if dtype == torch.float32 else 1e-2  # bf16: the output's rounding
    if lin.vnni:
        exact = vnni_reference(x, lin.int8_weight(), lin.scale[:N])
        assert torch.allclose(y, exact, rtol=tol, atol=tol * exact.abs().max().item())
        # the activations' 8-bit rounding: a few parts in a thousand of the output's scale
        assert (y - ref).abs().max() <= 0.02 * ref.abs().max()
        # each row exactly as a one-row call gives it (speculative verify passes rely on it)
        one = [torch.ops.lmforge.int8_linear(x[i:i + 1], lin.qweight, lin.scale) for i in range(M)]
        assert torch.equal(torch.ops.lmforge.int8_linear(x, lin.qweight, lin.scale), torch.cat(one))
    else:
        assert torch.allclose(y, ref, rtol=tol, atol=tol * ref.abs().max().item())


@pytest.mark.skipif(not kernels.int8_vnni(), reason="the int8 kernel's VNNI body needs AVX512-VNNI")
def test_int8_vnni_prompt_sized_calls_on_several_threads() -> None:
    """A prefill's rows (quantised by several threads, tiles spread over them) give each row what a one-row call
    gives it; the layer's kernel takes every row count (no switch to a GEMM above GEMM_ROWS)."""
    from lmforge.models.quant import GEMM_ROWS

    g = torch.Generator().manual_seed(5)
    lin = QuantLinear.from_weight(torch.randn(96, 128, generator=g), None, "int8")
    assert lin.vnni and lin.gemm_rows is None
    x = torch.randn(GEMM_ROWS + 70, 128, generator=g).bfloat16()
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        y = lin(x)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(y, torch.cat([lin(x[i:i + 1]) for i in range(x.shape[0])]))
    exact = vnni_reference(x, lin.int8_weight(), lin.scale)
    assert torch.allclose(y.double(), exact, rtol=1e-2, atol=1e-2 * exact.abs().max().item())


def int4_kernel_reference(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group: int
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """int4_ops.cpp's maths in fp64: x (M, K) bf16 quantised as the kernel does (per block of 32 inputs, in fp32,
    s = absmax / 127, xq = x * (127 / absmax) rounded to nearest even), y = sum_k d (q - 8) s xq + (m + 8 d) sum_k x
    with the layout's fp16 d and m. Returns (y, the exact product x W^T of the layout's weights W = d q + m, the
    bound of the activation rounding |y - x W^T| <= sum_k |d (q[k] - 8)| s_b(k) / 2, the size sum_k |d (q - 8) x| +
    |(m + 8 d) x| that scales the fp32 rounding)."""
    M, K = x.shape
    xf = x.float().view(M, K // 32, 32)
    amax = xf.abs().amax(-1, keepdim=True)
    inv = torch.where(amax > 0, torch.tensor(127.0) / amax, torch.zeros(()))
    sc = (amax / torch.tensor(127.0)).double()
    xhat = (torch.round(xf * inv).double() * sc).view(M, K)
    d = scale.half().double().repeat_interleave(group, 1)                        # (N, K)
    m = (zero.float() - 8 * scale.float()).half().double().repeat_interleave(group, 1)
    dq, z, xd = d * (q.double() - 8), m + 8 * d, x.double()
    y = xhat @ dq.t() + xd @ z.t()
    bound = (sc / 2).expand(M, K // 32, 32).reshape(M, K) @ dq.abs().t()
    return y, xd @ (dq + z).t(), bound, xd.abs() @ (dq.abs() + z.abs()).t()


@pytest.mark.skipif(not kernels.int4_native(), reason="lmforge's int4 kernel needs AVX512-VNNI")
@pytest.mark.parametrize("M", [1, 3, 4, 5, 8, 9, 17])
@pytest.mark.parametrize("N, K, group", [(32, 64, 32), (48, 256, 128), (16, 96, 32), (32, 128, 64)])
def test_int4_linear_matches_its_maths_and_rows_do_not_depend_on_each_other(M: int, N: int, K: int,
                                                                             group: int) -> None:
    """The kernel against its maths in fp64 (fp32 rounding only: 1e-5 of the size of the sum), against the exact
    product of the layout's weights within the activation rounding's bound (8 bits per 32 inputs: about 0.4% of
    a dot product, half an int8 step per input at most); rows of zeros and rows with one outlier included."""
    g = torch.Generator().manual_seed(M * N + K)
    w = torch.randn(N, K, generator=g)
    lin = QuantLinear.from_weight(w, None, "int4", group)
    assert lin.kernel == "lmforge" and lin.qweight.shape == (N, K // 2) and lin.scales_dm.dtype == torch.float16
    q, s, z = quantize_int4(w, group)
    x = torch.randn(M, K, generator=g) * torch.rand(M, 1, generator=g) * 4
    x[M // 2, :32] = 0                                         # a block of zeros: scale 0
    x[-1, K // 3] = 50.0                                       # an outlier: its block's other inputs round coarsely
    x = x.bfloat16()
    want, exact, bound, size = int4_kernel_reference(x, q, s, z, group)
    y = lin(x, out_dtype=torch.float32).double()
    assert (y - want).abs().max() <= 1e-5 * size.max()
    assert ((y - exact).abs() <= bound + 1e-5 * size).all()
    y16 = lin(x)  # the same sums rounded to bf16 (half a unit in the last place: 2^-9 of the value)
    assert y16.dtype == torch.bfloat16 and y16.shape == (M, N)
    assert ((y16.double() - exact).abs() <= bound + 1e-5 * size + y.abs() / 256).all()
    # each row exactly as a one-row call gives it (speculative verify passes rely on it), in every block of rows
    assert torch.equal(y16, torch.cat([lin(x[i:i + 1]) for i in range(M)]))
    assert torch.equal(y, torch.cat([lin(x[i:i + 1], out_dtype=torch.float32) for i in range(M)]).double())


def test_int4_layout_round_trip_and_byte_order() -> None:
    """int4_layout's bytes: load i of a tile's block holds, in channel c's 32-bit lane, q[c][4 i + j] | q[c][16 + 4 i
    + j] << 4 (the order vpdpbusd takes); int4_unpack gives q back; [d, m] are the fp16 scale and minimum."""
    g = torch.Generator().manual_seed(0)
    N, K, group = 32, 128, 64
    q = torch.randint(0, 16, (N, K), generator=g, dtype=torch.int32)
    s, z = torch.rand(N, K // group, generator=g), torch.randn(N, K // group, generator=g)
    packed, dm = int4_layout(q, s, z)
    assert packed.shape == (N, K // 2) and packed.dtype == torch.uint8 and dm.shape == (N // 16, K // group, 2, 16)
    assert torch.equal(int4_unpack(packed), q.to(torch.uint8))
    flat = packed.view(-1)
    for tile, c, k in ((0, 0, 0), (1, 5, 37), (0, 15, 127), (1, 9, 80), (0, 3, 19)):
        blk, kk = divmod(k, 32)
        byte = flat[tile * 16 * K // 2 + blk * 256 + (kk % 16) // 4 * 64 + 4 * c + kk % 4]
        assert int(byte >> 4 if kk >= 16 else byte & 15) == q[16 * tile + c, k]
    assert torch.equal(dm[1, :, 0, 3], s[19].half()) and torch.equal(dm[0, :, 1, 7], (z[7] - 8 * s[7]).half())


@needs_kernels
@pytest.mark.parametrize("M", [1, 5, 11])
def test_fp32_and_bf16_layouts_take_lmforges_tiles_and_match_the_matmul(M: int) -> None:
    g = torch.Generator().manual_seed(M)
    w, b, x = torch.randn(36, 96, generator=g), torch.randn(36, generator=g), torch.randn(M, 96, generator=g)
    lin = QuantLinear.from_weight(w, b, "fp32")
    assert lin.kernel == "lmforge" and lin.weight_tiles.shape == (36, 96) and lin.weight_tiles.dtype == torch.float32
    assert torch.allclose(lin(x), F.linear(x, w, b), atol=1e-5)
    assert torch.equal(lin(x), torch.cat([lin(x[i:i + 1]) for i in range(M)]))  # rows independent
    lin16 = QuantLinear.from_weight(w, b, "bf16")
    assert lin16.kernel == "lmforge" and lin16.weight_tiles.dtype == torch.bfloat16
    want16 = F.linear(x.bfloat16().double(), w.bfloat16().double(), b.bfloat16().double())
    assert torch.allclose(lin16(x.bfloat16()).double(), want16, rtol=1e-2, atol=1e-2 * want16.abs().max().item())
    for mode in ("fp32", "int8"):  # 13 outputs (a vocabulary's odd size): padded to whole tiles, the output trimmed
        w13 = torch.randn(13, 96, generator=g)
        lin = QuantLinear.from_weight(w13, None, mode)
        assert lin.kernel == "lmforge" and tuple(lin(x).shape) == (M, 13)
        want = F.linear(x, w13) if mode == "fp32" else \
            x.bfloat16().double() @ (lin.int8_weight().double() * lin.scale[:13].double()[:, None]).t()
        assert torch.allclose(lin(x).double(), want.double(), rtol=1e-2, atol=1e-2 * want.abs().max().item())


@needs_kernels
@pytest.mark.parametrize("dtype", ["bf16", "int8", "int4"])
def test_a_decoding_heads_logits_are_fp32_sums_not_bf16(dtype: str) -> None:
    """bf16 logits near 25 move in steps of 0.125, enough to tie the two best tokens: the head of a decoding layout
    hands over its kernel's fp32 sums (int8 / bf16 tiles) or at least fp32 logits."""
    from lmforge.generation.fast import prepare_for_decoding

    torch.manual_seed(3)
    model = prepare_for_decoding(GPT(GPTConfig(**dict(LLAMA, vocab_size=64))), dtype)  # 64: an int4 head too
    ids = torch.randint(0, 50, (1, 6))
    with torch.no_grad():
        logits = model.forward_logits(ids, model.init_state(1, 16))[0]
        assert model.lm_head.mode == dtype
        h = model.ln_f(model.wte(ids))  # any hidden state
        fine = model.lm_head(h, out_dtype=torch.float32)
    assert logits.dtype == torch.float32 and fine.dtype == torch.float32
    if dtype != "int4" or kernels.int4_native():  # lmforge's kernels write their fp32 sums: finer than bf16's grid
        assert not torch.equal(fine, fine.bfloat16().float())
        assert torch.allclose(fine, model.lm_head(h).float(), rtol=1e-2, atol=1e-2)


def test_int8_shapes_the_kernel_cannot_tile_use_pytorchs() -> None:
    lin = QuantLinear.from_weight(torch.randn(13, 48), None, "int8")  # 13 channels: not whole tiles of 4
    assert lin.kernel == "torch" and torch.equal(lin.int8_weight(), lin.qweight)
    x = torch.randn(2, 48).bfloat16()
    ref = x.double() @ (lin.qweight.double() * lin.scale.double()[:, None]).t()
    assert torch.allclose(lin(x).double(), ref, rtol=2e-2, atol=2e-2 * ref.abs().max().item())


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("slots", [False, True])
def test_attend_rows_equals_one_call_per_token(dtype: torch.dtype, slots: bool) -> None:
    """attend_rows (a verify pass's or prompt's tokens in one call) gives every token, and leaves in the cache,
    exactly what one attend_one call per token gives: shared (T, D) angles, or per-row (B, 1, T, D) angles and
    positions (the engine's slots)."""
    B, T, H, Hkv, D, L, pos = 2, 5, 9, 3, 64, 40, 11
    g = torch.Generator().manual_seed(7)
    qkv = torch.randn(B, T, (H + 2 * Hkv) * D, generator=g).to(dtype)
    k0, v0 = (torch.randn(B, Hkv, L, D, generator=g).to(dtype) for _ in range(2))
    row_pos = torch.tensor([0, 7]) if slots else None
    shape = (B, 1, T, D) if slots else (T, D)
    cos, sin = torch.rand(shape, generator=g).to(dtype), torch.rand(shape, generator=g).to(dtype)
    k1, v1, k2, v2 = k0.clone(), v0.clone(), k0.clone(), v0.clone()
    y = torch.ops.lmforge.attend_rows(qkv, k1, v1, pos, row_pos, cos, sin, H, Hkv)
    ys = [torch.ops.lmforge.attend_one(qkv[:, i].contiguous(), k2, v2, pos + i, row_pos,
                                       cos[..., i, :].reshape(-1, D), sin[..., i, :].reshape(-1, D), H, Hkv)
          for i in range(T)]
    assert torch.equal(y, torch.stack(ys, 1)) and torch.equal(k1, k2) and torch.equal(v1, v2)


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("H, Hkv, rope, D, pos", [(4, 4, True, 32, 17), (6, 2, True, 32, 17), (4, 4, False, 32, 17),
                                                  (9, 3, True, 64, 40), (8, 1, True, 32, 20), (2, 2, True, 40, 5)])
def test_attend_one_matches_rope_cache_write_and_attention(dtype: torch.dtype, H: int, Hkv: int, rope: bool, D: int,
                                                           pos: int) -> None:
    """Against fp64 attention: SmolLM2's group of 3 heads over 41 keys (bf16: the dot-product body, an odd last key),
    8 heads on one key/value head (bf16: the fp32 body), a head size that is no multiple of 16 (the plain loop)."""
    B, L = 2, 48
    g = torch.Generator().manual_seed(H + Hkv)
    qkv = torch.randn(B, (H + 2 * Hkv) * D, generator=g).to(dtype)
    kc, vc = torch.randn(2, B, Hkv, L, D, generator=g).to(dtype).unbind(0)
    kc, vc = kc.contiguous(), vc.contiguous()
    ang = torch.rand(D // 2, generator=g) * 3
    cos, sin = torch.cat([ang.cos(), ang.cos()]).to(dtype), torch.cat([ang.sin(), ang.sin()]).to(dtype)
    k_ref, v_ref = kc.double().clone(), vc.double().clone()
    y = torch.ops.lmforge.attend_one(qkv, kc, vc, pos, None, cos if rope else None, sin if rope else None, H, Hkv)

    q, k, v = qkv.double().split([H * D, Hkv * D, Hkv * D], dim=-1)
    q, k, v = q.view(B, H, 1, D), k.view(B, Hkv, 1, D), v.view(B, Hkv, 1, D)
    if rope:
        q, k = apply_rope(q, cos.double(), sin.double()), apply_rope(k, cos.double(), sin.double())
    k_ref[:, :, pos:pos + 1], v_ref[:, :, pos:pos + 1] = k, v
    K, V = (t[:, :, :pos + 1].repeat_interleave(H // Hkv, dim=1) for t in (k_ref, v_ref))
    ref = attention_reference(q, K, V).reshape(B, H * D)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert y.dtype == dtype and torch.allclose(y.double(), ref, atol=tol, rtol=tol)
    assert torch.allclose(kc.double(), k_ref.to(dtype).double(), atol=tol)  # the new key went in at pos
    assert torch.equal(vc.double(), v_ref.to(dtype).double())


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_and_silu_mul(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(3, 1, 40, generator=g).to(dtype), torch.randn(40, generator=g).to(dtype)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    ref = F.rms_norm(x.double(), (40,), w.double(), 1e-5)
    assert torch.allclose(torch.ops.lmforge.rms_norm(x, w, 1e-5).double(), ref, atol=tol, rtol=tol)
    gu = torch.randn(3, 1, 64, generator=g).to(dtype)
    gate, up = gu.double().chunk(2, dim=-1)
    y = torch.ops.lmforge.silu_mul(gu)
    assert y.shape == (3, 1, 32) and torch.allclose(y.double(), F.silu(gate) * up, atol=tol, rtol=tol)


def lora_dropout_reference(x: torch.Tensor, a: torch.Tensor, n: int, p: float, seed: torch.Tensor) -> torch.Tensor:
    """[(x * m_1) A_1^T | ... | (x * m_n) A_n^T] in float64, the masks dropout_keep's for the same seed."""
    keep = torch.ops.lmforge.dropout_keep(seed, n, x.shape[0], x.shape[1], p)
    r = a.shape[0] // n
    return torch.cat([torch.where(keep[s], x.double(), 0) @ a[s * r:(s + 1) * r].double().t() for s in range(n)], 1)


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("N, K, n, r, threads", [(37, 45, 3, 8, 1), (64, 576, 2, 8, 2), (9, 33, 1, 5, 1),
                                                 (50, 100, 3, 12, 2)])
def test_lora_dropout_a_and_its_backward_match_pytorch(dtype: torch.dtype, N: int, K: int, n: int, r: int,
                                                       threads: int) -> None:
    """LoRA's fused dropout + A product (lora_dropout_a) and its backward against the masked matmuls in float64
    with dropout_keep's masks: odd widths (the vector bodies' tails), row counts that leave a part block, r not
    a multiple of the vector bodies' 8 rows, two threads (da summed over the threads' shares)."""
    g = torch.Generator().manual_seed(N + K)
    x = torch.randn(N, K, generator=g).to(dtype).requires_grad_()
    a = torch.randn(n * r, K, generator=g, requires_grad=True)
    seed = torch.tensor(-1234567890123)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        h = torch.ops.lmforge.lora_dropout_a(x, a, n, 0.3, seed)
        dh = torch.randn(N, n * r, generator=g).to(dtype)
        dx, da = torch.autograd.grad(h, [x, a], dh)
    finally:
        torch.set_num_threads(before)
    xd, ad = x.detach().double().requires_grad_(), a.detach().double().requires_grad_()
    ref = lora_dropout_reference(xd, ad, n, 0.3, seed)
    rx, ra = torch.autograd.grad(ref, [xd, ad], dh.double())
    tol = 1e-5 if dtype == torch.float32 else 1e-2  # bf16/fp16: the output's rounding
    assert h.dtype == dx.dtype == dtype and da.dtype == torch.float32
    for got, want in ((h, ref), (dx, rx), (da, ra)):
        assert torch.allclose(got.double(), want, rtol=tol, atol=tol * want.abs().max().item())


@needs_kernels
def test_dropout_keep_rate_is_exact_and_masks_differ_per_slice_row_and_seed() -> None:
    """P(drop) = round(p 2^32) / 2^32: p = 0 keeps everything, a p just above 0 drops nearly nothing, and the
    masks of two slices, two rows or two seeds are not copies of each other."""
    seed = torch.tensor(7)
    assert bool(torch.ops.lmforge.dropout_keep(seed, 2, 8, 100, 0.0).all())
    assert int((~torch.ops.lmforge.dropout_keep(seed, 2, 8, 100, 2.0**-40)).sum()) == 0  # rounds to p = 0
    keep = torch.ops.lmforge.dropout_keep(seed, 2, 8, 100, 0.5)
    other = torch.ops.lmforge.dropout_keep(torch.tensor(8), 2, 8, 100, 0.5)
    assert not torch.equal(keep[0], keep[1]) and not torch.equal(keep[0, 0], keep[0, 1])
    assert not torch.equal(keep, other)


@needs_kernels
def test_lora_dropout_a_traces_under_compile() -> None:
    """The op's fake kernels and autograd registration let torch.compile trace it (forward and backward)."""
    x, a = torch.randn(16, 24, requires_grad=True), torch.randn(8, 24, requires_grad=True)
    seed = torch.tensor(3)
    f = torch.compile(lambda x, a: torch.ops.lmforge.lora_dropout_a(x, a, 2, 0.25, seed).square().sum(),
                      backend="aot_eager", fullgraph=True)
    got = torch.autograd.grad(f(x, a), [x, a])
    xd, ad = x.detach().double().requires_grad_(), a.detach().double().requires_grad_()
    want = torch.autograd.grad(lora_dropout_reference(xd, ad, 2, 0.25, seed).square().sum(), [xd, ad])
    for gv, wv in zip(got, want):
        assert torch.allclose(gv.double(), wv, rtol=1e-4, atol=1e-4)


def backward_ops(t: torch.Tensor) -> set[str]:
    """The lmforge ops in t's autograd graph (their nodes' names hold the op's)."""
    seen, todo, found = set(), [t.grad_fn], set()
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        found |= {op for op in ("lmforge_rms_norm", "lmforge_silu_mul", "lmforge_lora_dropout_a") if op in node.name()}
        todo.extend(n for n, _ in node.next_functions)
    return found


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_training_norm_and_swiglu_match_pytorchs_autograd(dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch) -> None:
    """RMSNorm and SwiGLU in a training step take the kernels with their backwards (rms_norm_backward,
    silu_mul_backward): outputs and gradients (input, norm weight) as PyTorch's autograd gives them, in float64;
    silu's exp is exact to a few ulp from e^-87 to e^88 (inf and large inputs included)."""
    g = torch.Generator().manual_seed(1)
    norm, mlp = RMSNorm(40).to(dtype), MLP(40, 24, "swiglu").to(dtype)
    with torch.no_grad():
        norm.weight.normal_(generator=g)
    x = torch.randn(3, 5, 40, generator=g).to(dtype).requires_grad_()
    x.data[0, 0, :4] = torch.tensor([-100.0, 90.0, 0.0, 30.0])
    out = mlp(norm(x))
    assert {"lmforge_rms_norm", "lmforge_silu_mul"} <= backward_ops(out)
    dy = torch.randn(out.shape, generator=g).to(dtype)
    got = torch.autograd.grad(out, [x, norm.weight, mlp.fc.weight], dy)
    monkeypatch.setattr(kernels, "available", lambda: False)
    ref_norm, ref_mlp = copy.deepcopy(norm).double(), copy.deepcopy(mlp).double()
    xd = x.detach().double().requires_grad_()
    ref = ref_mlp(ref_norm(xd))
    want = torch.autograd.grad(ref, [xd, ref_norm.weight, ref_mlp.fc.weight], dy.double())
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    for a, b in ((out, ref), *zip(got, want)):
        assert torch.allclose(a.double(), b, rtol=tol, atol=tol * b.abs().max().item())
    e = torch.linspace(-87, 88, 20001)
    y = torch.ops.lmforge.silu_mul(torch.stack([e, torch.ones_like(e)], -1)).squeeze(-1).double()
    assert torch.allclose(y, F.silu(e.double()), rtol=5e-7, atol=1e-38)


LLAMA = dict(n_layer=2, n_head=4, n_kv_head=2, n_embd=64, block_size=64, vocab_size=50, pos="rope", norm="rmsnorm",
             mlp="swiglu", tie_embeddings=False)
GPT2 = dict(n_layer=2, n_head=4, n_embd=64, block_size=64, vocab_size=50, bias=True, mlp="gelu_tanh")


@needs_kernels
@pytest.mark.parametrize("shape", [LLAMA, GPT2], ids=["llama", "gpt2"])
def test_fused_step_equals_general_path(shape: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    """Decoding token by token over the plain KV cache: the fused block step (Block._step) gives the logits of
    the general path (kernels switched off), fp32, for a Llama-style and a GPT-2-style model."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(**shape)).eval()
    ids = torch.randint(0, 50, (2, 12))

    def decode(m: GPT) -> torch.Tensor:
        state = m.init_state(2, 32)
        out = [m.forward_logits(ids[:, :4], state)[0][:, -1]]
        for t in range(4, 12):
            out.append(m.forward_logits(ids[:, t:t + 1], state)[0][:, -1])
        return torch.stack(out)

    with torch.no_grad():
        fused = decode(model)
        monkeypatch.setattr(kernels, "available", lambda: False)
        general = decode(copy.deepcopy(model))
    assert torch.allclose(fused, general, atol=1e-5, rtol=1e-5)


@needs_kernels
def test_int8_and_int4_layouts_keep_their_scale_dtypes_when_the_model_is_cast() -> None:
    lin = QuantLinear.from_weight(torch.randn(32, 64), None, "int8")
    assert lin.kernel == "lmforge"
    lin.to(torch.bfloat16)
    assert lin.scale.dtype == torch.float32
    if kernels.int4_native():
        lin = QuantLinear.from_weight(torch.randn(32, 64), None, "int4").to(torch.bfloat16)
        assert lin.kernel == "lmforge" and lin.scales_dm.dtype == torch.float16


def _python(code: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **env})


def test_without_kernels_decoding_uses_pytorch(tmp_path) -> None:  # noqa: ANN001
    """LMFORGE_KERNELS=0 and a failing build both leave PyTorch's operations in charge (one line on stderr
    for the failed build), and int8 decoding still works."""
    code = ("import torch; from lmforge import kernels; from lmforge.models.quant import QuantLinear; "
            "lin = QuantLinear.from_weight(torch.randn(32, 64), None, 'int8'); "
            "print(kernels.available(), lin.kernel, tuple(lin(torch.randn(2, 64)).shape))")
    off = _python(code, LMFORGE_KERNELS="0")
    assert off.returncode == 0 and off.stdout.split() == ["False", "torch", "(2,", "32)"] and not off.stderr
    broken = _python(code, XDG_CACHE_HOME=str(tmp_path), CXX="false")
    assert broken.returncode == 0 and broken.stdout.split()[:2] == ["False", "torch"], broken.stderr
    notes = [line for line in broken.stderr.splitlines() if line.startswith("lmforge:")]
    assert any("not available" in line for line in notes) and "Traceback" not in broken.stderr


@needs_kernels
def test_fused_verify_pass_equals_single_steps_bitwise() -> None:
    """A speculative verify pass (4 tokens after a cached prefix) through the fused step gives each token the
    very logits a one-token step gives it (int8, bf16 activations): what makes speculative decoding exact."""
    from lmforge.generation.fast import prepare_for_decoding

    torch.manual_seed(1)
    model = prepare_for_decoding(GPT(GPTConfig(**LLAMA)), "int8")
    ids = torch.randint(0, 50, (1, 10))
    with torch.no_grad():
        one = model.init_state(1, 32)
        model.forward_logits(ids[:, :6], one)
        singles = torch.cat([model.forward_logits(ids[:, t:t + 1], one)[0] for t in range(6, 10)], dim=1)
        many = model.init_state(1, 32)
        model.forward_logits(ids[:, :6], many)
        verify = model.forward_logits(ids[:, 6:10], many)[0]
    assert torch.equal(singles, verify)
    assert torch.equal(one.k[:, :, :, :10], many.k[:, :, :, :10])


#: every block kind decode_stack runs: Llama (RMSNorm, SwiGLU, RoPE, grouped heads; with Qwen2's QKV biases),
#: GPT-2 (LayerNorm with biases, tanh GELU, learned positions, biases everywhere), lmforge's `tiny` (RMSNorm, exact
#: GELU, RoPE), ReLU^2 with bias-free LayerNorms and sinusoidal positions
STACK_SHAPES = {"llama": LLAMA, "qwen2": dict(LLAMA, qkv_bias=True), "gpt2": GPT2,
                "tiny": dict(LLAMA, n_kv_head=None, mlp="gelu"),
                "relu2": dict(GPT2, bias=False, mlp="relu2", pos="sinusoidal", n_head=2)}


@needs_kernels
@pytest.mark.parametrize("dtype", ["fp32", "bf16", "int8", "int4", "int4-torch"])
@pytest.mark.parametrize("shape", list(STACK_SHAPES))
def test_decode_stack_equals_block_steps_bitwise(dtype: str, shape: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The whole stack of blocks in one C++ call (decode_stack) gives Block._step's logits and cache bit for bit:
    one-token steps, a 4-token verify pass and a step of engine slots at their own positions, every layout and
    every block kind (after the same prompt: the stack reads a prompt row by row, the blocks' general path in one
    fused attention; a prompt read by the stack equals one-token steps, below)."""
    from lmforge.generation.fast import prepare_for_decoding
    from lmforge.models.gpt import STACK_KINDS, STACK_MLPS, STACK_NORMS

    torch.manual_seed(2)
    cfg = GPTConfig(**STACK_SHAPES[shape])
    model = GPT(cfg)
    for n, p in model.named_parameters():  # norms and biases away from their initial 1 and 0
        if n.endswith("bias") or ".ln_" in n:
            p.data.add_(0.1 * torch.randn_like(p))
    torch_int4 = dtype == "int4-torch"  # PyTorch's int4 kernel (CPUs without AVX512-VNNI) inside the stack
    dtype = dtype.removesuffix("-torch")
    with monkeypatch.context() as patch:
        if torch_int4:
            patch.setattr(kernels, "int4_native", lambda: False)
        model = prepare_for_decoding(model, dtype)
    ids = torch.randint(0, 50, (3, 12))

    def decode(m: GPT, blocks: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        state = m.init_state(3, 32)
        out = [m.forward_logits(ids[:, :5], state)[0][:, -1:]]  # by the stack in both runs
        if blocks:
            monkeypatch.setattr(GPT, "_decode_stack", lambda self: None)
        out += [m.forward_logits(ids[:, t:t + 1], state)[0] for t in (5, 6)]
        out.append(m.forward_logits(ids[:, 7:11], state)[0])  # a verify pass
        slots = m.init_slots(3, 32)
        for b in range(3):  # rows of lengths 4, 6, 8
            slots.select(torch.tensor([b]), torch.tensor([4 + 2 * b]))
            m.forward_logits(ids[b:b + 1, :4 + 2 * b], slots)
        slots.select(slice(0, 3))
        out.append(m.forward_logits(ids[:, 11:12], slots)[0])
        monkeypatch.undo()
        return torch.cat(out, 1), state.k, slots.v

    with torch.no_grad():
        stacked = decode(model, blocks=False)
        assert isinstance(model._stack, tuple)  # taken
        spec = model._stack[1]
        assert spec[0::10] == [STACK_NORMS[RMSNorm if cfg.norm == "rmsnorm" else LayerNorm]] * cfg.n_layer
        assert spec[1::10] == [STACK_MLPS[cfg.mlp]] * cfg.n_layer
        kinds = {k for i in (2, 4, 6, 8) for k in spec[i::10]}
        own = dtype in ("int8", "fp32", "bf16") or dtype == "int4" and kernels.int4_native() and not torch_int4
        assert kinds == {STACK_KINDS[(dtype, "lmforge" if own else "torch")]}
        blocks = decode(model, blocks=True)
        # a prompt read by the stack gives each position what one-token steps give it (int8/int4 below)
        one = model.init_state(3, 32)
        singles = torch.cat([model.forward_logits(ids[:, t:t + 1], one)[0] for t in range(5)], 1)
        whole = model.forward_logits(ids[:, :5], model.init_state(3, 32))[0]
    for a, b in zip(stacked, blocks):
        assert torch.equal(a, b)
    if own:  # lmforge's kernels: rows independent (PyTorch's int4 kernel blocks rows its own way)
        assert torch.equal(singles, whole)
    # Llama blocks in lmforge's int8 (VNNI) / int4 layouts run in decode_stack's one-region path, the rest in its
    # general one (the comparisons above hold for whichever ran)
    x = torch.zeros(3, 1, cfg.n_embd, dtype=model.wte.weight.dtype)
    fused = torch.ops.lmforge.decode_stack_fused(x, model._stack[0], model._stack[1], model.init_state(3, 32).k,
                                                  cfg.n_head, cfg.n_kv_head or cfg.n_head)
    assert fused == (shape == "llama" and own and dtype in ("int8", "int4") and kernels.int8_vnni())
    if fused:  # the one-region path against the general one, bit for bit (a step, a verify pass, slots)
        monkeypatch.setenv("LMFORGE_FUSED_STACK", "0")
        with torch.no_grad():
            general = decode(model, blocks=False)
        monkeypatch.delenv("LMFORGE_FUSED_STACK", raising=False)  # (decode undoes the patches itself)
        for a, b in zip(stacked, general):
            assert torch.equal(a, b)


def test_int8_prefill_rows_take_the_dequantised_gemm() -> None:
    """Above GEMM_ROWS rows (a prompt's prefill) an int8 layer multiplies by its dequantised weight; the result
    is the same product as row by row (bf16 rounding)."""
    from lmforge.models.quant import GEMM_ROWS

    lin = QuantLinear.from_weight(torch.randn(48, 64), None, "int8")
    x = torch.randn(GEMM_ROWS + 8, 64).bfloat16()
    ref = x.double() @ (lin.int8_weight().double() * lin.scale.double()[:, None]).t()
    y = lin(x)
    assert y.dtype == torch.bfloat16 and torch.allclose(y.double(), ref, rtol=2e-2, atol=2e-2 * ref.abs().max().item())
    rows = torch.cat([lin(x[i:i + 1]) for i in range(4)])
    assert torch.allclose(y[:4].double(), rows.double(), rtol=2e-2, atol=2e-2 * ref.abs().max().item())


@needs_kernels
def test_attend_one_rows_at_their_own_positions() -> None:
    """Continuous batching: row b's token goes in at row_pos[b] with its own RoPE angles and sees 0 .. row_pos[b];
    the same as each row decoded alone."""
    B, H, Hkv, L, D = 3, 4, 2, 16, 16
    g = torch.Generator().manual_seed(5)
    qkv = torch.randn(B, (H + 2 * Hkv) * D, generator=g)
    kc, vc = (torch.randn(B, Hkv, L, D, generator=g) for _ in range(2))
    row_pos = torch.tensor([3, 9, 0])
    ang = torch.rand(B, D // 2, generator=g) * 3
    cos, sin = torch.cat([ang.cos(), ang.cos()], -1), torch.cat([ang.sin(), ang.sin()], -1)
    k2, v2 = kc.clone(), vc.clone()
    y = torch.ops.lmforge.attend_one(qkv, kc, vc, 0, row_pos, cos, sin, H, Hkv)
    for b in range(B):
        kb, vb = k2[b:b + 1].contiguous(), v2[b:b + 1].contiguous()
        alone = torch.ops.lmforge.attend_one(qkv[b:b + 1], kb, vb, int(row_pos[b]), None, cos[b], sin[b], H, Hkv)
        assert torch.allclose(y[b:b + 1], alone, atol=1e-6) and torch.equal(kc[b:b + 1], kb)


CHECK_OPS = """
import sys, torch, torch.nn.functional as F
from lmforge import kernels
from lmforge.models.quant import QuantLinear, int4_layout, quantize_int4
assert kernels.available(), "not built"
g = torch.Generator().manual_seed(0)
w = torch.randn(32, 128, generator=g)
q, s, z = quantize_int4(w, 64)
wq = (q - 8) * s.repeat_interleave(64, 1) + z.repeat_interleave(64, 1)
lin32 = QuantLinear.from_weight(w, None, "fp32")
assert lin32.kernel == "lmforge"
x = torch.randn(3, 128, generator=g)
assert torch.allclose(lin32(x), x @ w.t(), atol=1e-4)
lin16 = QuantLinear.from_weight(w, None, "bf16")
ref16 = x.bfloat16().double() @ w.bfloat16().double().t()
assert lin16.kernel == "lmforge" and torch.allclose(lin16(x.bfloat16()).double(), ref16, rtol=1e-2, atol=2e-2)
int4 = []
for M in (1, 6):
    x = torch.randn(M, 128, generator=g).bfloat16()
    ref = x.double() @ wq.double().t()
    y = torch.ops.lmforge.int4_linear(x, *int4_layout(q, s, z), 64, torch.float32)
    assert torch.allclose(y.double(), ref, rtol=2e-2, atol=2e-2 * ref.abs().max().item())  # x rounded to int8 per 32
    int4.append((x, y))
torch.save(int4, sys.argv[1])  # for the test to compare with this machine's build
lin = QuantLinear.from_weight(torch.randn(36, 96, generator=g), None, "int8")
for M in (1, 5, 9):
    x = torch.randn(M, 96, generator=g).bfloat16()
    ref = x.double() @ (lin.int8_weight().double() * lin.scale.double()[:, None]).t()
    y = torch.ops.lmforge.int8_linear(x, lin.qweight, lin.scale).double()
    assert torch.allclose(y, ref, rtol=1e-2, atol=1e-2 * ref.abs().max().item())
x, w = torch.randn(2, 40, generator=g), torch.randn(40, generator=g)
assert torch.allclose(torch.ops.lmforge.rms_norm(x, w, 1e-5), F.rms_norm(x, (40,), w, 1e-5), atol=1e-5)
qkv = torch.randn(1, 4 * 16, generator=g)
kc, vc = torch.randn(1, 1, 8, 16, generator=g), torch.randn(1, 1, 8, 16, generator=g)
k, v = kc.clone(), vc.clone()
y = torch.ops.lmforge.attend_one(qkv, kc, vc, 5, None, None, None, 2, 1)
k[0, 0, 5], v[0, 0, 5] = qkv[0, 32:48], qkv[0, 48:]
att = (qkv[0, :32].view(2, 16) @ k[0, 0, :6].t() / 4).softmax(-1) @ v[0, 0, :6]
assert torch.allclose(y, att.reshape(1, 32), atol=1e-5)
qkv = torch.randn(1, 8 * 32, generator=g)  # 4 heads over 2, 21 keys: whole vectors of keys at a time, and a rest
kc, vc = torch.randn(1, 2, 24, 32, generator=g), torch.randn(1, 2, 24, 32, generator=g)
k, v = kc.clone(), vc.clone()
y = torch.ops.lmforge.attend_one(qkv, kc, vc, 20, None, None, None, 4, 2).view(4, 32)
k[0, :, 20], v[0, :, 20] = qkv[0, 128:192].view(2, 32), qkv[0, 192:].view(2, 32)
for h in range(4):
    att = (qkv[0, 32 * h:32 * h + 32] @ k[0, h // 2, :21].t() / 32 ** 0.5).softmax(-1) @ v[0, h // 2, :21]
    assert torch.allclose(y[h], att, atol=1e-5)
x, a, seed = torch.randn(11, 37, generator=g, requires_grad=True), torch.randn(10, 37, generator=g), torch.tensor(9)
a.requires_grad_()
keep = torch.ops.lmforge.dropout_keep(seed, 2, 11, 37, 0.3)
ref = torch.cat([torch.where(keep[s], x, 0) @ a[5 * s:5 * s + 5].t() for s in range(2)], 1)
h = torch.ops.lmforge.lora_dropout_a(x, a, 2, 0.3, seed)
assert torch.allclose(h, ref, atol=1e-4)
for got, want in zip(torch.autograd.grad(h.sum(), [x, a]), torch.autograd.grad(ref.sum(), [x, a])):
    assert torch.allclose(got, want, atol=1e-4)
x, w, dy = torch.randn(3, 45, generator=g), torch.randn(45, generator=g), torch.randn(3, 45, generator=g)
x.requires_grad_(), w.requires_grad_()
got = torch.autograd.grad(torch.ops.lmforge.rms_norm(x, w, 1e-5), [x, w], dy)
for a, b in zip(got, torch.autograd.grad(F.rms_norm(x, (45,), w, 1e-5), [x, w], dy)):
    assert torch.allclose(a, b, atol=1e-4)
gu = (torch.randn(4, 2 * 37, generator=g) * 8).requires_grad_()
y = torch.ops.lmforge.silu_mul(gu)
ref = F.silu(gu[:, :37]) * gu[:, 37:]
assert torch.allclose(y, ref, atol=1e-5, rtol=1e-5)
dy = torch.randn(4, 37, generator=g)
assert torch.allclose(torch.autograd.grad(y, gu, dy)[0], torch.autograd.grad(ref, gu, dy)[0], atol=1e-5, rtol=1e-5)
for dt, tol, D in ((torch.float32, 1e-5, 32), (torch.bfloat16, 2e-2, 32), (torch.float32, 1e-5, 64)):
    q = torch.randn(2, 4, 37, D, generator=g).to(dt).requires_grad_()
    k, v = (torch.randn(2, 2, 37, D, generator=g).to(dt).requires_grad_() for _ in range(2))
    kernels.causal_attention(q, k, v).sum().backward()
    qd, kd, vd = (t.detach().double().requires_grad_() for t in (q, k, v))
    F.scaled_dot_product_attention(qd, kd, vd, is_causal=True, enable_gqa=True).sum().backward()
    for a, b in ((q.grad, qd.grad), (k.grad, kd.grad), (v.grad, vd.grad)):
        assert (a.double() - b).abs().max() <= tol * b.abs().max(), dt
print(int(keep.flatten().nonzero().sum()), kernels.isa())  # the masks: the same bits on every CPU
"""


@pytest.mark.slow
@pytest.mark.parametrize("march, isa, needs", [("haswell", "avx2", {"avx2", "fma", "f16c"}),
                                               ("x86-64", "scalar", set())])
def test_kernel_bodies_for_other_cpus(march: str, isa: str, needs: set, tmp_path) -> None:  # noqa: ANN001
    """The AVX2 and plain C++ bodies (what other machines build) compute the same as PyTorch: built here with
    LMFORGE_KERNELS_MARCH into a fresh cache and checked in a subprocess."""
    from lmforge.utils import cpu_info

    if not needs <= cpu_info()[1] or not kernels.available():
        pytest.skip(f"this CPU cannot run {march} code, or no compiler")
    run = subprocess.run([sys.executable, "-c", CHECK_OPS, str(tmp_path / "int4.pt")], capture_output=True,
                         text=True, timeout=300,
                         env={**os.environ, "XDG_CACHE_HOME": str(tmp_path), "LMFORGE_KERNELS_MARCH": march})
    assert run.returncode == 0 and run.stdout.split()[-1] == isa, run.stderr[-2000:]
    keep = torch.ops.lmforge.dropout_keep(torch.tensor(9), 2, 11, 37, 0.3)
    assert run.stdout.split()[-2] == str(int(keep.flatten().nonzero().sum()))  # this CPU's build drew the same
    # int4's plain loop does the fast body's maths in the same order (std::fma for its FMAs): the same fp32 sums
    q, s, z = quantize_int4(torch.randn(32, 128, generator=torch.Generator().manual_seed(0)), 64)
    for x, y in torch.load(tmp_path / "int4.pt"):
        assert torch.equal(torch.ops.lmforge.int4_linear(x, *int4_layout(q, s, z), 64, torch.float32), y)


def _attention_inputs(B: int, H: int, Hkv: int, T: int, D: int, dtype: torch.dtype, seed: int = 0) -> list:
    """q, k, v as the qkv projection leaves them: (B, H, T, D) views of (B, T, H, D) memory."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, T, h, D, generator=g).to(dtype).transpose(1, 2).requires_grad_() for h in (H, Hkv, Hkv)]


@needs_kernels
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 2e-6), (torch.bfloat16, 1.5e-2)])
@pytest.mark.parametrize("B, H, Hkv, T, D", [(2, 4, 4, 64, 32), (3, 6, 2, 37, 64), (1, 2, 1, 130, 16),
                                             (1, 2, 2, 200, 128), (2, 3, 3, 2, 32), (1, 1, 1, 17, 16)])
def test_causal_attention_matches_fp64(dtype: torch.dtype, tol: float, B: int, H: int, Hkv: int, T: int,
                                       D: int) -> None:
    """Output and the three gradients against fp64 attention, relative to each one's largest element: fp32 to
    rounding, bf16 to its output rounding (the arithmetic inside is fp32); grouped-query heads sum their gradients;
    the output is laid out as (B, T, H, D), so joining the heads is a view."""
    q, k, v = _attention_inputs(B, H, Hkv, T, D, dtype)
    dy = torch.randn(B, H, T, D, generator=torch.Generator().manual_seed(1)).to(dtype)
    y = kernels.causal_attention(q, k, v)
    y.backward(dy)
    assert y.dtype == dtype and q.grad.dtype == dtype and k.grad.shape == k.shape
    assert y.transpose(1, 2).is_contiguous()
    qd, kd, vd = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = F.scaled_dot_product_attention(qd, kd, vd, is_causal=True, enable_gqa=H != Hkv)
    ref.backward(dy.double())
    for got, want in ((y, ref), (q.grad, qd.grad), (k.grad, kd.grad), (v.grad, vd.grad)):
        assert (got.double() - want).abs().max() <= tol * want.abs().max()


@needs_kernels
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 2e-6), (torch.bfloat16, 1.5e-2)])
@pytest.mark.parametrize("B, H, Hkv, T, D", [(2, 4, 2, 45, 64), (1, 2, 1, 33, 16)])
def test_causal_attention_with_rope_matches_rotating_first(dtype: torch.dtype, tol: float, B: int, H: int,
                                                           Hkv: int, T: int, D: int) -> None:
    """RoPE inside the kernel (q and k rotated as apply_rope does; their gradients rotated back by the transpose)
    equals rotating first and attending in fp64, the gradients included; D = 16 takes the scalar rotation."""
    from lmforge.models.layers import rope_tables

    cos, sin = rope_tables(T, D, theta=500.0)
    q, k, v = _attention_inputs(B, H, Hkv, T, D, dtype, seed=3)
    dy = torch.randn(B, H, T, D, generator=torch.Generator().manual_seed(4)).to(dtype)
    y = kernels.causal_attention(q, k, v, (cos, sin))
    y.backward(dy)
    qd, kd, vd = (t.detach().double().requires_grad_() for t in (q, k, v))
    c, s = cos.double(), sin.double()
    ref = F.scaled_dot_product_attention(apply_rope(qd, c, s), apply_rope(kd, c, s), vd, is_causal=True,
                                         enable_gqa=H != Hkv)
    ref.backward(dy.double())
    for got, want in ((y, ref), (q.grad, qd.grad), (k.grad, kd.grad), (v.grad, vd.grad)):
        assert (got.double() - want).abs().max() <= tol * want.abs().max()


@needs_kernels
@pytest.mark.filterwarnings("ignore:Input #")
def test_causal_attention_backward_passes_gradcheck() -> None:
    """The hand-written backward is the forward's derivative (finite differences on the fp32 path, in fp64 sums
    of small perturbations)."""
    q, k, v = (t.detach().requires_grad_() for t in _attention_inputs(1, 2, 1, 20, 16, torch.float32))
    assert torch.autograd.gradcheck(kernels.causal_attention, (q, k, v), eps=1e-2, atol=5e-3, rtol=5e-3,
                                    nondet_tol=1e-6)


@needs_kernels
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("pos", ["learned", "rope"])
def test_training_step_takes_the_kernel_and_matches_pytorchs_attention(dtype: str, pos: str,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """A GPT's loss and gradients with lmforge's attention kernel equal those with PyTorch's flash kernel (fp32 to
    rounding; bf16 autocast to its rounding), with learned positions or RoPE and grouped-query heads, and the
    kernel is what runs: the profiler sees it."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=48, n_layer=2, n_head=4, n_embd=64, block_size=32, pos=pos, n_kv_head=2))
    idx = torch.randint(0, 48, (3, 32))

    def loss_and_grads(max_t: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
        monkeypatch.setattr(layers, "CAUSAL_KERNEL_MAX_T", max_t)
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16"):
            _, loss = model(idx[:, :-1], idx[:, 1:])
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()]

    with torch.profiler.profile() as prof:
        ours, ours_grads = loss_and_grads(512)
    assert any(e.key == "lmforge::causal_attention" for e in prof.key_averages())
    theirs, their_grads = loss_and_grads(0)
    tol = 1e-5 if dtype == "fp32" else 2e-2
    assert abs(ours - theirs) <= tol * abs(theirs)
    for a, b in zip(ours_grads, their_grads):
        assert (a - b).abs().max() <= tol * 5 * b.abs().max()


def test_attention_kernel_is_not_taken_where_it_does_not_apply(monkeypatch: pytest.MonkeyPatch) -> None:
    """Evaluation (no gradients), attention dropout, and windows past CAUSAL_KERNEL_MAX_T keep PyTorch's kernel."""
    attn = layers.CausalSelfAttention(64, 4)
    q = torch.randn(1, 4, 40, 16)
    assert attn._own_kernel(q, 40) == kernels.available()
    with torch.no_grad():
        assert not attn._own_kernel(q, 40)
    monkeypatch.setattr(layers, "CAUSAL_KERNEL_MAX_T", 32)
    assert not attn._own_kernel(q, 40)
    monkeypatch.setattr(layers, "CAUSAL_KERNEL_MAX_T", 512)
    attn.dropout = 0.1
    assert not attn._own_kernel(q, 40)
    attn.eval()
    assert attn._own_kernel(q, 40) == kernels.available()


@pytest.mark.slow
@needs_kernels
def test_compiled_training_step_takes_the_kernel_without_graph_breaks() -> None:
    """torch.compile traces the attention kernel as one op (its fake and autograd registrations) and takes
    ``kernels.available()`` as a constant, so a compiled GPT's training loss has no graph break and equals the
    eager one."""
    import torch._dynamo

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=48, n_layer=1, n_head=2, n_embd=32, block_size=16, pos="rope"))
    idx = torch.randint(0, 48, (2, 17))

    def loss(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return model(a, b)[1]

    eager = loss(idx[:, :-1], idx[:, 1:])
    compiled = torch.compile(loss)(idx[:, :-1], idx[:, 1:])
    compiled.backward()
    assert not torch._dynamo.utils.counters["graph_break"]
    assert torch.allclose(eager, compiled, atol=1e-5)
