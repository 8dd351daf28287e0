"""Looking inside a model on one text: per-token surprisal, attention maps, the logit lens, n-gram back-off.

For a token stream x_0 .. x_n (x_0 = the end-of-text token that starts every document) the chain rule gives
each token a **surprisal** s_t = -log2 p(x_t | x_<t) bits; their mean (in nats) is the cross-entropy that
``lmforge eval`` reports, and the same context windows are used (:func:`lmforge.evaluate.context_windows`),
so the two agree exactly. The **rank** of x_t is the number of tokens the model found more likely (0 = its
first choice); GLTR (Gehrmann et al. 2019) buckets it into top 10 / 100 / 1000 / beyond.

Transformers (``model.has_attention``) also give every head's **attention** weights
A = softmax(Q K^T / sqrt(d_k) + M), computed by the opt-in exact path of the attention modules, and the
**logit lens** (nostalgebraist 2020): the residual stream h_l after block l read out early, p_l = softmax(
W_U Norm(h_l)), compared with the final distribution by KL(p_L || p_l). n-grams (``has_backoff``) report
the order of the n-gram that answered each token; recurrent models (``has_state_norm``) the norm of h_t.

:func:`inspect` returns a report: a dict of numpy arrays and lists. :func:`report_json` turns it into plain
JSON (attention in bertviz's per-layer (heads, dest, src) shape); :mod:`lmforge.evaluate.inspect_html`
renders it as one offline HTML page. Both are functions returning a value, so a server can send them.
"""

from __future__ import annotations

import math
import re
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import LMForgeError
from ..models.base import LanguageModel, Trace
from ..models.ngram import NGramModel
from . import context_windows

RANK_BUCKETS = (10, 100, 1000)  # GLTR's colours: top 10, top 100, top 1000, beyond


def parse_selection(spec: str | list[int] | None, n: int, what: str) -> list[int]:
    """``"0,3,5-7"`` (or a list of ints) -> sorted indices in [0, n); None = all. Negative numbers count
    from the end (``-1`` = the last layer)."""
    if spec is None:
        return list(range(n))
    items: list[int] = []
    parts = spec if isinstance(spec, list) else [p for p in str(spec).replace(" ", "").split(",") if p]
    for part in parts:
        m = re.fullmatch(r"(-?\d+)(?:-(-?\d+))?", str(part))
        if not m:
            raise LMForgeError(f"bad {what} selection {spec!r}: use numbers and ranges like 0,3,5-7")
        lo = int(m.group(1))
        hi = int(m.group(2)) if m.group(2) is not None else lo
        lo, hi = (lo + n if lo < 0 else lo), (hi + n if hi < 0 else hi)
        if not (0 <= lo < n and 0 <= hi < n and lo <= hi):
            raise LMForgeError(f"{what} selection {spec!r} is out of range: this model has {n} {what}s "
                               f"(0..{n - 1})")
        items.extend(range(lo, hi + 1))
    if not items:
        raise LMForgeError(f"empty {what} selection {spec!r}")
    return sorted(set(items))


def token_strings(tok: Any, ids: np.ndarray) -> list[str]:
    """Each token as text on its own (a byte-level BPE token with its leading space, not as 'Ġthe')."""
    if tok is None:
        return [f"<{int(i)}>" for i in ids]
    return [tok.id_to_token(int(i)) if int(i) == tok.eot_id else (tok.decode([int(i)]) or tok.id_to_token(int(i)))
            for i in ids]


def text_pieces(tok: Any, ids: np.ndarray) -> list[str]:
    """What each token of a stream adds to the decoded text, so the pieces read as the text (word tokenizers
    put spaces between words; a character split over two byte tokens shows once complete)."""
    if tok is None:
        return token_strings(tok, ids)
    out: list[str] = []
    seg: list[int] = []
    prev = ""
    for i in (int(x) for x in ids):
        if i == tok.eot_id:  # documents are decoded separately; the separator shows as itself
            out.append(tok.id_to_token(i))
            seg, prev = [], ""
            continue
        seg.append(i)
        cur = tok.decode(seg)
        k = 0
        while k < min(len(prev), len(cur)) and prev[k] == cur[k]:
            k += 1
        out.append(cur[k:] if k == len(prev) else tok.decode([i]))
        prev = cur
    return out


