"""Decoding layouts (fp32, bf16, int8, int4), the fixed-shape decode step and GGUF blocks loaded straight
into int8/int4."""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest
import torch

from lmforge.generation import GenerationConfig, generate_ids
from lmforge.generation.fast import StaticDecoder, prepare_for_decoding, should_compile
from lmforge.models.gpt import GPT, GPTConfig
from lmforge.models.quant import QuantLinear, quantize_int4

# Stated tolerances: the largest |logit - fp32 logit| over a teacher-forced sequence, relative to the
# fp32 logits' spread (max - min) on the separated test model below.
TOLERANCE = {"fp32": 1e-5, "bf16": 0.02, "int8": 0.02, "int4": 0.08}


def separated_model(block_size: int = 96) -> GPT:
    """A small Llama-shaped GPT whose logits are well separated (a scaled output head), so that the
    rounding of bf16/int8/int4 cannot flip a greedy choice: every greedy step's top-1/top-2 margin is
    checked to exceed twice the measured logit error."""
    torch.manual_seed(0)
    m = GPT(GPTConfig(vocab_size=96, block_size=block_size, n_layer=2, n_head=4, n_kv_head=2, n_embd=64, pos="rope",
                      norm="rmsnorm", mlp="swiglu", tie_embeddings=False)).eval()
    with torch.no_grad():
        m.lm_head.weight.mul_(12.0)
    return m


@pytest.mark.parametrize("dtype", ["fp32", "bf16", "int8", "int4"])
def test_layout_greedy_equals_fp32(dtype: str) -> None:
    model = separated_model()
    fast = prepare_for_decoding(copy.deepcopy(model), dtype)
    assert fast.decode_dtype == dtype and any(isinstance(m, QuantLinear) for m in fast.modules())
    cfg = GenerationConfig(max_new_tokens=30, temperature=0, ignore_eos=True)
    prompt = [5, 17, 42, 8]
    ref = generate_ids(model, prompt, cfg)[0]
    seq = torch.tensor([prompt + ref])
    with torch.no_grad():
        want, _ = model(seq)
        got, _ = fast(seq)
    err = (got.float() - want).abs().max().item()
    spread = (want.amax(-1) - want.amin(-1)).min().item()
    assert err <= TOLERANCE[dtype] * spread, (dtype, err, spread)
    if dtype == "int4":
        # 4-bit rounding moves logits by up to a few percent of their spread, which can reach the gap
        # between near-tied tokens of a random model: the stated tolerance above is the guarantee, plus
        # agreement of the teacher-forced argmax at (nearly) every position
        agree = (got.float().argmax(-1) == want.argmax(-1)).float().mean().item()
        assert agree >= 0.9
        return
    top2 = want[0, len(prompt) - 1:-1].topk(2, dim=-1).values
    margin = (top2[:, 0] - top2[:, 1]).min().item()
    assert margin > 2 * err, "test model not separated enough for this layout"  # so greedy cannot differ
    assert generate_ids(fast, prompt, cfg)[0] == ref


def test_int4_groups_and_fallback() -> None:
    torch.manual_seed(1)
    w = torch.randn(48, 256)
    x = torch.randn(3, 256)
    errs = {}
    for g in (32, 64):
        q, s, z = quantize_int4(w, g)
        deq = ((q.float() - 8).view(48, -1, g) * s[..., None] + z[..., None]).view(48, 256)
        assert (deq - w).abs().max() <= s.max() / 2 + 1e-5  # round to nearest: half a step at most
        lin = QuantLinear.from_weight(w, None, "int4", g)
        assert lin.mode == "int4" and lin.nbytes < w.numel() // 2 + 4 * 48 * 256 // g + 64
        errs[g] = (lin(x).float() - x @ w.t()).abs().max().item()
        # the kernel computes x @ deq^T: bf16 activations, with lmforge's kernel rounded to 8 bits per 32 inputs
        # (~0.1 here, at most 0.3 of these ~40: int4_ops.cpp; tests/test_kernels.py holds it to its bound)
        atol = 0.4 if lin.kernel == "lmforge" else 0.15
        torch.testing.assert_close(lin(x).float(), x.bfloat16().float() @ deq.t(), atol=atol, rtol=0.02)
    assert errs[32] < errs[64] * 1.5
    odd = QuantLinear.from_weight(torch.randn(10, 64), torch.zeros(10), "int4", 32)  # 10 % 16 != 0
    assert odd.mode == "int8" and odd(torch.randn(2, 64)).shape == (2, 10)
    odd = QuantLinear.from_weight(torch.randn(10, 40), torch.zeros(10), "int8")  # the int8 kernel would crash
    assert odd.mode == "bf16" and odd(torch.randn(2, 40)).shape == (2, 10)


