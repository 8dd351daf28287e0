"""Find SmolLM2-135M's induction heads, and time ``lmforge inspect`` on 512 tokens of it.

    python bench/induction_heads.py [--model smollm2] [--length 50] [--seeds 3] [--out bench/out]

An induction head (Olsson et al. 2022) completes patterns [A][B] ... [A] -> [B]: on a sequence of random
tokens repeated twice, at position i of the second copy it attends to the token *after* the previous
occurrence of token i, i.e. position i - length + 1. The score of a head is that attention weight averaged
over the second copy (1.0: a perfect induction head; a head that attends uniformly scores about 1/i).
The weights come from ``lmforge.inspect`` (the exact attention path); the repeated half is also
predicted almost perfectly, which the per-token ranks show.

Then the timing part: ``lmforge.inspect`` (exact attention, every layer's logit lens, scoring) on
512 tokens of Shakespeare against one plain forward pass of the same tokens, interleaved over rounds,
and the size of the HTML page. Prints the CPU model and writes bench/out/induction_heads.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from paths import shared_data  # bench/paths.py (the scripts run from bench/)

import lmforge
from lmforge.evaluate.inspect_html import render_html
from lmforge.utils import machine_summary


def induction_scores(model, length: int, seed: int) -> np.ndarray:  # noqa: ANN001
    rng = np.random.default_rng(seed)
    tok = model.tokenizer
    rand = rng.integers(1000, model.vocab_size - 1000, size=length)  # ordinary tokens, no specials
    stream = np.concatenate([[tok.eot_id], rand, rand])
    rep = lmforge.inspect(model, tokens=stream)
    L, H = rep["attention"]["n_layer"], rep["attention"]["n_head"]
    scores = np.zeros((L, H))
    # stream index: 0 = eot, 1..length = first copy, length+1..2 length = second copy; the token at j in the
    # second copy first appeared at j - length, and the token after it is at j - length + 1
    dest = np.arange(length + 1, 2 * length + 1)
    for li, maps in enumerate(rep["attention"]["kinds"]["self"]["maps"]):
        scores[li] = maps[:, dest, dest - length + 1].mean(-1)
    second = rep["targets"]["rank"][length:]  # targets predicting the second copy's tokens 2..length
    return scores, float((second[1:] == 0).mean())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--length", type=int, default=50)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--out", default="bench/out")
    a = ap.parse_args()
    cpu = machine_summary()
    print(cpu)
    model = lmforge.load(a.model)
    runs = [induction_scores(model, a.length, seed) for seed in range(a.seeds)]
    scores = np.mean([r[0] for r in runs], axis=0)
    top1 = float(np.mean([r[1] for r in runs]))
    order = np.argsort(-scores, axis=None)[:8]
    best = [(int(i // scores.shape[1]), int(i % scores.shape[1]), float(scores.flat[i])) for i in order]
    print(f"induction scores (mean over {a.seeds} random sequences of {a.length} tokens, repeated):")
    for li, h, s in best:
        print(f"  layer {li:2d} head {h}: {s:.3f}")
    print(f"second copy predicted as the top token: {top1:.1%} of positions")

    # timing: inspect vs one forward pass, interleaved rounds, on real text
    # ../shared/data beside the checkout (or beside the folder of worktrees)
    text_path = shared_data("tinyshakespeare.txt")
    text = text_path.read_text(encoding="utf-8")[:20_000] if text_path.exists() else "To be, or not to be. " * 400
    ids = model.tokenizer.encode_array(text)[: a.tokens - 1]
    stream = np.concatenate([[model.tokenizer.eot_id], ids])
    t_fwd, t_insp, t_html = [], [], []
    for _ in range(a.rounds):
        t0 = time.perf_counter()
        with torch.no_grad():
            model.forward_logits(torch.from_numpy(stream)[None])
        t_fwd.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        rep = lmforge.inspect(model, tokens=stream, name=f"{a.model}, {len(stream)} tokens of Tiny Shakespeare")
        t_insp.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        page = render_html(rep)
        t_html.append(time.perf_counter() - t0)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "smollm2_512.html").write_text(page, encoding="utf-8")
    res = {"cpu": cpu, "threads": torch.get_num_threads(), "model": a.model, "length": a.length, "seeds": a.seeds,
           "best_heads": best, "top1_second_copy": top1, "tokens": len(stream),
           "forward_s": min(t_fwd), "inspect_s": min(t_insp), "html_s": min(t_html),
           "inspect_over_forward": min(t_insp) / min(t_fwd), "html_bytes": len(page.encode("utf-8"))}
    print(f"{len(stream)} tokens: forward {res['forward_s']:.2f}s, inspect {res['inspect_s']:.2f}s "
          f"({res['inspect_over_forward']:.1f}x), HTML {res['html_s']:.2f}s, {res['html_bytes'] / 1e6:.1f} MB "
          f"(best of {a.rounds} interleaved rounds)")
    (out / "induction_heads.json").write_text(json.dumps(res, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