def _model_info(model: LanguageModel, name: str | None) -> dict[str, Any]:
    info: dict[str, Any] = {"name": name or model.model_type, "model_type": model.model_type,
                            "vocab_size": model.vocab_size, "context_length": model.context_length,
                            "parameters": model.num_parameters()}
    if isinstance(model, NGramModel):
        info["order"] = model.order
    if model.config_class is not None:  # a torch model with a config dataclass: its shape
        cfg = model.config.to_dict()  # type: ignore[attr-defined]
        info.update({k: cfg[k] for k in ("n_layer", "n_head", "n_kv_head", "n_embd", "n_encoder_layer",
                                         "n_decoder_layer", "cell", "hidden") if k in cfg})
    return info


def _scores(model: LanguageModel, stream: np.ndarray, source: np.ndarray | None, stride: int | None,
            chunk: int) -> np.ndarray:
    """log p(x_t | x_<t) (nats) for t = 1..n-1, computed exactly as ``lmforge.evaluate`` does."""
    n = len(stream)
    out = np.zeros(n - 1)
    if model.is_seq2seq:
        src = torch.from_numpy(source)[None]
        state = model.encode_source(src, torch.ones_like(src, dtype=torch.bool), max_length=n - 1)  # type: ignore
        x, y = torch.from_numpy(stream[:-1])[None], torch.from_numpy(stream[1:])[None]
        return model.score(x, y, state)[0][0].double().numpy()
    if model.context_length:
        L = min(model.context_length, n - 1)
        for lo, s, e in context_windows(n, model.context_length, stride):
            w = torch.from_numpy(stream[lo:lo + L + 1])[None]
            logp, _ = model.score(w[:, :-1], w[:, 1:], None)
            out[s:e] = logp[0, s - lo:e - lo].double().numpy()
        return out
    state = model.init_state(1, n)
    for off in range(0, n - 1, chunk):  # one stream, carried state: eval with batch size 1
        w = torch.from_numpy(stream[off:min(off + chunk, n - 1) + 1])[None]
        logp, state = model.score(w[:, :-1], w[:, 1:], state)
        out[off:off + w.shape[1] - 1] = logp[0].double().numpy()
    return out


def _traces(model: LanguageModel, stream: np.ndarray, source: np.ndarray | None, stride: int | None,
            chunk: int) -> list[tuple[Trace, int, int, int]]:
    """(trace, lo, s, e): a trace whose input position j (from lo) predicts token lo+j+1; positions s-lo ..
    e-lo-1 are the ones that predict the scored targets s+1..e (every target exactly once)."""
    n = len(stream)
    t = torch.from_numpy(stream)[None]
    if model.is_seq2seq:
        tr, _ = model.trace(t[:, :-1], t[:, 1:], None, source_ids=torch.from_numpy(source)[None])
        return [(tr, 0, 0, n - 1)]
    ctx = model.context_length
    if ctx:
        out = []
        L = min(ctx, n - 1)
        for lo, s, e in context_windows(n, ctx, stride):
            # the window plus its last target when it fits: the attention then shows every token of a short text
            w = t[:, lo:min(lo + L + 1, lo + ctx)]
            tr, _ = model.trace(w, t[:, lo + 1:lo + 1 + w.shape[1]], None)
            out.append((tr, lo, s, e))
        return out
    out, state = [], model.init_state(1, n)
    for off in range(0, n - 1, chunk):
        end = min(off + chunk, n - 1)
        tr, state = model.trace(t[:, off:end], t[:, off + 1:end + 1], state)
        out.append((tr, off, off, end))
    return out


