"""Weight-only int8 linear layers by row count: lmforge's kernel against PyTorch's, and the dequantised GEMM.

    python bench/int8_rows.py [--threads 1] [--rows 1 2 4 8 16 64 170] [--rounds 3]

SmolLM2-135M's 120 int8 matrices (30 layers of QKV 960x576, output 576x576, gate+up 3072x576, down 576x1536;
random weights, 107 MB, far beyond the caches, so every pass streams them from memory) multiplied by ``rows``
rows of bf16 activations, one pass over all of them per timing, best of ``--rounds``:

* lmforge: ``torch.ops.lmforge.int8_linear`` on its tiled layout (lmforge/kernels/decode_ops.cpp), what decoding
  steps use;
* torch: PyTorch's ``_weight_int8pack_mm``;
* gemm bf16 / gemm fp32: the weight dequantised (``q * scale``) and one ``F.linear``, what an int8 layer does
  from ``models.quant.GEMM_ROWS`` rows on (a prompt's prefill).

Prints ms per pass and the weight streaming rate (GB/s) with the CPU named.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from lmforge import kernels
from lmforge.models.quant import QuantLinear
from lmforge.utils import machine_summary

SHAPES = [(960, 576), (576, 576), (3072, 576), (576, 1536)] * 30


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 8, 16, 64, 170])
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    if not kernels.available():
        raise SystemExit("lmforge's kernels are not built here (g++ missing or LMFORGE_KERNELS=0)")
    print(machine_summary(), f"; lmforge kernels: {kernels.isa()}")
    g = torch.Generator().manual_seed(0)
    mats = []
    for o, i in SHAPES:  # lmforge's tiled q, its fp32 scale; PyTorch's row-major q, its bf16 scale
        lin = QuantLinear.from_weight(torch.randn(o, i, generator=g), None, "int8")
        mats.append((lin.qweight, lin.scale, lin.int8_weight(), lin.scale.bfloat16()))
    nbytes = sum(q.numel() + s.numel() * 4 for q, s, _, _ in mats)
    print(f"{len(mats)} int8 matrices, {nbytes / 1e6:.0f} MB")
    for M in a.rows:
        xs = {k: torch.randn(M, k, generator=g).bfloat16() for k in (576, 1536)}
        ways = {
            "lmforge": lambda xs=xs: [torch.ops.lmforge.int8_linear(xs[q.shape[1]], q, s) for q, s, _, _ in mats],
            "torch": lambda xs=xs: [torch._weight_int8pack_mm(xs[q.shape[1]], q, sb) for _, _, q, sb in mats],
            "gemm bf16": lambda xs=xs: [F.linear(xs[q.shape[1]], q.to(torch.bfloat16) * sb[:, None])
                                        for _, _, q, sb in mats],
            "gemm fp32": lambda xs=xs: [F.linear(xs[q.shape[1]].float(), q.float() * s[:, None])
                                        for _, s, q, _ in mats],
        }
        best: dict[str, float] = {}
        for _ in range(a.rounds):  # interleaved, best of the rounds
            for name, f in ways.items():
                t = time.perf_counter()
                f()
                best[name] = min(best.get(name, 1e9), time.perf_counter() - t)
        print(f"rows {M:4d}: " + "  ".join(f"{n} {v * 1e3:7.1f} ms ({nbytes / v / 1e9:4.1f} GB/s)"
                                          for n, v in best.items()), flush=True)


if __name__ == "__main__":
    main()
