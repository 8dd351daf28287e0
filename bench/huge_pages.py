"""Decoding with the weights on 4 KiB pages against 2 MiB transparent huge pages, in one process.

    python bench/huge_pages.py [--layouts int8 int4 fp32] [--models smollm2 gpt2-shape] [--threads 2]
                               [--steps 64] [--rounds 5]

A batch-1 decoding step reads every weight once, so its speed is the memory streaming rate; the CPU's hardware
prefetchers do not cross a 4 KiB page, and each page costs a TLB walk. ``models.quant.pack_on_huge_pages``
(called by every decoding layout) moves the weights into one buffer on 2 MiB pages (``utils.huge_page_buffer``).
Here each model is loaded twice: once as it is laid out with ``LMFORGE_HUGEPAGES=0`` (malloc's 4 KiB pages, what the
layouts did before), once packed. Both decode ``--steps`` greedy steps after a 16-token prompt, alternating, best
of ``--rounds``; printed: ms per step, the weights' streaming rate (bytes of every parameter and buffer / step
time, outside the embedding tables, of which a step reads one row) and the ratio.
The memory each copy has on huge pages (/proc/self/smaps) is printed as a check.
"""

from __future__ import annotations

import argparse
import os
import time

os.environ["LMFORGE_HUGEPAGES"] = "0"  # the first copies load without; utils.huge_pages_available is cached

import torch  # noqa: E402

from lmforge import utils  # noqa: E402
from lmforge.generation.fast import prepare_for_decoding  # noqa: E402
from lmforge.hub import load_model  # noqa: E402
from lmforge.models.gpt import GPT, PRESETS, GPTConfig  # noqa: E402
from lmforge.models.quant import pack_on_huge_pages  # noqa: E402


def huge_kib() -> int:
    return sum(int(line.split()[1]) for line in open("/proc/self/smaps_rollup") if line.startswith("AnonHugePages"))


def build(name: str, layout: str) -> GPT:
    if name == "gpt2-shape":
        torch.manual_seed(0)
        return prepare_for_decoding(GPT(GPTConfig(**PRESETS["gpt2"])).eval(), layout)  # type: ignore[return-value]
    if layout in ("int8", "int4"):
        return load_model("smollm2", decode_dtype=layout)  # type: ignore[return-value]
    return prepare_for_decoding(load_model("smollm2"), layout)  # type: ignore[return-value]


def streamed_bytes(model: GPT) -> int:
    """Bytes of every parameter and buffer outside the embedding tables (a step reads one row of those)."""
    tables = {id(t) for m in model.modules() if isinstance(m, torch.nn.Embedding) for t in m.parameters()}
    seen = {id(t): t for m in model.modules() for t in [*m._parameters.values(), *m._buffers.values()]
            if t is not None and id(t) not in tables}
    return sum(t.numel() * t.element_size() for t in seen.values())


@torch.no_grad()
def step_ms(model: GPT, steps: int) -> float:
    prompt = torch.arange(100, 116)[None]
    state = model.init_state(1, 16 + steps + 1)
    logits, state = model.forward_logits(prompt, state, last_only=True)
    nxt = logits[:, -1].argmax(-1)
    t0 = time.perf_counter()
    for _ in range(steps):
        logits, state = model.forward_logits(nxt[:, None], state)
        nxt = logits[:, -1].argmax(-1)
    return (time.perf_counter() - t0) / steps * 1e3


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="+", default=["smollm2"], choices=["smollm2", "gpt2-shape"])
    ap.add_argument("--layouts", nargs="+", default=["int8", "int4", "fp32"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=5)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    print(utils.machine_summary(a.threads))
    for name in a.models:
        for layout in a.layouts:
            before = huge_kib()
            small = build(name, layout)
            nbytes = streamed_bytes(small)
            huge = build(name, layout)
            os.environ["LMFORGE_HUGEPAGES"] = "1"
            utils.huge_pages_available.cache_clear()
            moved = pack_on_huge_pages(huge)
            os.environ["LMFORGE_HUGEPAGES"] = "0"
            utils.huge_pages_available.cache_clear()
            print(f"{name} {layout}: {nbytes / 1e6:.0f} MB of weights; {moved / 1e6:.0f} MB packed, "
                  f"{(huge_kib() - before) / 1024:.0f} MiB of this process on huge pages")
            step_ms(small, 8), step_ms(huge, 8)  # warm-up (decode_stack's weights list, first-touch)
            t4k, t2m = [], []
            for _ in range(a.rounds):
                t4k.append(step_ms(small, a.steps))
                t2m.append(step_ms(huge, a.steps))
            b4k, b2m = min(t4k), min(t2m)
            print(f"  4 KiB pages: {b4k:.2f} ms/step ({nbytes / b4k / 1e6:.1f} GB/s)   "
                  f"2 MiB pages: {b2m:.2f} ms/step ({nbytes / b2m / 1e6:.1f} GB/s)   {b4k / b2m:.2f}x   "
                  f"(rounds: {' '.join(f'{x / y:.2f}' for x, y in zip(t4k, t2m))})")
            del small, huge


if __name__ == "__main__":
    main()
