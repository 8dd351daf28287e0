"""Speculative decoding: greedy output identical to plain decoding, and sampling that keeps the target's
distribution (the Leviathan/Chen acceptance rule, checked with a chi-square test)."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

from lmforge.generation import GenerationConfig, generate_ids, speculative
from lmforge.generation.fast import prepare_for_decoding
from lmforge.generation.speculative import ModelDrafter, PromptLookup, accept_drafts, verify_rows
from lmforge.models.gpt import GPT, GPTConfig
from lmforge.models.ngram import NGramModel
from lmforge.models.quant import kernel_rows


def gpt(seed: int, vocab: int = 48, head_scale: float = 12.0) -> GPT:
    torch.manual_seed(seed)
    m = GPT(GPTConfig(vocab_size=vocab, block_size=128, n_layer=2, n_head=4, n_kv_head=2, n_embd=64, pos="rope",
                      norm="rmsnorm", mlp="swiglu", tie_embeddings=False)).eval()
    with torch.no_grad():
        m.lm_head.weight.mul_(head_scale)  # well-separated logits: no near-ties for greedy to flip
    return m


def chi2_critical(df: int, z: float = 3.719) -> float:
    """Upper quantile of chi-square (Wilson-Hilferty); z = 3.719 is the normal's 1e-4 upper quantile."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def chi2(counts: np.ndarray, probs: np.ndarray) -> tuple[float, int]:
    """Pearson's statistic, cells with expected count < 5 pooled."""
    n = counts.sum()
    exp = probs * n
    big = exp >= 5
    c = np.append(counts[big], counts[~big].sum())
    e = np.append(exp[big], exp[~big].sum())
    keep = e > 0
    return float(((c[keep] - e[keep]) ** 2 / e[keep]).sum()), int(keep.sum()) - 1


@pytest.mark.parametrize("draft", ["prompt-lookup", "model", "self", "ngram"])
def test_greedy_identical_to_plain(draft: str) -> None:
    target = gpt(0)
    if draft == "model":
        spec = gpt(1)
    elif draft == "self":
        spec = copy.deepcopy(target)  # a perfect draft: every token accepted
    elif draft == "ngram":  # an n-gram trained on text (here: the target's own greedy output on other prompts)
        corpus = sum((generate_ids(target, [p, p + 1], GenerationConfig(max_new_tokens=40, temperature=0,
                                                                       ignore_eos=True))[0] for p in range(8)), [])
        spec = NGramModel.train(np.array(corpus), 3, 48, eos=47, bos=46, discount_fallback=True)
    else:
        spec = draft
    prompt = [5, 17, 42, 8, 5, 17, 42, 8, 5, 17]  # repetitive: prompt lookup has something to find
    for k in (1, 4):
        cfg = dict(max_new_tokens=40, temperature=0, ignore_eos=True)
        plain = generate_ids(target, prompt, GenerationConfig(**cfg))
        fast = generate_ids(target, prompt, GenerationConfig(speculative=spec, draft_tokens=k, **cfg))
        assert fast == plain
        st = speculative.last_stats
        assert st.emitted == 39 and st.rounds <= 39  # the first token comes from the prompt's pass
        if draft == "self":
            assert st.acceptance_rate == 1.0 and st.rounds == math.ceil(39 / (k + 1))


def test_stops_at_eos_and_callback_like_plain() -> None:
    target = gpt(0)
    plain_all = generate_ids(target, [3, 4], GenerationConfig(max_new_tokens=30, temperature=0, ignore_eos=True))[0]
    eos = plain_all[12]
    cfg = dict(max_new_tokens=30, temperature=0, eos_token_id=eos)
    plain = generate_ids(target, [3, 4], GenerationConfig(**cfg))
    spec = generate_ids(target, [3, 4], GenerationConfig(speculative=copy.deepcopy(target), **cfg))
    assert spec == plain and len(plain[0]) == plain_all.index(eos)
    seen = []
    generate_ids(target, [3, 4], GenerationConfig(speculative="prompt-lookup", max_new_tokens=30, temperature=0,
                                                  ignore_eos=True), on_token=lambda t: seen.append(t.shape[1]) or
                 t.shape[1] >= 7)
    assert seen == list(range(1, 8))


