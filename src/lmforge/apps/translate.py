"""``lmforge translate`` and seq2seq evaluation: decode with greedy or beam search, score with sacrebleu.

BLEU (Papineni et al. 2002) and chrF (Popovic 2015) are computed by ``sacrebleu`` on detokenized
text against the raw references, and reported with sacrebleu's signature so that the numbers are
comparable with published ones.
"""

from __future__ import annotations

import math
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from ..errors import LMForgeError
from ..generation.search import Hypothesis, beam_search, greedy_search


def require_seq2seq(model: Any, where: str = "") -> None:
    if not getattr(model, "is_seq2seq", False):
        kind = getattr(model, "model_type", type(model).__name__)
        raise LMForgeError(f"{where or 'this model'} is a {kind} model, not a seq2seq (encoder-decoder) model; "
                           "translate needs one trained with lmforge train --model seq2seq")


def encode_sources(model: Any, texts: list[str], on_long: str = "truncate") -> list[np.ndarray]:
    """Token ids of each source text, cut to the model's source context (or an error, on request)."""
    if on_long not in ("truncate", "error"):
        raise LMForgeError(f"--on-long must be truncate or error, not {on_long!r}")
    tok = getattr(model, "source_tokenizer", None) or model.tokenizer
    if tok is None:
        raise LMForgeError("the model has no tokenizer; load it from a run directory")
    limit = model.config.max_source_length
    out, n_long = [], 0
    for i, text in enumerate(texts):
        if not text.strip():
            raise LMForgeError(f"source {i + 1} is empty; give text to translate")
        ids = tok.encode_array(text)
        if len(ids) > limit:
            if on_long == "error":
                raise LMForgeError(f"source {i + 1} has {len(ids)} tokens, more than the model's source context "
                                   f"({limit}); shorten it or pass --on-long truncate")
            ids, n_long = ids[:limit], n_long + 1
        out.append(ids)
    if n_long:
        warnings.warn(f"{n_long} source(s) longer than the model's context ({limit} tokens) were truncated",
                      stacklevel=2)
    return out


@torch.no_grad()
def decode_batch(model: Any, sources: list[np.ndarray], beam: int = 1, length_penalty: float = 1.0,
                 early_stopping: bool = True, n_best: int = 1, max_new_tokens: int | None = None
                 ) -> list[list[Hypothesis]]:
    from ..data.parallel import source_batch

    model.eval()
    src_tok = getattr(model, "source_tokenizer", None) or model.tokenizer
    eos = model.tokenizer.eot_id
    device = model.embed.weight.device
    src, mask = (t.to(device) for t in source_batch(sources, src_tok.eot_id))
    c = model.config
    longest = max(len(s) for s in sources)
    limit = c.max_target_length - 1
    steps = min(limit, max_new_tokens if max_new_tokens is not None else 2 * longest + 10)
    state = model.encode_source(src, mask, max_length=steps + 1)
    start = torch.full((len(sources),), eos, dtype=torch.long, device=device)
    if beam <= 1 and n_best == 1:
        return [[h] for h in greedy_search(model, state, start, eos, steps)]
    return beam_search(model, state, start, eos, steps, num_beams=max(beam, 1), length_penalty=length_penalty,
                       early_stopping=early_stopping, num_return_sequences=n_best)


