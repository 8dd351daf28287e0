"""Training throughput: lmforge's trainer step vs nanoGPT's, same shapes, same process.

    python bench/train_throughput.py [--seconds 20] [--shapes small]

Reports tokens/s, ms/iter and model FLOPs utilisation (MFU) against a matmul peak measured in the
same run (fp32 and bf16), for nanoGPT's two shakespeare_char shapes:
  A: 4L/4H/128d, block 64, batch 12     (nanoGPT's CPU recipe)
  B: 6L/6H/384d, block 256, batch 64    (nanoGPT's "baby GPT")
lmforge is measured fp32 eager, bf16 autocast, bf16 with PyTorch's flash attention in place of lmforge's own
causal-attention kernel (what the kernel adds), and (with --compile) torch.compile.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from nanogpt_ref import NanoGPT, train_step  # noqa: E402
from paths import shared_data  # noqa: E402

from lmforge.data import PrepareConfig, prepare  # noqa: E402
from lmforge.models import layers  # noqa: E402
from lmforge.train import TrainConfig, Trainer  # noqa: E402
from lmforge.utils import dtype_probe, machine_summary, resolve_dtype  # noqa: E402

TINY = shared_data("tinyshakespeare.txt")
SHAPES = {
    "A": dict(n_layer=4, n_head=4, n_embd=128, block_size=64, batch=12),
    "B": dict(n_layer=6, n_head=6, n_embd=384, block_size=256, batch=64),
}


def matmul_peak(dtype: torch.dtype, n: int = 1024, seconds: float = 2.0) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    for _ in range(3):
        a @ b
    k, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        k += 1
    return 2 * n ** 3 * k / (time.perf_counter() - t0)


def timed(step, seconds: float, warmup: int) -> tuple[float, int]:
    for _ in range(warmup):
        step()
    k, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds or k < 5:
        step()
        k += 1
    return (time.perf_counter() - t0) / k, k


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=20.0, help="timed seconds per configuration")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds (the median counts)")
    ap.add_argument("--shapes", default="A,B")
    ap.add_argument("--compile", action="store_true", help="also measure torch.compile")
    ap.add_argument("--out", default="bench/out/train_throughput.json")
    args = ap.parse_args()
    torch.manual_seed(0)
    print(machine_summary())
    auto = resolve_dtype("auto", "train")  # what --dtype auto trains in here (the probe's line goes to stderr)
    print(f"--dtype auto -> {auto} for training: {dtype_probe('train')[1]}")
    peak32, peak16 = matmul_peak(torch.float32), matmul_peak(torch.bfloat16)
    print(f"matmul peak (1024^3): fp32 {peak32 / 1e9:.0f} GFLOP/s, bf16 {peak16 / 1e9:.0f} GFLOP/s")
    tmp = Path(tempfile.mkdtemp())
    # nanoGPT's vocabulary (65 characters; + <|endoftext|>): no byte-fallback tokens, so both models
    # compute the same output layer
    prepare(PrepareConfig(corpus=str(TINY), out=str(tmp / "data"), split="contiguous", val_frac=0.1,
                          test_frac=0.0, byte_fallback=False), progress=False)
    raw = np.memmap(tmp / "data" / "train-00000.bin", dtype=np.uint16, mode="r").astype(np.uint16)
    results = []
    for name in args.shapes.split(","):
        s = SHAPES[name]
        bs, blk = s["batch"], s["block_size"]
        tokens = bs * blk
        # nanoGPT baseline (vocabulary 65 + <|endoftext|>, as ours here)
        ref = NanoGPT(66, blk, s["n_layer"], s["n_head"], s["n_embd"])
        opt = ref.optimizer()
        n_params = sum(p.numel() for p in ref.parameters()) - ref.wpe.weight.numel()
        configs = {"nanoGPT eager fp32": (lambda ref=ref, opt=opt, b=bs, t=blk: train_step(ref, opt, raw, b, t),
                                          6 * n_params + 12 * s["n_layer"] * blk * s["n_embd"], "fp32")}
        own = layers.CAUSAL_KERNEL_MAX_T  # lmforge's causal-attention kernel up to this many positions; 0 = off
        variants = [("lmforge fp32", "fp32", False, own), ("lmforge bf16", "bf16", False, own),
                    ("lmforge bf16, torch attn", "bf16", False, 0)]
        if args.compile:
            variants += [("lmforge compile fp32", "fp32", True, own), ("lmforge compile bf16", "bf16", True, own)]
        for label, dtype, comp, max_t in variants:
            cfg = TrainConfig(data=str(tmp / "data"), out=str(tmp / f"run-{name}-{label.replace(' ', '_')}"),
                              preset="nano", batch_size=bs, max_steps=10 ** 9, dtype=dtype, compile=comp,
                              progress=False, model_args=dict(n_layer=s["n_layer"], n_head=s["n_head"],
                                                               n_embd=s["n_embd"], block_size=blk))
            tr = Trainer(cfg)

            def step(tr: Trainer = tr, max_t: int = max_t) -> None:
                layers.CAUSAL_KERNEL_MAX_T = max_t
                tr.train_step()

            for _ in range(3 if comp else 1):  # compile happens here, outside the timing
                step()
            configs[label] = (step, tr.model.flops_per_token(), dtype)
        # Interleave: every configuration is timed in each of `rounds` rounds, and the median round counts,
        # so a slow patch of the machine hits all of them alike.
        times: dict[str, list[float]] = {k: [] for k in configs}
        for _ in range(args.rounds):
            for label, (step, _, _) in configs.items():
                dt, _ = timed(step, args.seconds / args.rounds, 1)
                times[label].append(dt)
        rows = []
        for label, (_, fl, dtype) in configs.items():
            dt = float(np.median(times[label]))
            tps = tokens / dt
            rows.append((label, dt, tps, fl * tps / (peak16 if dtype == "bf16" else peak32)))
        base = rows[0][2]
        print(f"\nshape {name}: {s['n_layer']}L/{s['n_head']}H/{s['n_embd']}d block {blk} batch {bs}")
        print(f"  {'config':26s} {'ms/iter':>8s} {'tokens/s':>10s} {'MFU':>6s} {'vs nanoGPT':>10s}")
        for label, dt, tps, mfu in rows:
            print(f"  {label:26s} {dt * 1e3:8.1f} {tps:10,.0f} {mfu * 100:5.1f}% {tps / base:9.2f}x")
            results.append({"shape": name, "config": label, "ms_per_iter": dt * 1e3, "tokens_per_s": tps,
                            "mfu": mfu, "speedup_vs_nanogpt": tps / base})
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"peak_fp32": peak32, "peak_bf16": peak16, "rows": results}, indent=2))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