def test_prompt_lookup_proposes_the_continuation() -> None:
    pl = PromptLookup(growth=2)
    pl.start([], 0)
    toks = [1, 2, 3, 4, 5, 9, 2, 3]
    assert pl.propose(toks, 3, None, None) == ([4, 5, 9], None)  # "2 3" was followed by 4 5 9
    assert PromptLookup(4, 2).propose(toks + [4, 5, 1, 3], 2, None, None) == ([], None)  # "1 3" never seen
    assert pl.propose(toks + [4, 5, 1, 3], 2, None, None) == ([4, 5], None)  # ... but "3" was
    assert PromptLookup(2, 1, growth=2).propose(toks + [5], 2, None, None) == ([9, 2], None)  # unigram "5"
    assert PromptLookup().propose(toks + [5], 2, None, None) == ([9], None)  # as many as matched (growth 1)


def test_prompt_lookup_prefers_the_longest_match() -> None:
    """The longest earlier suffix wins over a more recent shorter one; among equally long matches the
    latest; the draft is at most ``growth`` x the match length (and ``k``)."""
    a, b, c, x, y = 10, 11, 12, 20, 21
    #         0  1  2  3  4  5  6  7  8  9  10 11 12 13
    toks = [a, b, c, 1, 2, 3, 4, 5, 6, x, c, 7, 8, a, b, c]
    pl = PromptLookup(growth=2)  # one instance follows one growing sequence (start() resets it)
    assert pl.match(toks) == (3, 2)  # "a b c" at 0..2, not the more recent unigram "c" at 10
    assert pl.propose(toks, 16, None, None) == ([1, 2, 3, 4, 5, 6], None)  # 2 x 3 tokens
    assert pl.propose(toks, 4, None, None) == ([1, 2, 3, 4], None)  # capped by k
    assert PromptLookup().propose(toks, 16, None, None) == ([1, 2, 3], None)  # growth 1: 3 tokens
    toks2 = [x, c, 1, y, c, 2, y, c]  # "y c" occurs at 3..4 only; "c" latest at 4
    assert PromptLookup().match(toks2) == (2, 4)
    assert PromptLookup(growth=2).propose(toks2, 8, None, None) == ([2, y, c], None)
    assert PromptLookup().match([x, y, 5]) == (0, None)
    # a copied span keeps being drafted from where the last draft stopped
    span = list(range(100, 140))
    seq = span + [7] + span[:10]
    pl.start(seq, 0)
    assert pl.match(seq) == (8, 9) and pl.propose(seq, 15, None, None)[0] == span[10:25]


def test_verify_passes_fill_kernel_blocks() -> None:
    assert [verify_rows(d, 4) for d in range(13)] == [0, 1, 2, 3, 3, 3, 3, 7, 7, 7, 7, 11, 11]
    assert [verify_rows(d, 1) for d in range(5)] == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("layout", ["int8", "int4"])
def test_greedy_identical_with_quantized_target(layout: str) -> None:
    """A laid-out target verifies in passes that fill its kernels' blocks (1-4 or 8 rows; 1-8 for lmforge's int8
    and int4 kernels) and still decodes exactly plain greedy's tokens. (bf16 activations make a row's logits
    depend on the pass's length in the last bits, so the head is scaled further to keep this tiny model's greedy
    choices clear of such ties.)"""
    target = prepare_for_decoding(gpt(0, head_scale=30.0), layout)
    block = kernel_rows(layout)  # 4 (PyTorch's kernels) or 8 (lmforge's)
    allowed = {r for r in range(1, 11) if r <= block or r % block == 0}
    prompt = [5, 17, 42, 8, 5, 17, 42, 8, 5, 17, 42, 8, 5, 17]
    cfg = dict(max_new_tokens=40, temperature=0, ignore_eos=True)
    plain = generate_ids(target, prompt, GenerationConfig(**cfg))
    rows: list[int] = []
    forward = target.forward_logits
    self_draft = copy.deepcopy(target)

    def recording(ids: torch.Tensor, state: object = None, last_only: bool = False) -> object:
        rows.append(ids.shape[1])
        return forward(ids, state, last_only)

    target.forward_logits = recording  # type: ignore[method-assign]
    for draft in ("prompt-lookup", self_draft):  # the second always drafts all it may (7 of 9)
        rows.clear()
        fast = generate_ids(target, prompt, GenerationConfig(speculative=draft, draft_tokens=9, **cfg))
        assert fast == plain
        assert rows[0] == len(prompt) and set(rows[1:]) <= allowed
    assert rows[1:5] == [8, 8, 8, 8]  # 4 x 8 of the 39 tokens after the first, then what is left


