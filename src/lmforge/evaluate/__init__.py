"""Evaluation written once for every model family: loss, perplexity, bits per byte.

For a token stream x_1..x_N the model's cross-entropy is

    H = -(1/N) sum_t ln p(x_t | x_<t)        (nats/token),   perplexity = exp(H),

and bits per byte divides the total information by the UTF-8 size of the text instead,

    bpb = (N * H / ln 2) / bytes,

which does not depend on the tokenizer, so a character-level LSTM, a BPE GPT and a word-level
n-gram can be compared on the same text.

Models with a bounded context (Transformers) are scored on consecutive non-overlapping windows of
their context length (nanoGPT's convention; ``stride`` < context gives sliding windows where each
token is scored with more context). Models that carry state (RNNs, n-grams) read the split as a
few long parallel streams, carrying their state from chunk to chunk.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from tqdm import tqdm

from ..data import TokenData
from ..errors import LMForgeError
from ..models.base import LanguageModel
from ..options import INT64_MAX, Options, option


@dataclass
class EvalConfig(Options):
    """The options of ``lmforge eval`` (and of :func:`evaluate` / ``evaluate_seq2seq``)."""

    split: Literal["train", "val", "test"] = option("val", help="split to score")
    batch_size: int = option(16, ge=1, le=1 << 20, help="sequences (or pairs) per batch")
    max_tokens: int | None = option(None, ge=1, le=INT64_MAX, help="score at most this many tokens",
                                    default_text="the whole split")
    stride: int | None = option(None, ge=1, le=1 << 20, help="sliding-window stride for Transformers (smaller "
                                "than the context: each token scored with more context)",
                                default_text="the context length (non-overlapping windows)")
    beam: int = option(1, ge=1, le=256, help="seq2seq: beam size for BLEU/chrF (1 = greedy)")
    length_penalty: float = option(1.0, ge=-10, le=10, help="seq2seq: beam length penalty (score / length^p)")
    max_pairs: int | None = option(None, ge=1, le=INT64_MAX, help="seq2seq: evaluate the first N pairs only",
                                   default_text="all pairs")


def context_windows(n: int, ctx: int, stride: int | None = None) -> list[tuple[int, int, int]]:
    """How a model with a context of ``ctx`` tokens scores a stream of ``n`` tokens: windows (lo, s, e) whose
    inputs are tokens[lo : lo+L] (L = min(ctx, n-1)) and which score the targets tokens[s+1 .. e] (window
    offsets s-lo .. e-lo-1). Window w starts at w*stride and scores its last ``stride`` targets (all of them
    for the first window), so each token is scored exactly once; the last window is moved back to end at the
    stream's end. Shared by :func:`evaluate` and :mod:`lmforge.evaluate.inspect`."""
    stride = min(stride or ctx, ctx)
    L = min(ctx, n - 1)
    return [(max(0, min(s + stride, n - 1) - L), s, min(s + stride, n - 1)) for s in range(0, n - 1, stride)]


@torch.no_grad()
def evaluate(model: LanguageModel, data: str | Path | TokenData, split: str = "val", batch_size: int = 16,
             max_tokens: int | None = None, stride: int | None = None, progress: bool = False,
             chunk: int = 512) -> dict[str, Any]:
    EvalConfig(split=split, batch_size=batch_size, max_tokens=max_tokens, stride=stride)  # type: ignore[arg-type]
    if not isinstance(data, TokenData):
        data = TokenData(data)
    if data.vocab_size != model.vocab_size:
        raise LMForgeError(f"data {data.path} has vocab {data.vocab_size} but the model has {model.vocab_size}: "
                           "evaluate on data prepared with the model's tokenizer")
    tokens = data.split(split)
    n = len(tokens) if max_tokens is None else min(len(tokens), max_tokens + 1)
    if n < 2:
        raise LMForgeError(f"split {split!r} has fewer than 2 tokens")
    if isinstance(model, torch.nn.Module):
        model.eval()
    unk = model.tokenizer.unk_id if model.tokenizer is not None else None
    total_nll, total_n, oov_n, oov_nll = 0.0, 0, 0, 0.0
    ctx = model.context_length
    device = model.device  # inputs go where the weights are (--device)

    def accumulate(logp: torch.Tensor, tgt: torch.Tensor, weight: torch.Tensor) -> None:
        nonlocal total_nll, total_n, oov_n, oov_nll
        lp = logp.double() * weight
        total_nll -= lp.sum().item()
        total_n += int(weight.sum().item())
        if unk is not None:
            m = (tgt == unk) & weight.bool()
            oov_n += int(m.sum().item())
            oov_nll -= logp.double()[m].sum().item()

    if ctx:
        plan = context_windows(n, ctx, stride)
        L = min(ctx, n - 1)
        bar = tqdm(total=len(plan), desc=f"eval {split}", unit="win", disable=not progress)
        for b in range(0, len(plan), batch_size):
            lo, group, ends = zip(*plan[b:b + batch_size])
            win = np.stack([tokens.read(a, L + 1) for a in lo])
            x, y = torch.from_numpy(win[:, :-1]).to(device), torch.from_numpy(win[:, 1:]).to(device)
            logp, _ = model.score(x, y, None)
            weight = torch.zeros_like(logp)
            for i, (a, s, e) in enumerate(zip(lo, group, ends)):
                weight[i, s - a:e - a] = 1.0  # targets s+1..e are scored here
            accumulate(logp, y, weight)
            bar.update(len(group))
        bar.close()
    else:
        streams = max(1, min(batch_size, (n - 1) // max(chunk, 1)))
        per = (n - 1) // streams
        state = model.init_state(streams, per + 1)
        bar = tqdm(total=per, desc=f"eval {split}", unit="tok", unit_scale=streams, disable=not progress)
        for off in range(0, per, chunk):
            length = min(chunk, per - off)
            win = np.stack([tokens.read(i * per + off, length + 1) for i in range(streams)])
            x, y = torch.from_numpy(win[:, :-1]).to(device), torch.from_numpy(win[:, 1:]).to(device)
            logp, state = model.score(x, y, state)
            accumulate(logp, y, torch.ones_like(logp))
            bar.update(length)
        bar.close()
    loss = total_nll / max(total_n, 1)
    bytes_per_token = data.bytes_per_token(split)
    result: dict[str, Any] = {
        "split": split, "tokens": total_n, "loss": loss,
        "perplexity": math.exp(loss) if loss < 700 else float("inf"),
        "bits_per_token": loss / math.log(2),
        "bits_per_byte": loss / math.log(2) / bytes_per_token if bytes_per_token else float("nan"),
        "bytes_per_token": bytes_per_token,
    }
    if data.meta["tokenizer"]["kind"] == "char":
        result["bits_per_char"] = loss / math.log(2)
    if unk is not None:
        result["oov_tokens"] = oov_n
        kept = total_n - oov_n
        ex = (total_nll - oov_nll) / max(kept, 1)
        result["perplexity_excluding_oov"] = math.exp(ex) if ex < 700 else float("inf")
    if not math.isfinite(loss):
        result["note"] = "some tokens have zero probability under this model (unsmoothed?): perplexity is infinite"
    return result
