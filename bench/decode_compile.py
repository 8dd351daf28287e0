"""Does the compiled decode step pay? SmolLM2-135M, batch 1, greedy, eager vs torch.compile'd step.

    python bench/decode_compile.py [--dtype int4] [--new-tokens 64] [--rounds 2] [--threads 1]

Times the first compiled generation (Dynamo tracing + Inductor's C++ compile; a second process reuses
Inductor's on-disk caches), then alternates eager and compiled generations (A/B rounds: the machine may be
shared) and reports tokens/s and tokens per CPU-second of each, and the break-even length.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from lmforge.generation import GenerationConfig, generate_ids
from lmforge.hub import load_model
from lmforge.utils import machine_summary


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dtype", default="int4")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    print(machine_summary())
    model = load_model("smollm2", decode_dtype=a.dtype)
    prompt = list(range(100, 116))

    def run(mode: str) -> tuple[float, float, list[int]]:
        cfg = GenerationConfig(max_new_tokens=a.new_tokens, temperature=0, ignore_eos=True, compile=mode)
        t0, c0 = time.perf_counter(), time.process_time()
        out = generate_ids(model, prompt, cfg)[0]
        return time.perf_counter() - t0, time.process_time() - c0, out

    eager = run("off")
    t0 = time.perf_counter()
    first = run("on")
    compile_s = time.perf_counter() - t0 - eager[0]
    agree = next((i for i, (x, y) in enumerate(zip(first[2], eager[2])) if x != y), len(eager[2]))
    print(f"first compiled generation: {first[0]:.1f} s (compile ~{compile_s:.0f} s); greedy tokens equal to "
          f"eager's for the first {agree} of {len(eager[2])}", flush=True)
    times: dict[str, list[tuple[float, float]]] = {"off": [], "on": []}
    for _ in range(a.rounds):
        for mode in ("off", "on"):
            dt, cpu, out = run(mode)
            times[mode].append((dt, cpu))
    n = a.new_tokens
    res = {m: (n / statistics.median(t[0] for t in v), n / statistics.median(t[1] for t in v))
           for m, v in times.items()}
    for m, (tps, tpc) in res.items():
        print(f"{'compiled' if m == 'on' else 'eager':8s}: {tps:.1f} tok/s, {tpc:.1f} tok/CPU-s")
    saved = 1 / res["off"][0] - 1 / res["on"][0]
    print(f"speed-up {res['on'][0] / res['off'][0]:.2f}x (CPU {res['on'][1] / res['off'][1]:.2f}x); "
          f"break-even after ~{compile_s / saved:.0f} tokens" if saved > 0 else "no saving")


if __name__ == "__main__":
    main()
