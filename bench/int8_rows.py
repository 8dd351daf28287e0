"""int8 / int4 linear layers by row count: lmforge's kernel against PyTorch's, and the dequantised GEMM.

    python bench/int8_rows.py [--layout int8|int4|fp32|bf16] [--threads 1] [--rows 1 2 4 8 16 64 170] [--rounds 3]

SmolLM2-135M's 120 int8 matrices (30 layers of QKV 960x576, output 576x576, gate+up 3072x576, down 576x1536;
random weights, 107 MB, far beyond the caches, so every pass streams them from memory) multiplied by ``rows``
rows of bf16 activations, one pass over all of them per timing, best of ``--rounds``:

* lmforge: ``torch.ops.lmforge.int8_linear`` on the layout decoding uses (lmforge/kernels/decode_ops.cpp): on CPUs
  with AVX512-VNNI the integer dot-product layout (activations rounded to int8 per 64 inputs), else the bf16 tiles;
* tiles (VNNI CPUs only): the same op on the weight-only bf16 tiles (what ``LMFORGE_INT8_VNNI=0`` decodes with);
* torch: PyTorch's ``_weight_int8pack_mm``;
* gemm bf16 / gemm fp32: the weight dequantised (``q * scale``) and one ``F.linear``, what an int8 layer without
  VNNI does from ``models.quant.GEMM_ROWS`` rows on (a prompt's prefill).

With ``--layout int4`` (groups of 32, llama.cpp's Q4_1 shape): lmforge's ``int4_linear`` (int4_ops.cpp, AVX512-VNNI
machines) against PyTorch's ``_weight_int4pack_mm_for_cpu``, at every row count (neither dequantises for a prefill).

With ``--layout fp32|bf16``: lmforge's ``tiled_linear`` on the weights in the int8 layout's tiles (what the fp32 and
bf16 decoding layouts use with lmforge's kernels) against PyTorch's product of the same weights: ``x @ W^T`` with
W^T stored (in, out) for fp32 (lmforge's layout without its kernels), ``F.linear`` for bf16.

``--huge-pages`` copies every matrix onto 2 MiB pages first, as the decoding layouts keep their weights.

Prints ms per pass and the weight streaming rate (GB/s: the bytes of each layout's own weights and scales) with
the CPU named.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from lmforge import kernels
from lmforge.models.quant import QuantLinear, tile_rows
from lmforge.utils import huge_page_buffer, machine_summary

SHAPES = [(960, 576), (576, 576), (3072, 576), (576, 1536)] * 30


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 8, 16, 64, 170])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--layout", choices=["int8", "int4", "fp32", "bf16"], default="int8")
    ap.add_argument("--huge-pages", action="store_true", help="every matrix on 2 MiB pages, as decoding layouts "
                    "keep them (models.quant.pack_on_huge_pages); default: malloc's pages")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    if not kernels.available():
        raise SystemExit("lmforge's kernels are not built here (g++ missing or LMFORGE_KERNELS=0)")
    print(machine_summary(), f"; lmforge kernels: {kernels.isa()}")
    g = torch.Generator().manual_seed(0)
    if a.layout == "int4":
        return int4_rows(a, g)
    if a.layout in ("fp32", "bf16"):
        return float_rows(a, g)
    mats = []
    for o, i in SHAPES:  # lmforge's tiled q (VNNI's where the CPU has it), its fp32 scale; the bf16 tiles' q;
        lin = QuantLinear.from_weight(torch.randn(o, i, generator=g), None, "int8")  # PyTorch's row-major q, bf16 scale
        mats.append((lin.qweight, lin.scale, lin.int8_weight(), lin.scale.bfloat16(), tile_rows(lin.int8_weight())))
    mats = on_pages(mats, a.huge_pages)
    nbytes = sum(q.numel() + s.numel() * 4 for q, s, *_ in mats)
    vnni = mats[0][0].dtype == torch.uint8
    print(f"{len(mats)} int8 matrices, {nbytes / 1e6:.0f} MB; lmforge's layout: "
          + ("VNNI (activations quantised per 64 inputs); 'tiles': the bf16 tiles (LMFORGE_INT8_VNNI=0)" if vnni
             else "bf16 tiles"))
    for M in a.rows:
        xs = {k: torch.randn(M, k, generator=g).bfloat16() for k in (576, 1536)}
        ways = {
            "lmforge": lambda xs=xs: [torch.ops.lmforge.int8_linear(xs[q.shape[1]], q, s) for q, s, *_ in mats],
            **({"tiles": lambda xs=xs: [torch.ops.lmforge.int8_linear(xs[t.shape[1]], t, s) for _, s, _, _, t in mats]}
               if vnni else {}),
            "torch": lambda xs=xs: [torch._weight_int8pack_mm(xs[q.shape[1]], q, sb) for _, _, q, sb, _ in mats],
            "gemm bf16": lambda xs=xs: [F.linear(xs[q.shape[1]], q.to(torch.bfloat16) * sb[:, None])
                                        for _, _, q, sb, _ in mats],
            "gemm fp32": lambda xs=xs: [F.linear(xs[q.shape[1]].float(), q.float() * s[:, None])
                                        for _, s, q, _, _ in mats],
        }
        report(M, ways, a.rounds, dict.fromkeys(ways, nbytes))


def on_pages(mats: list[tuple], huge: bool) -> list[tuple]:
    """``mats``' tensors copied into one buffer on 2 MiB pages (--huge-pages), else as they are."""
    if not huge:
        return mats
    flat = [t for m in mats for t in m]
    sizes = [-(-t.numel() * t.element_size() // 64) * 64 for t in flat]
    buf = huge_page_buffer(sum(sizes))
    if buf is None:
        raise SystemExit("no transparent huge pages here (utils.huge_pages_available)")
    out, at = [], 0
    for t, n in zip(flat, sizes):
        v = buf[at:at + t.numel() * t.element_size()].view(t.dtype).view(t.shape)
        v.copy_(t)
        out.append(v)
        at += n
    k = len(mats[0])
    return [tuple(out[i:i + k]) for i in range(0, len(out), k)]


def report(rows: int, ways: dict, rounds: int, nbytes: dict[str, int]) -> None:
    """Time each way, interleaved, best of the rounds; print ms and GB/s (each way's own bytes)."""
    best: dict[str, float] = {}
    for _ in range(rounds):
        for name, f in ways.items():
            t = time.perf_counter()
            f()
            best[name] = min(best.get(name, 1e9), time.perf_counter() - t)
    print(f"rows {rows:4d}: " + "  ".join(f"{n} {v * 1e3:7.1f} ms ({nbytes[n] / v / 1e9:4.1f} GB/s)"
                                         for n, v in best.items()), flush=True)


def int4_rows(a: argparse.Namespace, g: torch.Generator) -> None:
    if not kernels.int4_native():
        raise SystemExit("lmforge's int4 kernel needs AVX512-VNNI; this CPU keeps PyTorch's")
    mats = []
    for o, i in SHAPES:  # lmforge's layout (packed q, fp16 d/m) and PyTorch's (packed q, bf16 scale/zero)
        q = torch.randint(0, 16, (o, i), generator=g, dtype=torch.int32)
        s, z = torch.rand(o, i // 32, generator=g) * 0.01, torch.randn(o, i // 32, generator=g) * 0.01
        lin = QuantLinear("int4", o, i, 32)
        lin.set_int4(q, s, z)
        sz = torch.stack([s, z], dim=-1).transpose(0, 1).contiguous().bfloat16()
        mats.append((lin.qweight, lin.scales_dm, torch._convert_weight_to_int4pack_for_cpu(q, 1), sz))
    mats = on_pages(mats, a.huge_pages)
    ours = sum(b.numel() + dm.numel() * 2 for b, dm, _, _ in mats)
    theirs = sum(b.numel() + sz.numel() * 2 for _, _, b, sz in mats)
    size = {"lmforge": ours, "torch": theirs}
    print(f"{len(mats)} int4 matrices, {ours / 1e6:.0f} MB (PyTorch's layout {theirs / 1e6:.0f} MB)")
    for M in a.rows:
        xs = {k: torch.randn(M, k, generator=g).bfloat16() for k in (576, 1536)}
        ways = {
            "lmforge": lambda xs=xs: [torch.ops.lmforge.int4_linear(xs[b.shape[1] * 2], b, dm, 32)
                                      for b, dm, _, _ in mats],
            "torch": lambda xs=xs: [torch._weight_int4pack_mm_for_cpu(xs[b.shape[1] * 2], tq, 32, sz)
                                    for b, _, tq, sz in mats],
        }
        report(M, ways, a.rounds, size)


def float_rows(a: argparse.Namespace, g: torch.Generator) -> None:
    dt = torch.float32 if a.layout == "fp32" else torch.bfloat16
    mats = []
    for o, i in SHAPES:
        lin = QuantLinear.from_weight(torch.randn(o, i, generator=g), None, a.layout)
        w = torch.randn(o, i, generator=g).to(dt)
        mats.append((lin.weight_tiles, w.t().contiguous() if a.layout == "fp32" else w))
    mats = on_pages(mats, a.huge_pages)
    nbytes = sum(t.numel() * t.element_size() for t, _ in mats)
    print(f"{len(mats)} {a.layout} matrices, {nbytes / 1e6:.0f} MB")
    for M in a.rows:
        xs = {k: torch.randn(M, k, generator=g).to(dt) for k in (576, 1536)}
        torch_way = (lambda xs=xs: [xs[w.shape[0]] @ w for _, w in mats]) if a.layout == "fp32" else \
            (lambda xs=xs: [F.linear(xs[w.shape[1]], w) for _, w in mats])
        ways = {"lmforge": lambda xs=xs: [torch.ops.lmforge.tiled_linear(xs[t.shape[1]], t) for t, _ in mats],
                "torch": torch_way}
        report(M, ways, a.rounds, dict.fromkeys(ways, nbytes))


if __name__ == "__main__":
    main()