@torch.no_grad()
def inspect(model: LanguageModel, text: str | None = None, *, tokens: np.ndarray | list[int] | None = None,
            source: str | None = None, top_k: int = 10, layers: str | list[int] | None = None,
            heads: str | list[int] | None = None, stride: int | None = None, chunk: int = 512,
            name: str | None = None) -> dict[str, Any]:
    """Score ``text`` (prefixed by the end-of-text token, i.e. read as a new document) or a token stream
    ``tokens`` (the first token is context only) and collect what the model shows of itself.

    A seq2seq model reads ``source`` and scores ``text`` as its target (``<eot> y_1 .. y_n <eot>``).
    ``layers``/``heads`` select the attention maps and logit-lens rows kept (``"0,3,5-7"``); ``stride``
    is ``lmforge eval``'s sliding-window stride for texts longer than the context."""
    if top_k < 1:
        raise LMForgeError("--top-k must be at least 1")
    tok = model.tokenizer
    if (text is None) == (tokens is None):
        raise LMForgeError("give either the text to inspect or its token ids (tokens=...), one of the two")
    if isinstance(model, torch.nn.Module):
        model.eval()
    src_ids = src_tok = None
    if model.is_seq2seq:
        if source is None or not source.strip():
            raise LMForgeError("a seq2seq model is inspected on a source sentence and a target: give --source "
                               "(and --text for the target, or let it translate)")
        src_tok = model.source_tokenizer or tok
        src_ids = src_tok.encode_array(source)[: model.config.max_source_length]  # type: ignore[attr-defined]
    elif source is not None:
        raise LMForgeError(f"--source is for seq2seq models; this is a {model.model_type} model")
    if tokens is not None:
        stream = np.asarray(tokens, dtype=np.int64)
        text = tok.decode(stream[1:]) if tok is not None else None
    else:
        if tok is None:
            raise LMForgeError("this model has no tokenizer: pass token ids (tokens=...) instead of text")
        body = tok.encode_array(text)
        stream = np.concatenate([[tok.eot_id], body, [tok.eot_id] if model.is_seq2seq else []]).astype(np.int64)
    if model.is_seq2seq and len(stream) - 1 > model.context_length:  # type: ignore[operator]
        raise LMForgeError(f"the target has {len(stream) - 1} tokens, more than the model's target context "
                           f"({model.context_length})")
    n = len(stream)
    if n < 2:
        raise LMForgeError("nothing to score: the text is empty")
    if int(stream.max()) >= model.vocab_size or int(stream.min()) < 0:
        raise LMForgeError(f"token ids out of range for a vocabulary of {model.vocab_size}")

    logp = _scores(model, stream, src_ids, stride, chunk)
    traces = _traces(model, stream, src_ids, stride, chunk)

    # --- per-token scores: rank and top-k alternatives from the traced logits --------------------------
    V = model.vocab_size
    k = min(top_k, V)
    rank = np.zeros(n - 1, dtype=np.int64)
    top_ids = np.zeros((n - 1, k), dtype=np.int64)
    top_p = np.zeros((n - 1, k))
    entropy = np.zeros(n - 1)
    order = np.zeros(n - 1, dtype=np.int64) if model.has_backoff else None
    state_norm = np.zeros(n - 1) if model.has_state_norm else None
    for tr, lo, s, e in traces:
        z = tr.logits[s - lo:e - lo].float()[:, :V]          # (m, V) predicting tokens s+1..e
        y = torch.from_numpy(stream[s + 1:e + 1])
        zy = z.gather(1, y[:, None])
        rank[s:e] = (z > zy).sum(1).numpy()
        lp = F.log_softmax(z, dim=-1)
        tp, ti = lp.topk(k, dim=-1)
        top_ids[s:e], top_p[s:e] = ti.numpy(), tp.exp().double().numpy()
        entropy[s:e] = (-(lp.exp() * lp.clamp_min(-1e30)).sum(-1) / math.log(2)).double().numpy()
        if order is not None and tr.backoff_order is not None:
            order[s:e] = tr.backoff_order[s - lo:e - lo]
        if state_norm is not None and tr.state_norm is not None:
            state_norm[s:e] = tr.state_norm[s - lo:e - lo].double().numpy()

    nbytes = len(text.encode("utf-8")) if text is not None else 0
    total_bits = float(-logp.sum() / math.log(2))
    mean = float(-logp.mean())
    hist = np.bincount(np.searchsorted(RANK_BUCKETS, rank, side="right"), minlength=4)
    report: dict[str, Any] = {
        "format": "lmforge-inspect", "version": 1,
        "model": _model_info(model, name),
        "text": text, "source": source,
        "ids": stream, "tokens": text_pieces(tok, stream),
        "eot": tok.id_to_token(tok.eot_id) if tok is not None else None,  # ends a line/document on the page
        "targets": {"logp": logp, "bits": -logp / math.log(2), "prob": np.exp(logp), "rank": rank,
                    "entropy_bits": entropy, "top_ids": top_ids, "top_prob": top_p,
                    "top_tokens": [token_strings(tok, row) for row in top_ids]},
        "summary": {"tokens": n - 1, "bytes": nbytes, "loss": mean,
                    "perplexity": math.exp(mean) if mean < 700 else float("inf"),
                    "bits_per_token": mean / math.log(2),
                    "bits_per_byte": total_bits / nbytes if nbytes else float("nan"),
                    "rank_buckets": ["top 10", "top 100", "top 1000", "beyond"],
                    "rank_histogram": hist.tolist()},
        "views": ["tokens"],
    }
    if order is not None:
        report["backoff"] = {"order": order, "max_order": int(report["model"].get("order", order.max()))}
        report["views"].append("backoff")
    if state_norm is not None:
        report["state_norm"] = state_norm
        report["views"].append("state")
    if model.has_attention:
        _attention(report, traces[0][0], layers, heads, tok, src_tok, src_ids)
    if model.has_logit_lens:
        _logit_lens(report, model, traces, stream, layers, tok)
    return report


