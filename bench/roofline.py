"""The bandwidth roofline of batch-1 decoding: how many tokens/s reading the weights alone allows here.

    python bench/roofline.py [--threads 2] [--generate-json bench/out/generate.json]

Batch-1 decoding reads every weight matrix once per token, so no implementation can decode faster than
(memory read bandwidth) / (bytes of weights read per token). This script measures the read bandwidth
(``sum`` over 1 GiB, best of 5, at ``--threads``) and the bytes per token of each layout of the models
bench/generate.py times (the Linear layers after ``prepare_for_decoding`` or the GGUF load, the LM head
included; the embedding row, norms and the short KV cache are negligible), and prints the roofline tokens/s.
With ``--generate-json`` (bench/generate.py's ``--json``) it also prints each measured batch-1 figure as a
share of its roofline, and the most a faster implementation could gain over the baseline it is compared to.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from generate import build  # bench/generate.py (the scripts run from bench/)

from lmforge.models.quant import QuantLinear
from lmforge.utils import machine_summary


def read_bandwidth(gib: float = 1.0, repeats: int = 5) -> float:
    """Bytes/s of a streaming read (torch.sum over a tensor far larger than the caches), best of ``repeats``."""
    x = torch.ones(int(gib * 2**30) // 4)
    x.sum()
    best = min(_timed(x.sum) for _ in range(repeats))
    return x.numel() * 4 / best


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes batch-1 decoding reads per token: every weight matrix (the head included)."""
    qs = [m for m in model.modules() if isinstance(m, QuantLinear)]
    if qs:
        return sum(m.nbytes for m in qs)
    # an untransformed model: its Linear weights (a tied head reads the embedding matrix)
    lin = [m.weight for m in model.modules() if isinstance(m, torch.nn.Linear)]
    return sum(w.numel() * w.element_size() for w in {id(w): w for w in lin}.values())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--models", nargs="+", default=["smollm2", "gpt2-shape"])
    ap.add_argument("--generate-json", default=None, help="bench/generate.py --json output to set against")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    print(machine_summary())
    bw = read_bandwidth()
    print(f"memory read bandwidth: {bw / 1e9:.1f} GB/s ({a.threads} threads, best of 5 sums over 1 GiB)")
    measured: dict[tuple, float] = {}
    if a.generate_json:
        rows = json.loads(Path(a.generate_json).read_text())["results"]
        by: dict[tuple, list] = {}
        for r in rows:
            if r["batch"] == 1:
                by.setdefault((r["model"], r["impl"], r["dtype"]), []).append(r["tokens_per_s"])
        measured = {k: statistics.median(v) for k, v in by.items()}
    print(f"{'model':12} {'layout':6} {'MB/token':>9} {'roofline tok/s':>15} {'lmforge':>8} {'% roof':>7}")
    same_bytes = {"Q4_1": "int4", "Q4_0": "int4", "Q8_0": "int8"}  # 0.5625-0.625 / 1.06 bytes per weight
    for name in a.models:
        roofs = {}
        for dtype in ("fp32", "bf16", "int8", "int4"):
            model = build(name, dtype)
            nb = weight_bytes(model)
            roofs[dtype] = roof = bw / nb
            got = measured.get((name, "lmforge", dtype))
            extra = f"{got:8.1f} {100 * got / roof:6.0f}%" if got else ""
            print(f"{name:12} {dtype:6} {nb / 1e6:9.1f} {roof:15.1f} {extra}")
            del model
        base = measured.get((name, "transformers", "fp32"))
        if base:
            print(f"{name}: transformers fp32 {base:.1f} tok/s = {100 * base / roofs['fp32']:.0f}% of the fp32 "
                  f"roofline: no fp32 implementation can be more than {roofs['fp32'] / base:.2f}x faster here")
        for q, dt in same_bytes.items():
            got = measured.get((name, "llama.cpp", q))
            if got:
                print(f"{name}: llama.cpp {q} {got:.1f} tok/s = {100 * got / roofs[dt]:.0f}% of the {dt} roofline: "
                      f"no {dt} implementation can be more than {roofs[dt] / got:.2f}x faster here")

if __name__ == "__main__":
    main()
