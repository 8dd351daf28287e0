"""n-gram models: hand-computed smoothing values, normalisation, KenLM parity, ARPA round trip, bad input."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from lmforge.cli import main
from lmforge.errors import LMForgeError
from lmforge.hub.arpa import escape, export_arpa, import_arpa, unescape
from lmforge.models import load_model
from lmforge.models.ngram import SMOOTHINGS, NGramModel
from lmforge.tokenizers.word import WordTokenizer
from lmforge.utils import read_json

# a tiny corpus whose counts are easy to do by hand
CORPUS = "a b\na a\nb\n"


def build(order: int, smoothing: str, text: str = CORPUS, **kw) -> NGramModel:
    tok = WordTokenizer.train([text])
    m = NGramModel.train(tok.encode_array(text), order, tok.vocab_size, eos=tok.eot_id, bos=tok.bos_id,
                         unk=tok.unk_id, smoothing=smoothing, **kw)
    m.tokenizer = tok
    return m


def prob(m: NGramModel, context: list[str], word: str) -> float:
    tok = m.tokenizer
    ids = [tok.index[w] for w in context]
    return float(np.exp(m.distribution(ids)[tok.index[word]]))


def test_word_tokenizer() -> None:
    tok = WordTokenizer.train(["the cat\nthe dog the\n"], min_count=2)
    assert tok.words[:4] == ["<s>", "</s>", "<unk>", "the"]
    assert tok.encode("the cat\nthe") == [3, 2, 1, 3]  # cat is rare -> <unk>; a complete line gets </s>
    assert tok.decode([3, 2, 1, 3]) == "the <unk>\nthe"
    low = WordTokenizer.train(["Hello, World!\n"], pattern=r"\w+|[^\w\s]", lowercase=True)
    assert [low.id_to_token(i) for i in low.encode("Hello, World!")] == ["hello", ",", "world", "!"]


def test_mle_and_add_k_by_hand() -> None:
    # sentences: <s> a b </s> | <s> a a </s> | <s> b </s>; unigram tokens (no <s>): a:3 b:2 </s>:3 = 8
    m = build(1, "mle")
    assert prob(m, [], "a") == pytest.approx(3 / 8) and prob(m, [], "<unk>") == 0.0
    m2 = build(2, "mle")
    assert prob(m2, ["a"], "b") == pytest.approx(1 / 3)  # c(a b) / c(a .) = 1/3
    assert prob(m2, ["<s>"], "a") == pytest.approx(2 / 3)
    lap = build(1, "add-k", k=1.0)  # V without <s> = {</s>, <unk>, a, b} = 4
    assert prob(lap, [], "a") == pytest.approx((3 + 1) / (8 + 4))
    assert prob(lap, [], "<unk>") == pytest.approx(1 / 12)


def test_witten_bell_by_hand() -> None:
    m = build(2, "witten-bell")
    # unigram: D = 8, T = 3 types seen  ->  p(a) = 3/11 + 3/11 * 1/4
    p_a = 3 / 11 + 3 / 11 / 4
    assert prob(m, [], "a") == pytest.approx(p_a)
    # context a: followed by b, a, </s> (D = 3, T = 3): p(b | a) = 1/6 + 3/6 * p(b)
    p_b = 2 / 11 + 3 / 11 / 4
    assert prob(m, ["a"], "b") == pytest.approx(1 / 6 + 0.5 * p_b)


def test_kneser_ney_by_hand() -> None:
    m = build(2, "kneser-ney", discount_fallback=True)
    # highest order (bigrams) keeps raw counts: t1 = 4 (<s> b, a b, a a, a </s>), t2 = 2 (<s> a, b </s>)
    d2 = 4 / (4 + 2 * 2)
    # unigram continuation counts: a <- {<s>, a} = 2, b <- {a, <s>} = 2, </s> <- {b, a} = 2: t1 = 0 -> fallback
    # p_uni(b) = (2 - 0.5) / 6 + (0.5 * 3 / 6) / 4
    p_b = 1.5 / 6 + 0.25 / 4
    assert prob(m, [], "b") == pytest.approx(p_b)
    # after a: a b, a a, a </s> (once each): p(b | a) = (1 - d2) / 3 + d2 * 3 / 3 * p_uni(b)
    assert prob(m, ["a"], "b") == pytest.approx((1 - d2) / 3 + d2 * p_b)


def test_modified_kneser_ney_discounts_and_formula() -> None:
    text = "a b c\na b d\na c d\nb c d\na b c d\nc a b\n"
    m = build(2, "modified-kneser-ney", text=text, discount_fallback=True)
    tok = m.tokenizer
    ids = tok.encode_array(text)
    # recount by hand (Python dicts are fine in a test)
    seq = []
    for line in text.splitlines():
        seq += [["<s>"] + line.split() + ["</s>"]]
    big: dict[tuple[str, str], int] = {}
    for s in seq:
        for x, y in zip(s, s[1:]):
            big[(x, y)] = big.get((x, y), 0) + 1
    t = [sum(1 for c in big.values() if c == k) for k in (1, 2, 3, 4)]
    y = t[0] / (t[0] + 2 * t[1])
    d = [k - (k + 1) * y * t[k] / t[k - 1] if t[k - 1] else -1.0 for k in (1, 2, 3)]  # Chen & Goodman
    if all(0 < d[k - 1] < k for k in (1, 2, 3)):
        assert m.meta["discounts"][1] == pytest.approx(d)
    else:
        assert m.meta["discounts"][1] == [0.5, 1.0, 1.5]
    d1, d2, d3 = m.meta["discounts"][1]
    follow = {w: c for (h, w), c in big.items() if h == "a"}
    denom = sum(follow.values())
    dk = {1: d1, 2: d2}
    gamma = sum(dk.get(c, d3) for c in follow.values()) / denom
    del ids
    p_uni_b = float(np.exp(m.logp[0][tok.index["b"]]))  # the continuation unigram, checked elsewhere
    expected = (follow["b"] - dk.get(follow["b"], d3)) / denom + gamma * p_uni_b
    assert prob(m, ["a"], "b") == pytest.approx(expected)


@pytest.mark.parametrize("smoothing", [s for s in SMOOTHINGS if s != "mle"])
@pytest.mark.parametrize("order", [1, 2, 3, 6])
def test_distributions_sum_to_one(smoothing: str, order: int, tiny_text: str) -> None:
    m = build(order, smoothing, text=tiny_text, discount_fallback=True)
    tok = m.tokenizer
    for ctx in ([], ["<s>"], ["the"], ["<s>", "the"], ["zzz-unseen", "of"], ["of", "the", "king", "and", "a"]):
        ids = [tok.index.get(w, tok.unk_id) for w in ctx]
        d = np.exp(m.distribution(ids))
        assert d.sum() == pytest.approx(1.0, abs=1e-9)
        assert d[tok.bos_id] == 0.0  # <s> is never predicted


@pytest.fixture(scope="module")
def tiny_text() -> str:
    from .conftest import sample_text

    return sample_text(40_000)


def test_stream_scoring_matches_distribution(tiny_text: str) -> None:
    m = build(4, "modified-kneser-ney", text=tiny_text, discount_fallback=True)
    tok = m.tokenizer
    ids = tok.encode_array(tiny_text[:3000])
    lp, _ = m.score(torch.from_numpy(ids[None, :-1]), torch.from_numpy(ids[None, 1:]))
    for t in (0, 5, 17, 40, 99):
        ctx = [tok.eot_id] + ids[: t + 1].tolist()
        assert lp[0, t].item() == pytest.approx(m.distribution(ctx)[ids[t + 1]], abs=1e-9)


def test_kenlm_parity_and_arpa_round_trip(tmp_path: Path, tiny_text: str) -> None:
    kenlm = pytest.importorskip("kenlm")
    lines = tiny_text.splitlines()
    train, test = "\n".join(lines[:800]) + "\n", lines[800:1000]
    m = build(3, "modified-kneser-ney", text=train, discount_fallback=True)
    export_arpa(m, tmp_path / "m.arpa")
    k = kenlm.Model(str(tmp_path / "m.arpa"))
    again = import_arpa(tmp_path / "m.arpa")
    tok = m.tokenizer
    checked = 0
    for line in test:
        if not line.split():
            continue
        ids = np.array(tok.encode(line + "\n"))
        ctx = np.concatenate([[tok.eot_id], ids[:-1]])
        ours = m.score(torch.from_numpy(ctx[None]), torch.from_numpy(ids[None]))[0].sum().item() / math.log(10)
        assert ours == pytest.approx(k.score(" ".join(line.split()), bos=True, eos=True), abs=1e-4)
        ids2 = np.array(again.tokenizer.encode(line + "\n"))
        ctx2 = np.concatenate([[again.eos], ids2[:-1]])
        theirs = again.score(torch.from_numpy(ctx2[None]), torch.from_numpy(ids2[None]))[0].sum().item()
        assert theirs / math.log(10) == pytest.approx(ours, abs=1e-4)
        checked += 1
    assert checked > 50


def test_char_level_ngram_through_cli(tmp_path: Path, char_data: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "kn"
    assert main(["train", "--model", "ngram", "--order", "4", "--data", str(char_data), "--out", str(out)]) == 0
    m = load_model(out)
    assert isinstance(m, NGramModel) and m.bos == m.tokenizer.vocab_size  # a virtual <s> for char data
    assert main(["eval", str(out), "--split", "test", "--json"]) == 0
    assert main(["generate", str(out), "--prompt", "ROMEO:", "--max-new-tokens", "20", "--seed", "3"]) == 0
    assert main(["ngram", "export", str(out), str(tmp_path / "c.arpa")]) == 0
    assert main(["ngram", "import", str(tmp_path / "c.arpa"), "--out", str(tmp_path / "imp"),
                 "--tokenizer-from", str(char_data)]) == 0
    a, b = load_model(out), load_model(tmp_path / "imp")
    x = torch.from_numpy(np.array([[5, 6, 7, 8, 9, 10]]))
    y = torch.from_numpy(np.array([[6, 7, 8, 9, 10, 11]]))
    torch.testing.assert_close(a.score(x, y)[0], b.score(x, y)[0], atol=1e-5, rtol=1e-6)
    assert escape(" \n\\é") == "\\x20\\n\\\\é" and unescape(escape(" \n\\é\t")) == " \n\\é\t"


def test_query_output(tmp_path: Path, tiny_text: str, monkeypatch: pytest.MonkeyPatch,
                      capsys: pytest.CaptureFixture) -> None:
    import io

    m = build(3, "modified-kneser-ney", text=tiny_text, discount_fallback=True)
    m.save_pretrained(tmp_path / "r")
    monkeypatch.setattr("sys.stdin", io.StringIO("the king\nzzzz qqq\n"))
    assert main(["ngram", "query", str(tmp_path / "r")]) == 0
    out = capsys.readouterr().out
    assert "Total:" in out and "OOV: 2" in out and "Perplexity including OOVs:" in out
    assert "Perplexity excluding OOVs:" in out and "</s>=1" in out


def test_bad_input(tmp_path: Path, char_data: Path) -> None:
    with pytest.raises(LMForgeError, match="order must be at least 1"):
        build(0, "mle")
    with pytest.raises(LMForgeError, match="unknown smoothing"):
        build(2, "good-turing")
    with pytest.raises(LMForgeError, match="empty"):
        NGramModel.train(np.array([], dtype=np.int64), 2, 5, eos=1, bos=0)
    with pytest.raises(LMForgeError, match="discount_fallback|--discount-fallback"):
        build(2, "modified-kneser-ney", text="a b\n")
    with pytest.warns(UserWarning, match="falling back"):
        build(2, "modified-kneser-ney", text="a b\n", discount_fallback=True)
    good = tmp_path / "g.arpa"
    export_arpa(build(2, "kneser-ney", discount_fallback=True), good)
    lines = good.read_text().splitlines()
    (tmp_path / "trunc.arpa").write_text("\n".join(lines[:-4]) + "\n")
    with pytest.raises(LMForgeError, match=r"trunc\.arpa:\d+: .*truncated"):
        import_arpa(tmp_path / "trunc.arpa")
    bad = [ln if not ln.startswith("-") else "x" + ln for ln in lines]
    (tmp_path / "bad.arpa").write_text("\n".join(bad) + "\n")
    with pytest.raises(LMForgeError, match=r"bad\.arpa:\d+: malformed"):
        import_arpa(tmp_path / "bad.arpa")
    assert main(["train", "--model", "ngram", "--order", "0", "--data", str(char_data), "--out",
                 str(tmp_path / "o")]) == 2


def test_modified_kn_discount_estimator() -> None:
    from lmforge.models.ngram import modified_kn_discounts

    a = np.array([1] * 10 + [2] * 5 + [3] * 3 + [4] * 2 + [7] * 4, dtype=float)
    # Y = 10 / (10 + 2*5) = 0.5;  D1 = 1 - 2Y*5/10 = 0.5;  D2 = 2 - 3Y*3/5 = 1.1;  D3+ = 3 - 4Y*2/3
    assert modified_kn_discounts(a, 2, False) == pytest.approx((0.5, 1.1, 3 - 4 * 0.5 * 2 / 3))


def _lmplz() -> str | None:
    import os
    import shutil

    return os.environ.get("LMPLZ") or shutil.which("lmplz")


@pytest.mark.skipif(_lmplz() is None, reason="KenLM's lmplz is not installed (set LMPLZ=/path/to/lmplz)")
def test_same_probabilities_as_lmplz(tmp_path: Path, tiny_text: str) -> None:
    import subprocess

    kenlm = pytest.importorskip("kenlm")
    lines = [" ".join(ln.split()) for ln in tiny_text.splitlines() if ln.split()]
    train, test = "\n".join(lines[:900]) + "\n", lines[900:]
    (tmp_path / "train.txt").write_text(train)
    with open(tmp_path / "train.txt") as src, open(tmp_path / "lmplz.arpa", "w") as dst:
        subprocess.run([_lmplz(), "-o", "3", "-S", "200M", "--discount_fallback"], stdin=src, stdout=dst,
                       stderr=subprocess.DEVNULL, check=True)
    k = kenlm.Model(str(tmp_path / "lmplz.arpa"))
    m = build(3, "modified-kneser-ney", text=train, discount_fallback=True)
    tok = m.tokenizer
    for line in test:
        ids = np.array(tok.encode(line + "\n"))
        ctx = np.concatenate([[tok.eot_id], ids[:-1]])
        ours = m.score(torch.from_numpy(ctx[None]), torch.from_numpy(ids[None]))[0].sum().item() / math.log(10)
        assert ours == pytest.approx(k.score(line, bos=True, eos=True), abs=1e-4)


def test_ngram_token_budget_counts_the_first_tokens(tmp_path: Path, char_data: Path) -> None:
    """`lmforge train --model ngram --max-tokens N` counts the first N training tokens (once)."""
    from lmforge.data import TokenData

    assert main(["train", "--model", "ngram", "--order", "2", "--data", str(char_data), "--out",
                 str(tmp_path / "r"), "--max-tokens", "10k"]) == 0
    assert read_json(tmp_path / "r" / "metrics.json")["train_tokens"] == 10_000
    td = TokenData(char_data)
    tok = td.tokenizer
    first = np.asarray(td.split("train").read(0, 10_000))
    want = NGramModel.train(first, 2, tok.vocab_size, eos=tok.eot_id, bos=tok.bos_id, unk=tok.unk_id,
                            smoothing="modified-kneser-ney")
    assert load_model(tmp_path / "r").meta["counts"] == want.meta["counts"]
