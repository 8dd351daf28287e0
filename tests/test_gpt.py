from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from lmforge.errors import LMForgeError
from lmforge.models.gpt import GPT, PRESETS, GPTConfig
from lmforge.models.layers import attention_reference, rope_tables, sinusoidal_table

VARIANTS = [
    dict(pos="learned", norm="layernorm", mlp="gelu", bias=True),
    dict(pos="sinusoidal", norm="rmsnorm", mlp="gelu"),
    dict(pos="rope", norm="rmsnorm", mlp="swiglu", n_kv_head=2, tie_embeddings=False),
]


def small(**kw) -> GPT:
    torch.manual_seed(0)
    cfg = dict(vocab_size=61, block_size=24, n_layer=2, n_head=4, n_embd=32)
    cfg.update(kw)
    return GPT(GPTConfig(**cfg)).eval()


def naive_gpt_logits(m: GPT, idx: torch.Tensor) -> torch.Tensor:
    """The same network computed with the textbook attention formula, head by head."""
    c = m.config
    B, T = idx.shape
    x = m.wte(idx)
    if c.pos == "learned":
        x = x + m.wpe.weight[:T]
    elif c.pos == "sinusoidal":
        x = x + sinusoidal_table(T, c.n_embd)
    hd = c.n_embd // c.n_head
    mask = torch.ones(T, T, dtype=torch.bool).tril()
    for blk in m.blocks:
        h = blk.ln_1(x)
        q, k, v = blk.attn.qkv(h).split([c.n_head * hd, blk.attn.n_kv_head * hd, blk.attn.n_kv_head * hd], -1)
        heads = []
        for i in range(c.n_head):
            j = i // (c.n_head // blk.attn.n_kv_head)  # the K/V head this query head shares
            qi, ki, vi = q[..., i * hd:(i + 1) * hd], k[..., j * hd:(j + 1) * hd], v[..., j * hd:(j + 1) * hd]
            if c.pos == "rope":
                cos, sin = rope_tables(T, hd)
                qi, ki = (t * cos + torch.cat([-t[..., hd // 2:], t[..., :hd // 2]], -1) * sin for t in (qi, ki))
            heads.append(attention_reference(qi, ki, vi, mask))
        x = x + blk.attn.proj(torch.cat(heads, dim=-1))  # Concat(head_1..head_h) W^O
        x = x + blk.mlp(blk.ln_2(x))
    return m.lm_head(m.ln_f(x))


def test_attention_reference_matches_sdpa() -> None:
    torch.manual_seed(1)
    q, k, v = (torch.randn(2, 3, 7, 8) for _ in range(3))
    mask = torch.ones(7, 7, dtype=torch.bool).tril()
    ref = attention_reference(q, k, v, mask)
    fast = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(ref, fast, atol=1e-5, rtol=1e-5)
    # softmax(QK^T/sqrt(d)) by hand for one query
    s = (q[0, 0, 3] @ k[0, 0, :4].T) / math.sqrt(8)
    torch.testing.assert_close(torch.softmax(s, -1) @ v[0, 0, :4], ref[0, 0, 3], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("variant", VARIANTS)
def test_gpt_matches_naive_reference(variant: dict) -> None:
    m = small(**variant)
    idx = torch.randint(0, 61, (2, 17))
    logits, _ = m(idx)
    torch.testing.assert_close(logits, naive_gpt_logits(m, idx), atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("variant", VARIANTS)
def test_kv_cache_matches_full_forward(variant: dict) -> None:
    m = small(**variant)
    idx = torch.randint(0, 61, (3, 20))
    full, _ = m(idx)
    cache = m.init_state(3, 24)
    parts = [m(idx[:, :5], cache=cache)[0], m(idx[:, 5:12], cache=cache)[0]]
    parts += [m(idx[:, t:t + 1], cache=cache)[0] for t in range(12, 20)]
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-5, rtol=1e-5)
    assert cache.pos == 20


def test_causality() -> None:
    m = small()
    idx = torch.randint(0, 61, (1, 16))
    a, _ = m(idx)
    idx2 = idx.clone()
    idx2[0, 10:] = (idx2[0, 10:] + 1) % 61
    b, _ = m(idx2)
    torch.testing.assert_close(a[:, :10], b[:, :10])  # the future never leaks into the past
    assert not torch.allclose(a[:, 10:], b[:, 10:])


def test_chain_rule_sequence_probability() -> None:
    """log p(x_1..x_T | x_0) = sum_t log p(x_t | x_<t): score() equals the step-by-step product."""
    m = small()
    seq = torch.randint(0, 61, (1, 12))
    logp, _ = m.score(seq[:, :-1], seq[:, 1:])
    stepwise = 0.0
    for t in range(1, 12):
        logits, _ = m(seq[:, :t])
        stepwise += torch.log_softmax(logits[0, -1], -1)[seq[0, t]].item()
    assert abs(logp.sum().item() - stepwise) < 1e-4
    _, loss = m(seq[:, :-1], seq[:, 1:])
    assert abs(loss.item() + logp.mean().item()) < 1e-5  # the training loss is the mean NLL


def test_weight_tying_and_param_groups() -> None:
    tied, untied = small(), small(tie_embeddings=False)
    assert tied.lm_head.weight is tied.wte.weight
    assert untied.num_parameters() == tied.num_parameters() + 61 * 32
    groups = tied.param_groups(0.1)
    assert all(p.dim() >= 2 for p in groups[0]["params"]) and all(p.dim() < 2 for p in groups[1]["params"])
    n = sum(p.numel() for g in groups for p in g["params"])
    assert n == tied.num_parameters()


def test_presets_and_config_errors() -> None:
    assert set(PRESETS) >= {"tiny", "small", "gpt2"}
    g = GPTConfig(**{**PRESETS["gpt2"]})
    m = GPT(g)
    assert abs(m.num_parameters() - 124_439_808) < 1e6  # GPT-2 small, 124M
    with pytest.raises(LMForgeError, match="divisible"):
        GPTConfig(n_embd=30, n_head=4)
    with pytest.raises(LMForgeError, match=r"pos \(--pos\) must be one of learned, sinusoidal, rope"):
        GPTConfig(pos="alibi")
    with pytest.raises(LMForgeError, match="unknown gpt preset"):
        GPT.from_preset("huge", 10)


def test_context_overflow_is_an_error() -> None:
    m = small()
    with pytest.raises(ValueError, match="exceeds the context"):
        m(torch.zeros(1, 25, dtype=torch.long))


def test_save_load_round_trip(tmp_path) -> None:
    for variant in VARIANTS:
        m = small(**variant)
        m.save_pretrained(tmp_path / variant["pos"])
        again = GPT.from_pretrained(tmp_path / variant["pos"])
        idx = torch.randint(0, 61, (1, 10))
        torch.testing.assert_close(m(idx)[0], again(idx)[0])
