"""Evaluation of encoder-decoder models: teacher-forced loss and perplexity, then BLEU and chrF of the
decoded split.

BLEU (Papineni et al. 2002) and chrF (Popovic 2015) are computed by ``sacrebleu`` on detokenized
text against the raw references, and reported with sacrebleu's signature so that the numbers are
comparable with published ones.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..data.parallel import ParallelData, load_data, make_batch
from ..errors import LMForgeError
from ..generation.seq2seq import require_seq2seq, translate
from . import EvalConfig


@torch.no_grad()
def seq2seq_loss(model: Any, split: Any, batch_size: int = 32, max_pairs: int | None = None) -> dict[str, float]:
    """Teacher-forced test loss (nats per target token, end-of-text included) and perplexity."""
    model.eval()
    c = model.config
    src_tok = model.encoder_tokenizer
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
    import sacrebleu  # ~0.3 s of imports that only seq2seq evaluation needs

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
    EvalConfig(split=split, beam=beam, batch_size=batch_size, length_penalty=length_penalty,  # type: ignore[arg-type]
               max_pairs=max_pairs)
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