def translate(model: Any, texts: list[str], beam: int = 1, batch_size: int = 32, length_penalty: float = 1.0,
              early_stopping: bool = True, n_best: int = 1, max_new_tokens: int | None = None,
              on_long: str = "truncate", progress: bool = False, return_scores: bool = False) -> list[Any]:
    """Translate ``texts``; batches are formed from sources of similar length and the output keeps
    the input order. With ``n_best > 1`` or ``return_scores`` each item is a list of (text, score)."""
    require_seq2seq(model)
    if beam < 1 or batch_size < 1 or n_best < 1:
        raise LMForgeError("--beam, --batch-size and --n-best must be at least 1")
    if n_best > beam:
        raise LMForgeError(f"--n-best {n_best} needs --beam of at least {n_best}")
    sources = encode_sources(model, texts, on_long)
    order = np.argsort([len(s) for s in sources], kind="stable")
    results: list[Any] = [None] * len(texts)
    bar = tqdm(total=len(texts), desc="translate", unit="sent", disable=not progress, dynamic_ncols=True,
               file=sys.stderr)
    for a in range(0, len(order), batch_size):
        idx = order[a:a + batch_size]
        hyps = decode_batch(model, [sources[i] for i in idx], beam, length_penalty, early_stopping, n_best,
                            max_new_tokens)
        for i, hs in zip(idx, hyps):
            pairs = [(model.tokenizer.decode(h.tokens).strip(), h.score) for h in hs]
            results[i] = pairs if (n_best > 1 or return_scores) else pairs[0][0]
        bar.update(len(idx))
    bar.close()
    return results


@torch.no_grad()
def seq2seq_loss(model: Any, split: Any, batch_size: int = 32, max_pairs: int | None = None) -> dict[str, float]:
    """Teacher-forced test loss (nats per target token, end-of-text included) and perplexity."""
    from ..data.parallel import make_batch

    model.eval()
    c = model.config
    src_tok = getattr(model, "source_tokenizer", None) or model.tokenizer
    n = len(split) if max_pairs is None else min(len(split), max_pairs)
    total, count = 0.0, 0
    for a in range(0, n, batch_size):
        idx = range(a, min(n, a + batch_size))
        x, y = make_batch([split.ids("src", i) for i in idx], [split.ids("tgt", i) for i in idx],
                          model.tokenizer.eot_id, src_tok.eot_id, c.max_source_length, c.max_target_length)
        logits, _ = model(x)
        total += float(F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), y.reshape(-1),
                                       ignore_index=-100, reduction="sum"))
        count += int((y != -100).sum())
    loss = total / max(count, 1)
    return {"loss": loss, "perplexity": math.exp(loss), "target_tokens": count}


def bleu_chrf(hypotheses: list[str], references: list[str]) -> dict[str, Any]:
    import sacrebleu

    bleu = sacrebleu.metrics.BLEU()
    chrf = sacrebleu.metrics.CHRF()
    b = bleu.corpus_score(hypotheses, [references])
    c = chrf.corpus_score(hypotheses, [references])
    return {"bleu": round(b.score, 2), "chrf": round(c.score, 2), "bleu_signature": str(bleu.get_signature()),
            "chrf_signature": str(chrf.get_signature()), "bleu_detail": str(b)}


def evaluate_seq2seq(model: Any, data: str | Path, split: str = "test", beam: int = 1, batch_size: int = 32,
                     length_penalty: float = 1.0, max_pairs: int | None = None, progress: bool = True,
                     samples: int = 5) -> dict[str, Any]:
    """Test loss/perplexity (teacher forcing), then BLEU and chrF of the decoded split, and speed."""
    from ..data.parallel import ParallelData, load_data

    require_seq2seq(model)
    d = load_data(data)
    if not isinstance(d, ParallelData):
        raise LMForgeError(f"{data} is not parallel data; evaluate a seq2seq model on data made by lmforge prepare "
                           "from a parallel corpus")
    sp = d.split(split)
    res: dict[str, Any] = {"split": split, "beam": beam}
    res.update(seq2seq_loss(model, sp, batch_size, max_pairs))
    pairs = sp.texts[:max_pairs] if max_pairs else sp.texts
    t0 = time.perf_counter()
    hyps = translate(model, [s for s, _ in pairs], beam=beam, batch_size=batch_size, length_penalty=length_penalty,
                     progress=progress)
    dt = time.perf_counter() - t0
    res.update(bleu_chrf(hyps, [t for _, t in pairs]))
    res["pairs"] = len(pairs)
    res["decode_seconds"] = round(dt, 2)
    res["sentences_per_second"] = round(len(pairs) / max(dt, 1e-9), 2)
    res["samples"] = [{"source": s, "reference": t, "hypothesis": h} for (s, t), h in
                      list(zip(pairs, hyps))[:samples]]
    return res
