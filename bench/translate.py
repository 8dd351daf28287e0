"""Translation speed and quality of a seq2seq run: greedy vs beam search, batch 1 vs batch 32.

    python bench/translate.py runs/de-en [--pairs 874] [--threads 2]

Decodes the first ``--pairs`` sentences of the run's test split with each setting, in the same
process, and prints sentences/s, BLEU and chrF (sacrebleu) and the ratios against greedy at batch 32
(the baseline). Run it on a quiet machine: other processes on the cores distort the timings.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from lmforge.data.parallel import ParallelData
from lmforge.evaluate.seq2seq import bleu_chrf
from lmforge.generation.seq2seq import translate
from lmforge.models import load_model
from lmforge.utils import machine_summary


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("run")
    ap.add_argument("--data", default=None)
    ap.add_argument("--pairs", type=int, default=None, help="default: the whole test split")
    ap.add_argument("--batch1-pairs", type=int, default=100, help="sentences for the (slow) batch-1 rows")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=None, help="also write the results here")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    model = load_model(a.run)
    data = a.data or json.load(open(f"{a.run}/data.json"))["data"]
    pairs = ParallelData(data).split("test").texts
    pairs = pairs[:a.pairs] if a.pairs else pairs
    settings = [("greedy", 1, 32, len(pairs)), ("beam 4", 4, 32, len(pairs)),
                ("greedy", 1, 1, a.batch1_pairs), ("beam 4", 4, 1, a.batch1_pairs)]
    translate(model, [s for s, _ in pairs[:32]], beam=4, batch_size=32)  # warm-up
    rows = []
    for name, beam, bs, n in settings:
        sub = pairs[:n]
        t0 = time.perf_counter()
        hyps = translate(model, [s for s, _ in sub], beam=beam, batch_size=bs)
        dt = time.perf_counter() - t0
        scores = bleu_chrf(hyps, [t for _, t in sub])
        rows.append({"decoding": name, "beam": beam, "batch_size": bs, "sentences": n,
                     "sentences_per_s": n / dt, "bleu": scores["bleu"], "chrf": scores["chrf"]})
    base = rows[0]["sentences_per_s"]
    print(machine_summary())
    print(f"{'decoding':8s} {'batch':>5s} {'sents':>6s} {'sent/s':>8s} {'vs greedy@32':>12s} {'BLEU':>6s} {'chrF':>6s}")
    for r in rows:
        print(f"{r['decoding']:8s} {r['batch_size']:5d} {r['sentences']:6d} {r['sentences_per_s']:8.1f} "
              f"{r['sentences_per_s'] / base:11.2f}x {r['bleu']:6.2f} {r['chrf']:6.2f}")
    print(f"BLEU signature: {bleu_chrf(['a'], ['a'])['bleu_signature']}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