def _attention(report: dict, tr: Trace, layers: Any, heads: Any, tok: Any, src_tok: Any,
               src_ids: np.ndarray | None) -> None:
    """Keep the selected layers/heads of each attention kind as float32 (heads, dest, src) arrays."""
    first = tr.attention["self"]
    L, H = len(first), first[0].shape[0]
    lsel, hsel = parse_selection(layers, L, "layer"), parse_selection(heads, H, "head")
    T = first[0].shape[1]
    pieces = report["tokens"]
    src = text_pieces(src_tok, src_ids) if src_ids is not None else []
    att: dict[str, Any] = {"layers": lsel, "heads": hsel, "n_layer": L, "n_head": H, "kinds": {}}
    for kind, maps in tr.attention.items():
        # a cross-attention row is labelled by the target token it produced (the row of an alignment)
        dest = src if kind == "encoder" else pieces[1:T + 1] if kind == "cross" else pieces[:T]
        att["kinds"][kind] = {
            "causal": kind == "self",
            "dest_tokens": dest,
            "src_tokens": src if kind in ("encoder", "cross") else pieces[:T],
            "maps": [maps[li][hsel].float().numpy() for li in lsel if li < len(maps)],
        }
    if src_ids is not None:
        report["source_tokens"] = src
    report["attention"] = att
    report["views"].append("attention")


def _logit_lens(report: dict, model: LanguageModel, traces: list, stream: np.ndarray, layers: Any,
                tok: Any) -> None:
    """For each layer l and scored position: argmax and max of p_l = softmax(unembed(h_l)), p_l(true next
    token), and KL(p_L || p_l) in bits (p_L: the model's output distribution)."""
    n_states = len(traces[0][0].hidden_states)  # the embeddings + one per block
    lsel = parse_selection(layers, n_states - 1, "layer")
    rows = sorted({0, n_states - 1} | {li + 1 for li in lsel})
    n = len(stream)
    V = model.vocab_size
    top_id = np.zeros((len(rows), n - 1), dtype=np.int64)
    top_p = np.zeros((len(rows), n - 1))
    true_p = np.zeros((len(rows), n - 1))
    kl = np.zeros((len(rows), n - 1))
    for tr, lo, s, e in traces:
        final = F.log_softmax(tr.logits[s - lo:e - lo].float()[:, :V], dim=-1)
        y = torch.from_numpy(stream[s + 1:e + 1])[:, None]
        for r, li in enumerate(rows):
            lp = F.log_softmax(model.unembed(tr.hidden_states[li][s - lo:e - lo]).float()[:, :V], dim=-1)
            p, i = lp.max(-1)
            top_id[r, s:e], top_p[r, s:e] = i.numpy(), p.exp().numpy()
            true_p[r, s:e] = lp.gather(1, y)[:, 0].exp().numpy()
            kl[r, s:e] = ((final.exp() * (final - lp)).sum(-1).clamp_min(0) / math.log(2)).numpy()
    report["logit_lens"] = {
        "layers": rows,  # 0 = the embeddings, l = after block l (the last row is the model's output)
        "top_ids": top_id, "top_tokens": [token_strings(tok, r) for r in top_id], "top_prob": top_p,
        "true_prob": true_p, "kl_bits": kl}
    report["views"].append("lens")


def report_json(report: dict[str, Any], decimals: int = 6) -> dict[str, Any]:
    """The report as plain JSON values (numpy arrays -> nested lists, floats rounded to ``decimals``)."""
    def conv(v: Any) -> Any:
        if isinstance(v, np.ndarray):
            if v.dtype.kind == "f":
                v = np.round(v.astype(np.float64), decimals)
                return [conv(x) for x in v] if v.ndim > 1 else [x if math.isfinite(x) else None for x in v.tolist()]
            return v.tolist()
        if isinstance(v, dict):
            return {k: conv(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [conv(x) for x in v]
        if isinstance(v, float) and not math.isfinite(v):
            return None
        if isinstance(v, (np.integer, np.floating)):
            return v.item()
        return v
    return conv(report)
