"""lmforge's causal-attention training kernel against PyTorch's CPU flash attention: forward + backward.

    python bench/attention_kernel.py [--threads 1] [--rounds 5]

For each shape (B, H, H_kv, T, D) times one forward and backward of causal attention over q, k, v laid out as a
model's qkv projection leaves them ((B, T, H, D) memory), interleaved over rounds (median):
  * torch fp32: ``F.scaled_dot_product_attention`` in fp32, what lmforge ran before (under bf16 autocast too:
    PyTorch's bf16 flash backward is slower still);
  * lmforge fp32 and lmforge bf16: ``kernels.causal_attention`` (bf16 in and out, fp32 inside);
  * lmforge bf16 + RoPE: the same with the rotation of q and k inside the kernel, against torch fp32 after
    ``apply_rope`` (what a Llama-style model runs).
Shapes: nanoGPT's CPU shape (A), SmolLM2-135M's LoRA batch (4 x 128, 9 heads over 3), longer windows.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from lmforge import kernels
from lmforge.models.layers import apply_rope, rope_tables
from lmforge.utils import machine_summary

SHAPES = [(12, 4, 4, 64, 32), (4, 9, 3, 128, 64), (16, 6, 6, 256, 64), (2, 9, 3, 512, 64)]


def timed(fn, args: tuple, dy: torch.Tensor, n: int) -> float:
    for _ in range(2):
        fn(*args).backward(dy)
    t0 = time.perf_counter()
    for _ in range(n):
        fn(*args).backward(dy)
    return (time.perf_counter() - t0) / n


def cases_for(B: int, H: int, Hkv: int, T: int, D: int) -> dict:
    """name -> (attention function, (q, k, v), output gradient) for one shape."""
    g = torch.Generator().manual_seed(0)

    def qkv(dtype: torch.dtype) -> tuple:
        return tuple(torch.randn(B, T, h, D, generator=g).to(dtype).transpose(1, 2).requires_grad_()
                     for h in (H, Hkv, Hkv))

    cos, sin = rope_tables(T, D)
    gqa = H != Hkv

    def torch_fp32(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)

    def torch_rope(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return torch_fp32(apply_rope(q, cos, sin), apply_rope(k, cos, sin), v)

    def lmforge_rope(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return kernels.causal_attention(q, k, v, (cos, sin))

    dy32 = torch.randn(B, T, H, D, generator=g).transpose(1, 2)
    dy16 = dy32.bfloat16()
    return {"torch fp32": (torch_fp32, qkv(torch.float32), dy32),
            "lmforge fp32": (kernels.causal_attention, qkv(torch.float32), dy32),
            "lmforge bf16": (kernels.causal_attention, qkv(torch.bfloat16), dy16),
            "torch RoPE fp32": (torch_rope, qkv(torch.float32), dy32),
            "lmforge RoPE bf16": (lmforge_rope, qkv(torch.bfloat16), dy16)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=5)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    print(machine_summary())
    if not kernels.available():
        raise SystemExit("lmforge's kernels are not available here")
    print(f"kernels built for {kernels.isa()}; {a.threads} thread(s); forward + backward, median of {a.rounds} "
          "interleaved rounds; x = speed against torch fp32 (the RoPE column: against torch with RoPE)\n")
    names = ["torch fp32", "lmforge fp32", "lmforge bf16", "torch RoPE fp32", "lmforge RoPE bf16"]
    print(f"{'B, H, Hkv, T, D':22s}" + "".join(f"{n:>20s}" for n in names))
    for shape in SHAPES:
        B, H, Hkv, T, D = shape
        cases = cases_for(*shape)
        n = max(2, int(2e8 / (B * H * T * T * D)))  # ~0.1-0.3 s per timing
        times: dict[str, list[float]] = {k: [] for k in cases}
        for _ in range(a.rounds):
            for name, (fn, args, dy) in cases.items():
                times[name].append(timed(fn, args, dy, n))
        med = {k: statistics.median(v) for k, v in times.items()}
        cells = []
        for name in names:
            base = med["torch RoPE fp32" if "RoPE" in name else "torch fp32"]
            cells.append(f"{med[name] * 1e3:.2f} ms" + (f" {base / med[name]:.2f}x" if name.startswith("lmforge")
                                                        else ""))
        print(f"{str(shape):22s}" + "".join(f"{c:>20s}" for c in cells))


if __name__ == "__main__":
    main()
