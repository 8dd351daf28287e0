"""lmforge inspect: exact attention, logit lens, per-token scores, n-gram back-off, the HTML page."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

import lmforge
from lmforge.cli import main
from lmforge.data import TokenData
from lmforge.evaluate.inspect import inspect, parse_selection, report_json
from lmforge.evaluate.inspect_html import render_html
from lmforge.generation import GenerationConfig, generate_ids
from lmforge.hub.arpa import export_arpa, vocabulary_strings
from lmforge.models import create_model
from lmforge.models.gpt import GPT, GPTConfig
from lmforge.models.layers import record_attention
from lmforge.models.ngram import NGramModel
from lmforge.models.seq2seq import Seq2Seq, Seq2SeqConfig
from lmforge.tokenizers.char import CharTokenizer
from lmforge.tokenizers.word import WordTokenizer

TEXT = "ROMEO:\nBut soft, what light through yonder window breaks?\n"


def tiny_gpt(**kw) -> GPT:
    torch.manual_seed(0)
    cfg = dict(vocab_size=50, block_size=40, n_layer=2, n_head=4, n_embd=32)
    cfg.update(kw)
    return GPT(GPTConfig(**cfg)).eval()


GPT_VARIANTS = {"gpt2-like": {}, "llama-like": dict(pos="rope", norm="rmsnorm", mlp="swiglu", n_kv_head=2),
                "sliding": dict(pos="rope", sliding_window=7)}


# --- the opt-in exact attention path -------------------------------------------------------------
@pytest.mark.parametrize("variant", list(GPT_VARIANTS))
def test_exact_attention_equals_fused(variant: str) -> None:
    m = tiny_gpt(**GPT_VARIANTS[variant])
    x = torch.randint(0, 50, (2, 30))
    fused, _ = m(x)
    with record_attention(m) as mods:
        exact, _ = m(x)
    assert len(mods) == 2 and all(mod.weights is not None for mod in mods)
    assert (exact - fused).abs().max() < 1e-5
    assert not any(mod.record for mod in mods)  # switched back off: training and decoding stay fused
    # with a KV cache: a prefill then one token at a time, exact vs fused
    for rec in (False, True):
        cache = m.init_state(2, 30)
        with record_attention(m) if rec else torch.no_grad():
            steps = [m(x[:, :20], cache=cache)[0]] + [m(x[:, t:t + 1], cache=cache)[0] for t in range(20, 30)]
        out = torch.cat(steps, dim=1)
        assert (out - fused).abs().max() < 1e-5


def test_exact_cross_attention_equals_fused() -> None:
    torch.manual_seed(0)
    m = Seq2Seq(Seq2SeqConfig(vocab_size=30, n_embd=32, n_head=4, n_encoder_layer=2, n_decoder_layer=2,
                              dropout=0.0, max_target_length=32)).eval()
    batch = {"src": torch.randint(1, 30, (2, 9)), "src_mask": torch.ones(2, 9, dtype=torch.bool),
             "tgt": torch.randint(1, 30, (2, 7))}
    batch["src_mask"][1, 6:] = False  # padding keys are masked on both paths
    fused, _ = m(batch)
    with record_attention(m) as mods:
        exact, _ = m(batch)
    assert len(mods) == 6
    assert (exact - fused).abs().max() < 1e-5
    cross = m.decoder[0].cross.weights
    assert cross.shape == (2, 4, 7, 9) and cross[1, :, :, 6:].abs().max() == 0


# --- the report's arrays ---------------------------------------------------------------------------
def char_gpt(**kw) -> GPT:
    tok = CharTokenizer.train([TEXT])
    m = tiny_gpt(vocab_size=tok.vocab_size, **kw)
    m.tokenizer = tok
    return m


@pytest.mark.parametrize("variant", list(GPT_VARIANTS))
def test_attention_rows_and_logit_lens(variant: str) -> None:
    m = char_gpt(**GPT_VARIANTS[variant])
    rep = inspect(m, TEXT)  # 59 tokens > the context of 40: two windows
    att = rep["attention"]
    assert att["layers"] == [0, 1] and att["heads"] == [0, 1, 2, 3]
    W = GPT_VARIANTS[variant].get("sliding_window")
    for a in att["kinds"]["self"]["maps"]:
        assert a.shape == (4, 40, 40)  # bertviz: (heads, dest, src) per layer
        assert np.abs(a.sum(-1) - 1).max() < 1e-5
        assert np.abs(np.triu(a, 1)).max() == 0  # causal: nothing above the diagonal
        if W:
            assert np.abs(np.tril(a, -W)).max() == 0  # and nothing beyond the window
    # the logit lens at the last layer is the model's own output
    stream = torch.from_numpy(rep["ids"])[None, :40]
    tr, _ = m.trace(stream, stream, None)
    logits, _ = m(stream)
    assert (m.unembed(tr.hidden_states[-1]) - logits[0]).abs().max() < 1e-5
    assert len(tr.hidden_states) == m.config.n_layer + 1
    lens = rep["logit_lens"]
    assert lens["layers"] == [0, 1, 2]
    assert np.abs(lens["kl_bits"][-1]).max() < 1e-5
    top = m(torch.from_numpy(rep["ids"][:40])[None])[0][0, :39].argmax(-1)
    assert (lens["top_ids"][-1][:39] == top.numpy()).all()
    assert (rep["targets"]["rank"][:39][lens["top_ids"][-1][:39] == rep["ids"][1:40]] == 0).all()
    # a selection keeps those layers/heads only
    rep2 = inspect(m, TEXT, layers="-1", heads="1-2")
    assert rep2["attention"]["layers"] == [1] and rep2["attention"]["heads"] == [1, 2]
    assert [a.shape[0] for a in rep2["attention"]["kinds"]["self"]["maps"]] == [2]
    assert rep2["logit_lens"]["layers"] == [0, 2]


def test_parse_selection() -> None:
    assert parse_selection(None, 3, "layer") == [0, 1, 2]
    assert parse_selection("0,2-3,-1", 5, "layer") == [0, 2, 3, 4]
    for bad in ("x", "7", "3-1"):
        with pytest.raises(lmforge.errors.LMForgeError):
            parse_selection(bad, 5, "layer")


def _eval_loss(run: Path, data: Path, n: int, capsys: pytest.CaptureFixture, *extra: str) -> float:
    capsys.readouterr()
    assert main(["eval", str(run), "--data", str(data), "--split", "val", "--max-tokens", str(n), "--json",
                 *extra]) == 0
    return json.loads(capsys.readouterr().out)["loss"]


@pytest.mark.parametrize("family", ["gpt", "lstm", "ngram"])
def test_mean_surprisal_equals_lmforge_eval(family: str, trained_run: Path, char_data: Path, tmp_path: Path,
                                            capsys: pytest.CaptureFixture) -> None:
    """Same tokens, same context windows: inspect's mean surprisal is lmforge eval's loss."""
    data = TokenData(char_data)
    if family == "gpt":
        run = trained_run  # block size 32: 100 tokens take four windows
    else:
        run = tmp_path / family
        if family == "lstm":
            torch.manual_seed(0)
            m = create_model("lstm", data.vocab_size, "tiny")
        else:
            tr = data.split("train")
            m = NGramModel.train(tr.read(0, len(tr)), 4, data.vocab_size, eos=data.tokenizer.eot_id)
        m.tokenizer = data.tokenizer
        m.save_pretrained(run)
    n = 100
    stream = data.split("val").read(0, n + 1)
    model = lmforge.load(run)
    rep = inspect(model, tokens=stream)
    assert rep["summary"]["tokens"] == n
    # batch size 1: a stateful model reads the split as one stream, as inspect does
    assert abs(rep["summary"]["loss"] - _eval_loss(run, char_data, n, capsys, "--batch-size", "1")) < 1e-5
    if family == "gpt":  # sliding windows too
        rep = inspect(model, tokens=stream, stride=8)
        assert abs(rep["summary"]["loss"] - _eval_loss(run, char_data, n, capsys, "--stride", "8")) < 1e-5
    if family == "lstm":
        assert rep["state_norm"].shape == (n,) and (rep["state_norm"] > 0).all()
    # the surprisal is in bits and the probability is its exponential
    t = rep["targets"]
    assert np.allclose(t["bits"], -t["logp"] / math.log(2)) and np.allclose(t["prob"], np.exp(t["logp"]))


def test_greedy_text_is_all_rank_zero(trained_run: Path) -> None:
    model = lmforge.load(trained_run)
    eot = model.tokenizer.eot_id
    ids = generate_ids(model, [], GenerationConfig(max_new_tokens=30, temperature=0.0, ignore_eos=True))[0]
    rep = inspect(model, tokens=[eot] + ids)
    assert rep["summary"]["tokens"] == 30
    assert (rep["targets"]["rank"] == 0).all()
    assert (rep["targets"]["top_ids"][:, 0] == np.array(ids)).all()
    assert rep["summary"]["rank_histogram"] == [30, 0, 0, 0]


# --- n-grams: the back-off order is the ARPA entry used ---------------------------------------------
def _read_arpa(path: Path) -> dict[tuple[str, ...], tuple[float, float]]:
    table: dict[tuple[str, ...], tuple[float, float]] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        parts = line.split("\t")
        if len(parts) >= 2:
            table[tuple(parts[1].split(" "))] = (float(parts[0]), float(parts[2]) if len(parts) > 2 else 0.0)
    return table


def _arpa_lookup(table: dict, history: list[str], w: str, N: int) -> tuple[float, int]:
    """log10 p(w | history) by the ARPA back-off rule, and the order of the entry used."""
    h = history[-(N - 1):] if N > 1 else []
    bo = 0.0
    while True:
        if tuple(h + [w]) in table:
            return table[tuple(h + [w])][0] + bo, len(h) + 1
        bo += table.get(tuple(h), (0.0, 0.0))[1] if h else 0.0
        h = h[1:]


def test_ngram_backoff_orders_match_arpa(tmp_path: Path) -> None:
    from .conftest import sample_text

    text = sample_text(30_000)
    tok = WordTokenizer.train([text])
    m = NGramModel.train(tok.encode_array(text), 3, tok.vocab_size, eos=tok.eot_id, bos=tok.bos_id, unk=tok.unk_id,
                         smoothing="modified-kneser-ney")
    m.tokenizer = tok
    export_arpa(m, tmp_path / "m.arpa")
    table = _read_arpa(tmp_path / "m.arpa")
    words = vocabulary_strings(m)
    probe = text[1000:1300] + "\nWhat light through yonder breaks?\n"  # seen text, then unseen n-grams
    rep = inspect(m, probe)
    order = rep["backoff"]["order"]
    assert set(order.tolist()) == {1, 2, 3}  # the probe needs every order
    ids = rep["ids"]
    for t in range(len(ids) - 1):
        hist: list[str] = []
        for i in ids[:t + 1][::-1]:  # the history since the last sentence start
            if i in (m.eos, m.bos):
                break
            hist.insert(0, words[i])
        lp10, used = _arpa_lookup(table, ["<s>"] + hist, words[ids[t + 1]], m.order)
        assert order[t] == used, (t, hist, words[ids[t + 1]])
        assert abs(rep["targets"]["logp"][t] / math.log(10) - lp10) < 1e-5
    assert rep["views"] == ["tokens", "backoff"]


# --- seq2seq: encoder, decoder and cross-attention ---------------------------------------------------
def test_seq2seq_attention_kinds() -> None:
    torch.manual_seed(0)
    tok = CharTokenizer.train(["abcdefgh xyz"])
    m = Seq2Seq(Seq2SeqConfig(vocab_size=tok.vocab_size, n_embd=32, n_head=4, n_encoder_layer=2, n_decoder_layer=3,
                              dropout=0.0, max_target_length=32)).eval()
    m.tokenizer = m.source_tokenizer = tok
    rep = lmforge.inspect(m, "zyx cba", source="abc xyz")
    kinds = rep["attention"]["kinds"]
    assert set(kinds) == {"encoder", "self", "cross"}
    assert kinds["encoder"]["maps"][0].shape == (4, 7, 7) and len(kinds["encoder"]["maps"]) == 2
    assert kinds["cross"]["maps"][0].shape == (4, 8, 7) and len(kinds["cross"]["maps"]) == 3
    assert kinds["cross"]["dest_tokens"][-1] == tok.id_to_token(tok.eot_id)  # a row is labelled by what it produced
    for kind in kinds.values():
        for a in kind["maps"]:
            assert np.abs(a.sum(-1) - 1).max() < 1e-5
    assert np.abs(np.triu(kinds["self"]["maps"][0], 1)).max() == 0
    assert np.abs(rep["logit_lens"]["kl_bits"][-1]).max() < 1e-5
    # scores are those of the decoder on <eot> target <eot>, given the source
    state = m.encode_source(torch.tensor([tok.encode("abc xyz")]), torch.ones(1, 7, dtype=torch.bool))
    ids = torch.from_numpy(rep["ids"])[None]
    logp, _ = m.score(ids[:, :-1], ids[:, 1:], state)
    assert abs(rep["summary"]["loss"] + logp.mean().item()) < 1e-6
    # without a target: its own greedy translation, all rank 0 (but the final <eot>: it may not have finished)
    rep = lmforge.inspect(m, source="abc xyz")
    assert len(rep["ids"]) > 3 and (rep["targets"]["rank"][:-1] == 0).all()


# --- CLI, JSON and the page -------------------------------------------------------------------------------
def test_cli_inspect_writes_json_and_html(trained_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    f = tmp_path / "t.txt"
    f.write_text(TEXT, encoding="utf-8")
    assert main(["inspect", str(trained_run), "--file", str(f), "--html", str(tmp_path / "r.html"),
                 "--json", str(tmp_path / "r.json"), "--top-k", "5"]) == 0
    out = capsys.readouterr().out
    assert "bits/byte" in out and "wrote" in out
    j = json.loads((tmp_path / "r.json").read_text(encoding="utf-8"))
    assert len(j["targets"]["top_ids"][0]) == 5 and j["summary"]["tokens"] == len(TEXT)
    maps = j["attention"]["kinds"]["self"]["maps"]
    assert len(maps) == 2 and np.array(maps[0]).shape == (2, 32, 32)
    page = (tmp_path / "r.html").read_text(encoding="utf-8")
    assert "http://" not in page and "https://" not in page and "<script src" not in page
    # the files are the user's now: a second run refuses to replace them unless --force
    before = (tmp_path / "r.html").read_bytes()
    assert main(["inspect", str(trained_run), "--text", "ab", "--html", str(tmp_path / "r.html")]) == 2
    assert "already exists; pass --force" in capsys.readouterr().err
    assert (tmp_path / "r.html").read_bytes() == before
    assert main(["inspect", str(trained_run), "--text", "ab", "--html", str(tmp_path / "r.html"), "--force"]) == 0
    assert (tmp_path / "r.html").read_bytes() != before
    for args in (["--text", "a", "--file", str(f)], [], ["--text", "a", "--layers", "9"],
                 ["--text", "a", "--html", str(tmp_path)], ["--text", "a", "--html", str(tmp_path / "no/x.html")],
                 ["--text", "a", "--html", str(tmp_path / "s"), "--json", str(tmp_path / "s")],
                 ["--text", "a", "--source", "b"], ["--text", "a", "--top-k", "0"]):
        assert main(["inspect", str(trained_run), *args]) == 2
        err = capsys.readouterr().err
        assert err.startswith("lmforge: error:") and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_report_json_is_plain() -> None:
    m = char_gpt()
    j = report_json(inspect(m, TEXT[:30]))
    json.dumps(j, allow_nan=False)  # no NaN/inf, no numpy types
    assert j["views"] == ["tokens", "attention", "lens"]
    assert isinstance(j["attention"]["kinds"]["self"]["maps"][0][0][0][0], float)


@pytest.mark.slow
def test_html_opens_offline_in_chromium(tmp_path: Path, trained_run: Path, char_data: Path) -> None:
    """Every view of every family renders in headless Chromium with no console error and no request."""
    sync_playwright = pytest.importorskip("playwright.sync_api").sync_playwright
    if not Path("/usr/bin/chromium").exists():
        pytest.skip("Debian's chromium is not installed")
    data = TokenData(char_data)
    torch.manual_seed(0)
    lstm = create_model("lstm", data.vocab_size, "tiny")
    lstm.tokenizer = data.tokenizer
    tr = data.split("train")
    ngram = NGramModel.train(tr.read(0, len(tr)), 3, data.vocab_size, eos=data.tokenizer.eot_id)
    ngram.tokenizer = data.tokenizer
    s2s = Seq2Seq(Seq2SeqConfig(vocab_size=data.vocab_size, n_embd=32, n_head=2, n_encoder_layer=1,
                                n_decoder_layer=1, dropout=0.0, max_target_length=64)).eval()
    s2s.tokenizer = data.tokenizer
    pages = {"gpt": inspect(lmforge.load(trained_run), TEXT), "lstm": inspect(lstm, TEXT),
             "ngram": inspect(ngram, TEXT), "seq2seq": inspect(s2s, "a target", source="a source </script><!-- &")}
    args = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync"]
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=args)
        try:
            for name, rep in pages.items():
                path = tmp_path / f"{name}.html"
                path.write_text(render_html(rep), encoding="utf-8")
                page = browser.new_page()
                errors: list[str] = []
                requests: list[str] = []
                page.on("console", lambda msg, e=errors: e.append(msg.text) if msg.type == "error" else None)
                page.on("pageerror", lambda exc, e=errors: e.append(str(exc)))
                page.on("request", lambda r, q=requests: q.append(r.url))
                page.goto(path.as_uri())
                for view in rep["views"]:
                    page.click(f"nav button[data-v={view}]")
                    page.wait_for_timeout(150)
                    assert page.is_visible(f"#v-{view}")
                page.hover(".tk[data-i='3']") if "tokens" in rep["views"] and page.is_visible(".tk[data-i='3']") \
                    else None
                if "attention" in rep["views"]:
                    page.click("nav button[data-v=attention]")
                    page.wait_for_function("document.getElementById('zoom').width > 10", timeout=5000)
                    # every thumbnail in view is drawn from the inflated bytes
                    page.wait_for_function("[...document.querySelectorAll('.grid canvas')].every(c => c.width > 1)",
                                           timeout=5000)
                assert errors == [], (name, errors)
                assert requests == [path.as_uri()], (name, requests)
                page.close()
        finally:
            browser.close()


# --- Hugging Face and GGUF checkpoints: the same attention weights as transformers --------------------------
def test_hf_and_gguf_attention_match_transformers(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("gguf")
    from gguf import GGMLQuantizationType

    from .test_gguf import write_gguf

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   rms_norm_eps=1e-5, tie_word_embeddings=False, attn_implementation="eager")
    hf = transformers.LlamaForCausalLM(cfg).eval()
    hf.save_pretrained(tmp_path / "hf")
    write_gguf(hf, tmp_path / "m.gguf", GGMLQuantizationType.F32)
    ids = torch.randint(0, 128, (1, 24))
    with torch.no_grad():
        ref = hf(ids, output_attentions=True)
    for path in (tmp_path / "hf", tmp_path / "m.gguf"):
        rep = lmforge.inspect(str(path), tokens=ids[0].numpy())
        maps = rep["attention"]["kinds"]["self"]["maps"]
        for ours, theirs in zip(maps, ref.attentions):
            assert np.abs(ours - theirs[0].numpy()).max() < 1e-5
        logp = torch.log_softmax(ref.logits[0, :-1], -1).gather(1, ids[0, 1:, None])[:, 0]
        assert abs(rep["summary"]["loss"] + logp.mean().item()) < 1e-5
        assert rep["views"] == ["tokens", "attention", "lens"]
