"""Decoding for encoder-decoder models: encode the sources once, then greedy or beam search
(``generation/search.py``) on the decoder. ``lmforge translate`` and seq2seq evaluation call ``translate``."""

from __future__ import annotations

import sys
import warnings
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from tqdm import tqdm

from ..data.parallel import source_batch
from ..errors import LMForgeError
from ..models.base import LanguageModel
from ..options import Options, option
from .search import Hypothesis, beam_search, greedy_search


@dataclass
class TranslateConfig(Options):
    """The decoding options of ``lmforge translate`` (and of :func:`translate`)."""

    beam: int = option(1, ge=1, le=256, help="beam size (1 = greedy)")
    batch_size: int = option(32, ge=1, le=1 << 20, help="sources decoded together")
    length_penalty: float = option(1.0, ge=-10, le=10, help="beam length penalty (score / length^p)")
    early_stopping: bool = option(True, help="stop a beam once num_beams hypotheses finish "
                                  "(--no-early-stopping keeps searching)")
    n_best: int = option(1, ge=1, le=256, help="return the N best translations with scores")
    max_new_tokens: int | None = option(None, ge=1, le=1 << 20, help="longest translation (tokens)",
                                        default_text="2 x the source + 10, at most the model's target length")
    on_long: Literal["truncate", "error"] = option(
        "truncate", help="a source longer than the model's context: cut it with a warning, or stop")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.n_best > self.beam:
            raise LMForgeError(f"--n-best {self.n_best} needs --beam of at least {self.n_best}")


def require_seq2seq(model: LanguageModel, where: str = "") -> None:
    if not model.is_seq2seq:
        raise LMForgeError(f"{where or 'this model'} is a {model.model_type} model, not a seq2seq "
                           "(encoder-decoder) model; translate needs one trained with lmforge train --model seq2seq")


def encode_sources(model: Any, texts: list[str], on_long: str = "truncate") -> list[np.ndarray]:
    """Token ids of each source text, cut to the model's source context (or an error, on request)."""
    tok = model.encoder_tokenizer
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
    model.eval()
    src_tok = model.encoder_tokenizer
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
    TranslateConfig(beam=beam, batch_size=batch_size, length_penalty=length_penalty, early_stopping=early_stopping,
                    n_best=n_best, max_new_tokens=max_new_tokens, on_long=on_long)  # type: ignore[arg-type]
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
