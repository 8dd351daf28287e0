"""decode_stack's one-region path (decode_stack_fused) against its general path, in one process.

    python bench/fused_stack.py [--layouts int8 int4] [--passes 1x1 1x8 8x1] [--threads 2] [--rounds 8]
                                [--context 64]

Llama blocks in lmforge's int8 (VNNI) and int4 layouts run every block of a pass in one OpenMP region
(kernels/decode_ops.cpp: the threads split the products' tiles, the rows' norms, activation rounding and SwiGLU,
and the attention tasks, between spinning barriers); ``LMFORGE_FUSED_STACK=0`` sends the same call through the
general path (ATen's parallel regions, tensors and dispatched ops per block). Both give the same bits (tests).
SmolLM2-135M, after a ``--context``-token prompt, passes of B rows x T tokens (``BxT``: 1x1 a decoding step, 1x8 a
speculative verify pass, 8x1 a batch-8 step), the whole ``forward_logits`` (head included), 40 passes per timing,
the two paths alternating round by round; best of ``--rounds`` each, their ratio, and every round's ratio.
Needs AVX512-VNNI (else the fused path does not exist here).
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from lmforge import kernels
from lmforge.hub import load_model
from lmforge.utils import machine_summary


def pass_ms(model: torch.nn.Module, ids: torch.Tensor, state: object, context: int, n: int = 40) -> float:
    """ms per forward of ``ids`` after ``context`` cached positions (the cache rewound before each)."""
    state.pos = context  # type: ignore[attr-defined]
    model.forward_logits(ids, state)  # type: ignore[operator]
    t0 = time.perf_counter()
    for _ in range(n):
        state.pos = context  # type: ignore[attr-defined]
        model.forward_logits(ids, state)  # type: ignore[operator]
    return (time.perf_counter() - t0) / n * 1e3


@torch.no_grad()
def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layouts", nargs="+", default=["int8", "int4"])
    ap.add_argument("--passes", nargs="+", default=["1x1", "1x8", "8x1"], help="rows x tokens per pass")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--context", type=int, default=64)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    if not (kernels.available() and kernels.int8_vnni()):
        raise SystemExit("decode_stack_fused needs lmforge's kernels on an AVX512-VNNI CPU")
    print(machine_summary(a.threads))
    for layout in a.layouts:
        model = load_model("smollm2", decode_dtype=layout)
        for spec in a.passes:
            B, T = map(int, spec.split("x"))
            state = model.init_state(B, a.context + T + 8)
            model.forward_logits(torch.arange(100, 100 + a.context)[None].repeat(B, 1), state, last_only=True)
            ids = torch.full((B, T), 5)

            times: dict[str, list[float]] = {"general": [], "fused": []}
            for _ in range(a.rounds):
                for path, flag in (("general", "0"), ("fused", "1")):
                    os.environ["LMFORGE_FUSED_STACK"] = flag
                    times[path].append(pass_ms(model, ids, state, a.context))
            os.environ.pop("LMFORGE_FUSED_STACK")
            g, f = min(times["general"]), min(times["fused"])
            print(f"{layout} {B}x{T}: general {g:.2f} ms, fused {f:.2f} ms, {g / f:.2f}x (rounds: "
                  + " ".join(f"{x / y:.2f}" for x, y in zip(times["general"], times["fused"])) + ")", flush=True)


if __name__ == "__main__":
    main()