def test_acceptance_rule_keeps_the_target_distribution() -> None:
    """The first emitted token of a round, over many rounds, is distributed as p -- for a sampled draft q
    and for a deterministic (point-mass) draft -- while the draft's own tokens are not (a control)."""
    g = torch.Generator().manual_seed(0)
    V = 6
    p = torch.tensor([[0.05, 0.4, 0.1, 0.25, 0.15, 0.05], [0.2, 0.2, 0.2, 0.1, 0.2, 0.1]])
    q = torch.tensor([[0.3, 0.1, 0.3, 0.1, 0.1, 0.1]])
    N = 20000
    firsts = np.zeros(V)
    drafts_only = np.zeros(V)
    point = np.zeros(V)
    for _ in range(N):
        d = int(torch.multinomial(q[0], 1, generator=g))
        n_acc, extra = accept_drafts(p, [d], q, greedy=False, generator=g)
        firsts[d if n_acc == 1 else extra] += 1
        drafts_only[d] += 1
        n_acc, extra = accept_drafts(p, [2], None, greedy=False, generator=g)  # prompt lookup proposes 2
        point[2 if n_acc == 1 else extra] += 1
    target = p[0].numpy().astype(float)
    for counts in (firsts, point):
        stat, df = chi2(counts, target)
        assert stat < chi2_critical(df), (stat, counts / N)
    stat, df = chi2(drafts_only, target)
    assert stat > 10 * chi2_critical(df)  # the test can tell q from p


def test_sampled_generation_keeps_the_target_distribution() -> None:
    """End to end on a tiny model: the joint distribution of the first two sampled tokens under
    speculative decoding (a different draft model, K = 2) matches the target's, computed exactly."""
    V = 5
    target, draft = gpt(3, vocab=V, head_scale=6.0), gpt(4, vocab=V, head_scale=6.0)
    prompt = [1, 2]
    with torch.no_grad():
        p1 = torch.softmax(target(torch.tensor([prompt]))[0][0, -1], -1)
        joint = torch.stack([p1[a] * torch.softmax(target(torch.tensor([prompt + [a]]))[0][0, -1], -1)
                             for a in range(V)]).flatten().numpy().astype(float)
        q1 = torch.softmax(draft(torch.tensor([prompt]))[0][0, -1], -1)
    assert 0.5 * (p1 - q1).abs().sum() > 0.15  # the draft is a poor guess, so acceptance matters
    N = 1500
    counts = np.zeros(V * V)
    drafter = ModelDrafter(draft)
    for seed in range(N):
        out = generate_ids(target, prompt, GenerationConfig(max_new_tokens=2, temperature=1.0, ignore_eos=True,
                                                            seed=seed, speculative=drafter, draft_tokens=2))[0]
        counts[out[0] * V + out[1]] += 1
    stat, df = chi2(counts, joint)
    assert stat < chi2_critical(df), (stat, df)


def test_cli_speculative_and_int4(trained_run, capsys) -> None:  # noqa: ANN001
    from lmforge.cli import main

    base = ["generate", str(trained_run), "--prompt", "ROMEO:", "--max-new-tokens", "16",
            "--temperature", "0", "--ignore-eos"]
    assert main(base) == 0
    plain = capsys.readouterr().out
    assert main(base + ["--speculative", "prompt-lookup", "--draft-tokens", "3"]) == 0
    out = capsys.readouterr()
    assert out.out == plain and "drafted tokens accepted" in out.err
    assert main(base + ["--speculative", str(trained_run)]) == 0  # the model drafting for itself
    out = capsys.readouterr()
    assert out.out == plain and "(100.0%)" in out.err
    assert main(base + ["--dtype", "int4", "--group-size", "64", "--compile", "off"]) == 0
    assert capsys.readouterr().out.startswith("ROMEO:")
    assert main(base + ["--speculative", "no/such/run"]) == 2