def _huge_kib() -> int:
    return sum(int(line.split()[1]) for line in open("/proc/self/smaps_rollup") if line.startswith("AnonHugePages"))


@pytest.mark.parametrize("tie", [False, True])
def test_decoding_weights_move_onto_huge_pages(tie: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every layout packs the weights into one huge-page buffer: same outputs bit for bit, tied weights stay one
    tensor, a second pack moves nothing, and LMFORGE_HUGEPAGES=0 leaves malloc's memory."""
    from lmforge import utils
    from lmforge.models.quant import pack_on_huge_pages

    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=96, block_size=64, n_layer=2, n_head=4, n_kv_head=2, n_embd=64, pos="rope",
                          norm="rmsnorm", mlp="swiglu", tie_embeddings=tie)).eval()
    monkeypatch.setenv("LMFORGE_HUGEPAGES", "0")
    utils.huge_pages_available.cache_clear()
    plain = prepare_for_decoding(copy.deepcopy(model), "int8")
    assert len({t.untyped_storage().data_ptr() for t in plain.buffers()}) > 1
    monkeypatch.setenv("LMFORGE_HUGEPAGES", "1")
    utils.huge_pages_available.cache_clear()
    if not utils.huge_pages_available():
        pytest.skip("no transparent huge pages on this system")
    packed = prepare_for_decoding(copy.deepcopy(model), "int8")
    tensors = [*packed.parameters(), *packed.buffers()]
    assert len({t.untyped_storage().data_ptr() for t in tensors}) == 1  # one buffer
    assert min(t.data_ptr() for t in tensors) % utils.HUGE_PAGE == 0
    raw = copy.deepcopy(model)  # the unprepared model, whose head may be tied to the embedding
    assert pack_on_huge_pages(raw) > 0 and (raw.lm_head.weight is raw.wte.weight) == tie
    assert raw.wte.weight.untyped_storage().data_ptr() == raw.lm_head.weight.untyped_storage().data_ptr()
    with torch.no_grad():
        assert torch.equal(raw(torch.tensor([[1, 2, 3]]))[0], model(torch.tensor([[1, 2, 3]]))[0])
    assert pack_on_huge_pages(packed) == 0  # already packed: views of one buffer stay put
    seq = torch.tensor([[5, 17, 42, 8, 3, 9]])
    with torch.no_grad():
        assert torch.equal(plain(seq)[0], packed(seq)[0])
    cfg = GenerationConfig(max_new_tokens=12, temperature=0, ignore_eos=True)
    assert generate_ids(packed, [5, 17], cfg) == generate_ids(plain, [5, 17], cfg)
    # the memory is really on 2 MiB pages (a shared mapping, say, would be shmem's, usually without them)
    before = _huge_kib()
    buf = utils.huge_page_buffer(16 << 20)
    buf.fill_(1)
    assert _huge_kib() - before >= 2048 and int(buf[::4096].sum()) == 4096
    utils.huge_pages_available.cache_clear()


