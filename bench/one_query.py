"""One bf16 query per head over a KV cache: the attention calls a decoding step can make, timed per call.

    python bench/one_query.py [--threads 1] [--keys 64 256 1024]

For SmolLM2's grouped heads (9 query heads over 3 key/value heads) and GPT-2's plain ones (12 heads), head size
64, batch 1: PyTorch's fused kernel as called plainly (``enable_gqa`` where heads are grouped), the fused kernel
with grouped query heads folded into the query axis, and three fp32 ops (scores, softmax, weighted sum) -- the
choices behind ``CausalSelfAttention._one_query`` -- and lmforge's ``attend_one`` (lmforge/kernels/decode_ops.cpp:
RoPE, the cache write and the attention in one call, what the fused decoding step uses; its bf16 body with
AVX512-BF16). Median microseconds of 300 calls.

``--tokens 8``: also T new tokens per call (a speculative verify pass): one ``attend_one`` call per token from Python
(what ``Block._step`` did) against one ``attend_rows`` call for all of them (what it does now; ``decode_stack``
makes the same call from C++), the same bits either way.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from lmforge import kernels
from lmforge.models.layers import one_query_fp32
from lmforge.utils import machine_summary


def per_call(fn, n: int = 300) -> float:  # noqa: ANN001
    for _ in range(20):
        fn()
    ts = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return 1e6 * sorted(ts)[n // 2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--keys", type=int, nargs="+", default=[64, 256, 1024])
    ap.add_argument("--tokens", type=int, nargs="*", default=[], help="new tokens per call for the attend_rows rows")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(machine_summary(args.threads))
    print(f"{'heads':<22} {'keys':>5} {'fused':>8} {'folded':>8} {'3 ops':>8} {'lmforge':>8}  (us per call)")
    for name, H, Hkv in (("SmolLM2 9 over 3 kv", 9, 3), ("GPT-2 12 (no groups)", 12, 12)):
        for S in args.keys:
            fused, folded, ops, own = time_calls(H, Hkv, S)
            print(f"{name:<22} {S:>5} {fused:>8.0f} {folded:>8.0f} {ops:>8.0f} {own:>8.0f}")
    if args.tokens and kernels.available():
        print(f"\n{'heads':<22} {'keys':>5} {'tokens':>6} {'per token':>10} {'attend_rows':>12}  (us per call)")
        for name, H, Hkv in (("SmolLM2 9 over 3 kv", 9, 3), ("GPT-2 12 (no groups)", 12, 12)):
            for S in args.keys:
                for T in args.tokens:
                    loop, rows = time_tokens(H, Hkv, S, T)
                    print(f"{name:<22} {S:>5} {T:>6} {loop:>10.0f} {rows:>12.0f}  {loop / rows:.2f}x")


def time_calls(H: int, Hkv: int, S: int) -> tuple[float, float, float, float]:
    """(fused, folded, three ops, lmforge's attend_one) microseconds per call; folded is nan without grouped heads,
    lmforge's without its kernels."""
    q = torch.randn(1, H, 1, 64).bfloat16()
    k, v = torch.randn(1, Hkv, S, 64).bfloat16(), torch.randn(1, Hkv, S, 64).bfloat16()
    fused = per_call(lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=Hkv != H))
    folded = (per_call(lambda: F.scaled_dot_product_attention(q.reshape(1, Hkv, H // Hkv, 64), k, v))
              if Hkv != H else float("nan"))
    own = float("nan")
    if kernels.available():  # the new token goes in at position S - 1 and attends to all S
        qkv, cos, sin = torch.randn(1, (H + 2 * Hkv) * 64).bfloat16(), torch.randn(1, 64).bfloat16(), \
            torch.randn(1, 64).bfloat16()
        kc, vc = k.contiguous(), v.contiguous()
        own = per_call(lambda: torch.ops.lmforge.attend_one(qkv, kc, vc, S - 1, None, cos, sin, H, Hkv))
    return fused, folded, per_call(lambda: one_query_fp32(q, k, v)), own


def time_tokens(H: int, Hkv: int, S: int, T: int) -> tuple[float, float]:
    """(T attend_one calls, one attend_rows call) microseconds: T new tokens at positions S - T .. S - 1."""
    qkv = torch.randn(1, T, (H + 2 * Hkv) * 64).bfloat16()
    kc, vc = torch.randn(1, Hkv, S, 64).bfloat16(), torch.randn(1, Hkv, S, 64).bfloat16()
    cos, sin = torch.randn(T, 64).bfloat16(), torch.randn(T, 64).bfloat16()

    def loop() -> list:
        return [torch.ops.lmforge.attend_one(qkv[:, i].contiguous(), kc, vc, S - T + i, None, cos[i], sin[i], H, Hkv)
                for i in range(T)]

    return per_call(loop), per_call(lambda: torch.ops.lmforge.attend_rows(qkv, kc, vc, S - T, None, cos, sin, H, Hkv))


if __name__ == "__main__":
    main()
