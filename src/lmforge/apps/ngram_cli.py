"""Command-line pieces for n-gram models: training, ARPA export/import, and KenLM-style query."""

from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import fields
from pathlib import Path
from typing import Any

import numpy as np

from ..data import TokenData
from ..errors import LMForgeError
from ..evaluate import evaluate
from ..hub.arpa import export_arpa, import_arpa
from ..models import load_model
from ..models.ngram import NGramConfig, NGramModel
from ..options import add_options, given
from ..tokenizers import load_tokenizer
from ..utils import atomic_write_json, check_output_file, refuse_nonempty


def add_train_arguments(p: argparse.ArgumentParser) -> list[str]:
    return add_options(p.add_argument_group("n-gram models (--model ngram)"), NGramConfig)


def train_ngram(data_dir: str, out: str, order: int = 3, smoothing: str = "modified-kneser-ney",
                k: float = 1.0, discount_fallback: bool = False, verbose: bool = True,
                max_tokens: int | None = None) -> dict[str, Any]:
    """Count and smooth on the train split, save the run directory, report val perplexity.
    ``max_tokens``: count only the first N training tokens (a token budget; further passes over the
    same tokens would add nothing to the counts)."""
    NGramConfig(order=order, smoothing=smoothing, add_k=k, discount_fallback=discount_fallback)  # type: ignore
    out_dir = refuse_nonempty(out)
    td = TokenData(data_dir)
    tok = td.tokenizer
    t0 = time.perf_counter()
    n_train = len(td.split("train"))
    stream = np.asarray(td.split("train").read(0, n_train if max_tokens is None else min(n_train, max_tokens)))
    model = NGramModel.train(stream, order, tok.vocab_size, eos=tok.eot_id, bos=tok.bos_id,
                             unk=tok.unk_id, smoothing=smoothing, k=k,
                             discount_fallback=discount_fallback)
    secs = time.perf_counter() - t0
    model.tokenizer = tok
    model.save_pretrained(out_dir)
    metrics: dict[str, Any] = {"build_seconds": secs, "train_tokens": int(len(stream)), "max_tokens": max_tokens,
                               "ngram_counts": model.meta["counts"], "discounts": model.meta["discounts"]}
    if td.has_split("val"):
        res = evaluate(model, td, split="val")
        metrics.update(val_loss=res["loss"], val_perplexity=res["perplexity"], val_bits_per_byte=res["bits_per_byte"])
    atomic_write_json(out_dir / "metrics.json", metrics)
    atomic_write_json(out_dir / "data.json", {"data": str(Path(data_dir).resolve()),
                                              "corpus_sha256": td.meta["corpus"]["sha256"]})
    if verbose:
        counts = ", ".join(f"{n + 1}-grams {c:,}" for n, c in enumerate(model.meta["counts"]))
        print(f"built a {order}-gram {smoothing} model in {secs:.2f}s from {len(stream):,} tokens: {counts}")
        if "val_perplexity" in metrics:
            print(f"val perplexity {metrics['val_perplexity']:.3f}, {metrics['val_bits_per_byte']:.4f} bits/byte")
        print(f"saved {out_dir}")
    return metrics


def train_ngram_from_args(a: argparse.Namespace, max_tokens: int | None = None) -> dict[str, Any]:
    c = NGramConfig(**given(a, [f.name for f in fields(NGramConfig)]))
    return train_ngram(a.data, a.out, order=c.order, smoothing=c.smoothing, k=c.add_k,
                       discount_fallback=c.discount_fallback, max_tokens=max_tokens)


def cmd_export(a: argparse.Namespace) -> int:
    check_output_file(a.file, a.force, option="ARPA file")  # before the model is loaded
    model = load_model(a.run)
    if not isinstance(model, NGramModel):
        raise LMForgeError(f"{a.run} is a {model.model_type} model, not an n-gram model")
    export_arpa(model, a.file, force=a.force)
    print(f"wrote {a.file}")
    return 0


def cmd_import(a: argparse.Namespace) -> int:
    tok = load_tokenizer(a.tokenizer_from) if a.tokenizer_from else None
    out = refuse_nonempty(a.out)
    model = import_arpa(a.file, tok)
    model.save_pretrained(out)
    print(f"imported a {model.order}-gram model ({', '.join(map(str, model.meta['counts']))} n-grams) -> {out}")
    return 0


def cmd_query(a: argparse.Namespace) -> int:
    """Like KenLM's query: per-sentence log10 probability with the n-gram length used per word."""

    model = load_model(a.run)
    if not isinstance(model, NGramModel) or model.tokenizer is None:
        raise LMForgeError(f"{a.run} is not an n-gram model with a tokenizer")
    tok = model.tokenizer
    total = total_oov = 0.0
    n_tokens = n_oov = 0
    unk = tok.unk_id
    for line in sys.stdin:
        ids = tok.encode(line.rstrip("\n") + "\n")  # every query line is a sentence: </s> is scored
        if not ids:
            continue
        ctx = np.concatenate([[model.eos], ids[:-1]]) if len(ids) > 1 else np.array([model.eos])
        hist = model.init_state(1).numpy()[0]
        lp, matched = model.score_stream(np.concatenate([hist, ctx]), np.array(ids))
        lp10 = lp / math.log(10)
        parts = []
        oov = 0
        for i, (w, l, n) in enumerate(zip(ids, lp10, matched)):
            word = "</s>" if w == model.eos else tok.id_to_token(w)
            if w == unk:
                word, oov = line.split()[i] if tok.kind == "word" and i < len(line.split()) else "<unk>", oov + 1
                total_oov += l
            parts.append(f"{word}={w if w != unk else 0} {n} {l:.7g}")
        s = float(lp10.sum())
        print("\t".join(parts) + f"\tTotal: {s:.7g} OOV: {oov}")
        total += s
        n_tokens += len(ids)
        n_oov += oov
    if n_tokens:
        print(f"Perplexity including OOVs:\t{10 ** (-total / n_tokens):.7g}")
        kept = n_tokens - n_oov
        print(f"Perplexity excluding OOVs:\t{10 ** (-(total - total_oov) / max(kept, 1)):.7g}")
        print(f"OOVs:\t{n_oov}\nTokens:\t{n_tokens}")
    return 0


def add_ngram_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("ngram", help="n-gram tools: ARPA export/import, KenLM-style query")
    s = p.add_subparsers(dest="ngram_command", metavar="ACTION", required=True)
    e = s.add_parser("export", help="write an n-gram run as an ARPA file")
    e.add_argument("run", help="n-gram run directory")
    e.add_argument("file", help="ARPA file to write")
    e.add_argument("--force", action="store_true", help="replace FILE if it exists")
    e.set_defaults(func=cmd_export)
    i = s.add_parser("import", help="read an ARPA file into a run directory")
    i.add_argument("file", help="ARPA file to read")
    i.add_argument("--out", required=True, help="run directory to create")
    i.add_argument("--tokenizer-from", default=None, help="a data or run directory whose tokenizer the ARPA uses")
    i.set_defaults(func=cmd_import)
    q = s.add_parser("query", help="score sentences from standard input, like KenLM's query")
    q.add_argument("run", help="n-gram run directory")
    q.set_defaults(func=cmd_query)