def test_freed_heap_memory_goes_back_to_the_system() -> None:
    """utils.return_freed_memory (called after a decoding layout replaces the weights): glibc keeps freed heap
    chunks resident until trimmed."""
    import platform
    import sys

    from lmforge.utils import return_freed_memory

    if sys.platform != "linux" or platform.libc_ver()[0] != "glibc":
        pytest.skip("glibc only")

    def rss_mib() -> float:
        return next(int(x.split()[1]) for x in open("/proc/self/status") if x.startswith("VmRSS")) / 1024

    start = rss_mib()
    keep = [torch.ones(16_000) for _ in range(7000)]  # ~430 MiB in 64 KB blocks: below any mmap threshold
    hold = [torch.ones(10) for _ in range(10)]  # small blocks after them: free() alone cannot shrink the heap
    del keep
    return_freed_memory()
    # back where it started (without the trim, a fresh process stays ~430 MiB above; a process whose heap already
    # held that much free memory reuses it and ends where it started either way)
    assert rss_mib() < start + 100, (start, rss_mib())
    del hold


def test_static_decoder_matches_plain_decoding() -> None:
    """The fixed-shape step (static cache, masks over the whole buffer, sampling inside) gives the same
    tokens as plain decoding, greedy and sampled (same seed: the same exponential-race draws)."""
    model = separated_model()
    prompt = [3, 9, 27]
    for kw in (dict(temperature=0), dict(temperature=1.3, top_k=40, top_p=0.9, repetition_penalty=1.3)):
        cfg = GenerationConfig(max_new_tokens=12, ignore_eos=True, num_return_sequences=2, seed=7, **kw)
        plain = generate_ids(model, prompt, cfg)
        g = torch.Generator().manual_seed(7)
        dec = StaticDecoder(model, 2, len(prompt) + 12, cfg, compile=False, generator=g)
        assert dec.length % 64 == 0
        toks = [dec.prefill(torch.tensor([prompt] * 2))]
        for _ in range(11):
            toks.append(dec.step(toks[-1]))
        assert torch.stack(toks, 1).tolist() == plain


def test_auto_compile_only_when_it_pays() -> None:
    model = separated_model()
    assert not should_compile(model, 100, "auto")
    assert not should_compile(model, 10**6, "off") and should_compile(model, 1, "on")
    from lmforge.models.rnn import LSTMLM

    assert not should_compile(LSTMLM.from_preset("tiny", vocab_size=20), 10**6, "on")  # no fixed-shape state


@pytest.mark.slow
def test_compiled_step_equals_eager() -> None:
    """torch.compile captures the step once (Inductor; minutes on a busy 2-core CPU): same tokens."""
    torch.manual_seed(0)
    model = prepare_for_decoding(GPT(GPTConfig(vocab_size=32, block_size=64, n_layer=1, n_head=2, n_embd=32,
                                                pos="rope", norm="rmsnorm", mlp="swiglu")).eval(), "int8")
    for temp in (0.0, 1.0):
        cfg = dict(max_new_tokens=10, temperature=temp, ignore_eos=True, seed=2)
        eager = generate_ids(model, [1, 2], GenerationConfig(compile="off", **cfg))
        assert generate_ids(model, [1, 2], GenerationConfig(compile="on", **cfg)) == eager


# --- GGUF blocks -> layouts ---------------------------------------------------------------------------

gguf = pytest.importorskip("gguf")


