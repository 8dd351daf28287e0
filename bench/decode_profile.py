"""Where the time of one decoded token goes: torch.profiler over SmolLM2-135M decoding steps, per layout.

    python bench/decode_profile.py [--layouts fp32 int8 int4] [--steps 20] [--threads 1] [--batch 8]
                                   [--prompt-tokens 64]

For each layout (fp32: the GGUF dequantized and transposed; int8/int4: loaded straight from the GGUF), 20
decoding steps of ``--batch`` rows after a ``--prompt-tokens`` prompt are profiled; operators are grouped into
weight matrix products, attention, norms, elementwise/other ops, and what the profiler does not see (Python
and dispatch between operators: wall time minus the operators' self time). The output head's share of the
weight products is timed on its own, and the step's CPU time is printed too (a shared machine inflates wall
time, CPU time much less), and the step's time block by block (``Block._step`` per block, as without lmforge's
``decode_stack``: the same ops with Python between them), interleaved with the stack's.
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict
from unittest import mock

import torch
from torch.profiler import profile

from lmforge import kernels
from lmforge.generation.fast import prepare_for_decoding
from lmforge.hub import load_model
from lmforge.utils import machine_summary

GROUPS = {
    "weight matmuls": ("aten::mm", "aten::addmm", "aten::_weight_int8pack_mm", "aten::_weight_int4pack_mm_for_cpu",
                       "aten::linear", "aten::matmul", "lmforge::int8_linear", "lmforge::int4_linear"),
    "attention": ("aten::_scaled_dot_product_flash_attention_for_cpu", "aten::scaled_dot_product_attention",
                  "aten::_scaled_dot_product_attention_math", "lmforge::attend_one"),
    # every block's step in one call: its own time holds lmforge's int8 products, attention and norms (int4 products
    # and SwiGLU are dispatched ops of their own, listed in their groups)
    "blocks in one call (decode_stack's own time)": ("lmforge::decode_stack",),
    "norms": ("aten::rms_norm", "aten::_fused_rms_norm", "aten::layer_norm", "aten::native_layer_norm",
              "lmforge::rms_norm"),
}


def group_of(name: str) -> str:
    return next((g for g, names in GROUPS.items() if name in names), "elementwise, copies, views")


@torch.no_grad()
def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layouts", nargs="+", default=["fp32", "int8", "int4"])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch", type=int, default=1, help="rows decoded together")
    ap.add_argument("--prompt-tokens", type=int, default=64)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    print(machine_summary(), f"; lmforge kernels: {kernels.isa() or 'off (PyTorch ops)'}")
    for layout in a.layouts:
        model = load_model("smollm2", decode_dtype=layout) if layout in ("int8", "int4") else \
            prepare_for_decoding(load_model("smollm2"), layout)
        B, P = a.batch, a.prompt_tokens
        state = model.init_state(B, P + 3 * a.steps + 8)
        model.forward_logits(torch.arange(100, 100 + P)[None].repeat(B, 1), state)
        tok = torch.full((B, 1), 5)
        for _ in range(3):
            model.forward_logits(tok, state)
        t0 = time.perf_counter()
        with profile() as prof:
            for _ in range(a.steps):
                model.forward_logits(tok, state)
        wall = (time.perf_counter() - t0) / a.steps * 1000
        bare, cpu = time_steps(model, tok, state, a.steps)
        with mock.patch.object(type(model), "_decode_stack", lambda self: None):  # block by block (Block._step)
            blocks, _ = time_steps(model, tok, state, a.steps)
        stack_ms, _ = time_steps(model, tok, state, a.steps)  # again, after: the median of the two stands
        bare = (bare + stack_ms) / 2
        h = torch.zeros(B, 1, model.config.n_embd, dtype=model.wte.weight.dtype)
        c0 = time.process_time()
        for _ in range(a.steps):
            model.lm_head(h)
        head = (time.process_time() - c0) / a.steps * 1000
        groups: dict[str, float] = defaultdict(float)
        for ev in prof.key_averages():
            groups[group_of(ev.key)] += ev.self_cpu_time_total / 1000 / a.steps
        seen = sum(groups.values())
        groups["Python + dispatch (unseen by the profiler)"] = max(wall - seen, 0.0)
        print(f"{layout}, batch {B}, {P}-token prompt: {bare:.1f} ms/step without the profiler ({cpu:.1f} ms of CPU "
              f"time; the output head alone {head:.1f} ms of CPU), {wall:.1f} ms with it; block by block (without "
              f"decode_stack) {blocks:.1f} ms/step")
        for g, ms in sorted(groups.items(), key=lambda kv: -kv[1]):
            print(f"  {g:44s} {ms:6.2f} ms  {100 * ms / wall:5.1f}%")
        del model, state


def time_steps(model, tok: torch.Tensor, state, steps: int) -> tuple[float, float]:  # noqa: ANN001
    """(wall, CPU) ms per decoding step; the cache is rewound after, so every timing decodes the same positions."""
    pos = state.pos
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(steps):
        model.forward_logits(tok, state)
    wall, cpu = (time.perf_counter() - t0) / steps * 1000, (time.process_time() - c0) / steps * 1000
    state.pos = pos
    return wall, cpu


if __name__ == "__main__":
    main()
