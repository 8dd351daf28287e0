"""n-gram build time, memory, perplexity and scoring speed; lmforge vs NLTK in the same run.

    python bench/ngram.py [--skip-stdlib] [--nltk-words 300]

1. Build time and peak memory (each build in a fresh subprocess, ru_maxrss) for orders 3 and 5 on all of
   Shakespeare (word level) and on the Python standard library as whitespace-split text; test perplexity.
2. Scoring throughput in words/s.
3. Against NLTK's KneserNeyInterpolated (order 3) on Tiny Shakespeare (first 90% of lines train, last 10%
   test): fit time ratio and scoring speed ratio (NLTK is timed on a sample of test words: it is slow).
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from paths import shared_data  # bench/paths.py (the scripts run from bench/)

from lmforge.utils import machine_summary

TINY = shared_data("tinyshakespeare.txt")


def build_case(corpus: str, order: int, workdir: str) -> dict:
    """Run in a subprocess: prepare (cached), build, evaluate; report time and peak memory."""
    from lmforge.data import PrepareConfig, TokenData, prepare
    from lmforge.models.ngram import NGramModel

    data = Path(workdir) / f"{corpus}-words"
    if not (data / "meta.json").exists():
        prepare(PrepareConfig(corpus=corpus, out=str(data), tokenizer="word"), progress=False)
    td = TokenData(data)
    tok = td.tokenizer
    stream = td.split("train").read(0, len(td.split("train")))
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    m = NGramModel.train(stream, order, tok.vocab_size, eos=tok.eot_id, bos=tok.bos_id, unk=tok.unk_id,
                         discount_fallback=True)
    build = time.perf_counter() - t0
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    m.tokenizer = tok
    t0 = time.perf_counter()
    res = m.evaluate(td, split="test")
    score_s = time.perf_counter() - t0
    return {"corpus": corpus, "order": order, "train_words": int(len(stream)), "build_s": build,
            "peak_rss_mb": rss / 1024, "rss_before_build_mb": rss0 / 1024, "ngrams": m.meta["counts"],
            "test_ppl": res["perplexity"], "test_ppl_excl_oov": res.get("perplexity_excluding_oov"),
            "bits_per_byte": res["bits_per_byte"], "score_words_per_s": res["tokens"] / score_s}


def nltk_vs_lmforge(n_sample: int) -> dict:
    from nltk.lm import KneserNeyInterpolated
    from nltk.lm.preprocessing import padded_everygram_pipeline

    from lmforge.models.ngram import NGramModel
    from lmforge.tokenizers.word import WordTokenizer

    lines = TINY.read_text(encoding="utf-8").splitlines()
    cut = int(len(lines) * 0.9)
    train = [ln.split() for ln in lines[:cut] if ln.split()]
    test = [ln.split() for ln in lines[cut:] if ln.split()]
    # NLTK
    t0 = time.perf_counter()
    grams, vocab = padded_everygram_pipeline(3, train)
    nl = KneserNeyInterpolated(3)
    nl.fit(grams, vocab)
    nltk_fit = time.perf_counter() - t0
    words = [(s[max(0, i - 2):i], w) for s in test for i, w in enumerate(s)][:n_sample]
    t0 = time.perf_counter()
    for ctx, w in words:
        nl.logscore(w, ctx)
    nltk_wps = len(words) / (time.perf_counter() - t0)
    # lmforge, same text
    t0 = time.perf_counter()
    text = "\n".join(" ".join(s) for s in train) + "\n"
    tok = WordTokenizer.train([text])
    ids = tok.encode_array(text)
    m = NGramModel.train(ids, 3, tok.vocab_size, eos=tok.eot_id, bos=tok.bos_id, unk=tok.unk_id,
                         smoothing="kneser-ney", discount_fallback=True)
    ours_fit = time.perf_counter() - t0
    tids = tok.encode_array("\n".join(" ".join(s) for s in test) + "\n")
    x = torch.from_numpy(np.concatenate([[tok.eot_id], tids[:-1]])[None])
    y = torch.from_numpy(tids[None])
    t0 = time.perf_counter()
    lp, _ = m.score(x, y)
    ours_wps = len(tids) / (time.perf_counter() - t0)
    return {"nltk_fit_s": nltk_fit, "lmforge_fit_s": ours_fit, "fit_speedup": nltk_fit / ours_fit,
            "nltk_score_words_per_s": nltk_wps, "lmforge_score_words_per_s": ours_wps,
            "score_speedup": ours_wps / nltk_wps, "lmforge_test_ppl": math.exp(-lp.mean().item()),
            "nltk_sample_words": len(words)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--skip-stdlib", action="store_true")
    ap.add_argument("--nltk-words", type=int, default=300)
    ap.add_argument("--case", nargs=2, help=argparse.SUPPRESS)  # internal: CORPUS ORDER (subprocess)
    ap.add_argument("--workdir", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", default="bench/out/ngram.json")
    args = ap.parse_args()
    if args.case:
        print(json.dumps(build_case(args.case[0], int(args.case[1]), args.workdir)))
        return
    workdir = tempfile.mkdtemp()
    report: dict = {"builds": []}
    corpora = ["shakespeare"] + ([] if args.skip_stdlib else ["python-stdlib"])
    print(machine_summary())
    print(f"{'corpus':14s} {'order':>5s} {'words':>11s} {'build s':>8s} {'peak MB':>8s} {'test ppl':>9s} "
          f"{'ppl excl OOV':>12s} {'bits/byte':>9s} {'score w/s':>11s}")
    for corpus in corpora:
        for order in (3, 5):
            out = subprocess.run([sys.executable, __file__, "--case", corpus, str(order), "--workdir", workdir],
                                 capture_output=True, text=True, check=True)
            r = json.loads(out.stdout.strip().splitlines()[-1])
            report["builds"].append(r)
            print(f"{corpus:14s} {order:5d} {r['train_words']:11,} {r['build_s']:8.2f} {r['peak_rss_mb']:8.0f} "
                  f"{r['test_ppl']:9.1f} {r['test_ppl_excl_oov']:12.1f} {r['bits_per_byte']:9.4f} "
                  f"{r['score_words_per_s']:11,.0f}")
    n = nltk_vs_lmforge(args.nltk_words)
    report["nltk"] = n
    print(f"\nTiny Shakespeare, order 3, Kneser-Ney: NLTK fit {n['nltk_fit_s']:.2f}s, "
          f"lmforge {n['lmforge_fit_s']:.3f}s "
          f"-> {n['fit_speedup']:.0f}x faster")
    print(f"scoring: NLTK {n['nltk_score_words_per_s']:.1f} words/s ({n['nltk_sample_words']} words), lmforge "
          f"{n['lmforge_score_words_per_s']:,.0f} words/s -> {n['score_speedup']:,.0f}x faster")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