@pytest.mark.parametrize("kind", ["Q4_0", "Q4_1", "Q4_K", "Q8_0"])
def test_gguf_blocks_decode_exactly(kind: str) -> None:
    """Our reading of each block format gives gguf's own dequantization (int4: exactly the layout's
    (q - 8) * scale + zero; Q8_0: per-row int8 within one rescaling step)."""
    from lmforge.hub.gguf_io import gguf_int4, gguf_int8

    qt = getattr(gguf.GGMLQuantizationType, kind)
    rng = np.random.default_rng(0)
    rows, cols = 6, 512
    if kind == "Q4_K":  # the gguf package cannot quantize K-quants: random blocks with finite scales
        raw = rng.integers(0, 256, size=(rows, cols // 256, 144), dtype=np.uint8)
        raw[..., 0:4] = np.frombuffer(rng.uniform(0.001, 0.05, rows * cols // 256 * 2).astype(np.float16)
                                      .tobytes(), np.uint8).reshape(rows, -1, 4)
        data = raw.reshape(rows, -1)
    else:
        data = gguf.quants.quantize(rng.standard_normal((rows, cols)).astype(np.float32), qt)
    ref = gguf.quants.dequantize(data, qt).reshape(rows, cols)
    if kind == "Q8_0":
        q, scale = gguf_int8(data, kind, rows)
        np.testing.assert_allclose(q.astype(np.float32) * scale[:, None], ref, atol=float(scale.max()) * 0.51)
    else:
        q, s, z = gguf_int4(data, kind, rows)
        deq = ((q.astype(np.float32) - 8).reshape(rows, -1, 32) * s[..., None] + z[..., None]).reshape(rows, cols)
        np.testing.assert_allclose(deq, ref, rtol=1e-5, atol=1e-6)


def test_q4_1_blocks_go_into_the_int4_layout_unrounded() -> None:
    """A Q4_1 tensor's bytes in lmforge's int4 layout: the packed bytes are the file's nibble bytes moved (byte
    4 i + j of channel c's block -> load i, lane c, byte j: both pair inputs k and k + 16), [d, m] its fp16 numbers
    bit for bit, and the layer's product is the file's dequantized product (up to the activation rounding)."""
    from lmforge.hub.gguf_io import gguf_int4

    rows, cols = 48, 256
    rng = np.random.default_rng(1)
    data = gguf.quants.quantize(rng.standard_normal((rows, cols)).astype(np.float32), gguf.GGMLQuantizationType.Q4_1)
    q, s, z = gguf_int4(data, "Q4_1", rows)
    lin = QuantLinear("int4", rows, cols, 32)
    lin.set_int4(torch.from_numpy(q), torch.from_numpy(s), torch.from_numpy(z))
    blocks = torch.from_numpy(np.ascontiguousarray(data).view(np.uint8).reshape(rows, cols // 32, 20).copy())
    if lin.kernel == "lmforge":
        want = blocks[..., 4:].reshape(rows // 16, 16, cols // 32, 4, 4).permute(0, 2, 3, 1, 4).reshape(rows, -1)
        assert torch.equal(lin.qweight, want)
        d, m = (blocks[..., a:a + 2].contiguous().view(torch.float16)[..., 0] for a in (0, 2))  # (rows, blocks)
        for i, t in enumerate((d, m)):
            assert torch.equal(lin.scales_dm[:, :, i], t.view(rows // 16, 16, -1).transpose(1, 2))
    x = torch.randn(5, cols, generator=torch.Generator().manual_seed(0)).bfloat16()
    w = torch.from_numpy(gguf.quants.dequantize(data, gguf.GGMLQuantizationType.Q4_1).reshape(rows, cols).copy())
    ref = x.double() @ w.double().t()
    assert torch.allclose(lin(x, out_dtype=torch.float32).double(), ref, atol=1e-2 * ref.abs().max().item())


@pytest.mark.parametrize("batch, keys, mask", [(1, 17, None), (8, 144, "static"), (3, 300, "slots"), (2, 1000, None)])
def test_one_query_folds_grouped_heads(batch: int, keys: int, mask: str | None) -> None:
    """A bf16 decoding step folds the query heads sharing a key/value head into one call of the fused kernel
    (CausalSelfAttention._one_query), with no mask, a static cache's (1, S) mask and a slot cache's per-row
    (B, 1, 1, S) mask: its output equals the unfolded ``enable_gqa`` call's except for rare elements rounded
    to the neighbouring bf16 value, and is as close to an fp64 reference."""
    from lmforge.models.layers import CausalSelfAttention

    attn = CausalSelfAttention(9 * 64, 9, 3)  # SmolLM2's heads: 9 query heads over 3 key/value heads
    g = torch.Generator().manual_seed(keys)
    q = torch.randn(batch, 9, 1, 64, generator=g).bfloat16()
    k, v = (torch.randn(batch, 3, keys, 64, generator=g).bfloat16() * 2 for _ in range(2))
    m = None
    if mask == "static":
        m = (torch.arange(keys) < keys - 7)[None]                                       # (1, S)
    elif mask == "slots":
        m = (torch.arange(keys)[None] < torch.randint(1, keys, (batch, 1), generator=g))[:, None, None]  # (B, 1, 1, S)
    sdpa = torch.nn.functional.scaled_dot_product_attention
    want = sdpa(q, k, v, attn_mask=m, enable_gqa=True)
    got = attn._one_query(q, k, v, 0.0, m)
    assert got.shape == want.shape and got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want.float(), atol=1e-6, rtol=2 ** -7)  # at most one bf16 step
    assert (got != want).float().mean() < 1e-3
    exact = sdpa(q.double(), k.double(), v.double(), attn_mask=m, enable_gqa=True)
    err_got, err_want = ((x.double() - exact).abs().sum() for x in (got, want))
    assert err_got <= err_want * 1.01


@pytest.mark.parametrize("cache", ["plain", "plain-blocks", "plain-unfused", "static", "slots", "slots-blocks",
                                   "slots-unfused"])
def test_bf16_batched_steps_keep_greedy(cache: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Batch-8 bf16 decoding through every KV cache (plain, static, the engine's slot cache) gives the fp32
    model's greedy tokens in every row: over the plain and slot caches by lmforge's kernels -- the whole stack
    of blocks in one call (decode_stack), or block by block (Block._step, "-blocks") -- or without them, like
    the static cache, by the folded one-query path."""
    from lmforge import kernels
    from lmforge.models import layers
    from lmforge.models.gpt import GPT

    fused = not cache.endswith("-unfused") and cache != "static"
    if cache.endswith("-unfused"):
        monkeypatch.setattr(kernels, "available", lambda: False)
    elif fused and not kernels.available():
        pytest.skip("lmforge's kernels are not built here")
    if cache.endswith("-blocks"):
        monkeypatch.setattr(GPT, "_decode_stack", lambda self: None)

    model = separated_model(block_size=320)
    fast = prepare_for_decoding(copy.deepcopy(model), "bf16")
    prompt = [int(t) for t in torch.randint(0, 96, (40,), generator=torch.Generator().manual_seed(3))]
    cfg = GenerationConfig(max_new_tokens=16, temperature=0, ignore_eos=True)
    ref = generate_ids(model, prompt, cfg)[0]
    calls = []
    orig = layers.CausalSelfAttention._one_query

    def spy(self, q, *a):  # noqa: ANN001, ANN202
        calls.append(q.shape[0])
        return orig(self, q, *a)

    layers.CausalSelfAttention._one_query = spy
    steps = []
    orig_step = layers.Block._step
    monkeypatch.setattr(layers.Block, "_step", lambda self, x, *a: steps.append(x.shape[0]) or orig_step(self, x, *a))
    if fused and not cache.endswith("-blocks"):  # one decode_stack call per step stands for its blocks' steps
        orig_stack = torch.ops.lmforge.decode_stack
        monkeypatch.setattr(torch.ops.lmforge, "decode_stack",
                            lambda x, *a: steps.append(x.shape[0]) or orig_stack(x, *a))
    try:
        with torch.no_grad():
            if cache.startswith("plain"):
                rows = generate_ids(fast, prompt, dataclasses.replace(cfg, num_return_sequences=8))
            elif cache == "static":
                dec = StaticDecoder(fast, 8, len(prompt) + 16, cfg, compile=False)
                toks = [dec.prefill(torch.tensor([prompt] * 8))]
                for _ in range(15):
                    toks.append(dec.step(toks[-1]))
                rows = torch.stack(toks, 1).tolist()
            else:
                slots = fast.init_slots(8, 320)
                slots.select(torch.arange(8), torch.full((8,), len(prompt)))
                logits, _ = fast.forward_logits(torch.tensor([prompt] * 8), slots, last_only=True)
                toks = [logits[:, -1].float().argmax(-1)]
                for _ in range(15):
                    slots.select(slice(0, 8))
                    logits, _ = fast.forward_logits(toks[-1][:, None], slots)
                    toks.append(logits[:, -1].float().argmax(-1))
                rows = torch.stack(toks, 1).tolist()
    finally:
        layers.CausalSelfAttention._one_query = orig
    assert rows == [ref] * 8
    taken = steps if fused else calls
    assert taken and set(taken) == {8}  # every step of the 8 rows took the fused step / the one-query path
    assert not (calls if fused else steps)


@pytest.mark.parametrize("batch, keys, mask", [(1, 300, None), (2, 300, "static"), (3, 300, "slots")])
def test_one_query_without_grouped_heads_takes_three_ops(batch: int, keys: int, mask: str | None) -> None:
    """Without grouped heads (nothing to fold) a bf16 step over >= one_query_min_keys() keys attends by three fp32
    ops: as accurate as the fused kernel against fp64, with any cache's mask; below the threshold, the kernel."""
    from lmforge.models import layers

    attn = layers.CausalSelfAttention(4 * 64, 4)
    g = torch.Generator().manual_seed(keys)
    q = torch.randn(batch, 4, 1, 64, generator=g).bfloat16()
    k, v = (torch.randn(batch, 4, keys, 64, generator=g).bfloat16() * 2 for _ in range(2))
    m = None
    if mask == "static":
        m = (torch.arange(keys) < keys - 7)[None]
    elif mask == "slots":
        m = (torch.arange(keys)[None] < torch.randint(1, keys, (batch, 1), generator=g))[:, None, None]
    sdpa = torch.nn.functional.scaled_dot_product_attention
    calls = []
    orig_sdpa, orig_min = layers.F.scaled_dot_product_attention, layers.one_query_min_keys
    layers.F.scaled_dot_product_attention = lambda *a, **kw: calls.append(1) or orig_sdpa(*a, **kw)
    layers.one_query_min_keys = lambda: 256
    try:
        got = attn._one_query(q, k, v, 0.0, m)
        assert not calls  # 300 >= 256 keys: no fused call
        attn._one_query(q, k[:, :, :200], v[:, :, :200], 0.0, None if m is None else m[..., :200])
        assert calls  # 200 keys: the fused kernel
    finally:
        layers.F.scaled_dot_product_attention, layers.one_query_min_keys = orig_sdpa, orig_min
    want = sdpa(q, k, v, attn_mask=m)
    assert got.shape == want.shape and got.dtype == torch.bfloat16
    exact = sdpa(q.double(), k.double(), v.double(), attn_mask=m)
    assert (got.double() - exact).abs().max() <= exact.abs().max() * 2 ** -8  # one rounding to bf16
    err_got, err_want = ((x.double() - exact).abs().sum() for x in (got, want))
    assert err_got <= err_want * 1.01  # at least as accurate as the fused kernel


def test_mha_bf16_steps_over_many_keys_keep_greedy() -> None:
    """A GPT without grouped heads, decoding in bf16 past the three-op threshold, keeps the fp32 model's greedy."""
    from lmforge.models import layers

    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=96, block_size=320, n_layer=2, n_head=4, n_embd=64, pos="rope", norm="rmsnorm",
                          mlp="swiglu", tie_embeddings=False)).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(12.0)
    fast = prepare_for_decoding(copy.deepcopy(model), "bf16")
    prompt = [int(t) for t in torch.randint(0, 96, (250,), generator=torch.Generator().manual_seed(3))]
    cfg = GenerationConfig(max_new_tokens=16, temperature=0, ignore_eos=True)
    orig_min = layers.one_query_min_keys
    layers.one_query_min_keys = lambda: 256  # the last 11 steps take the three ops
    try:
        assert generate_ids(fast, prompt, cfg)[0] == generate_ids(model, prompt, cfg)[0]
    finally:
        layers.one_query_min_keys = orig_min
