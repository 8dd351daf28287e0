"""The quality cost of each decoding layout: perplexity of SmolLM2-135M-Instruct on held-out text.

    python bench/decode_quality.py [--tokens 4096] [--window 512]

Texts: the start of Tiny Shakespeare (../shared/data/tinyshakespeare.txt) and Python's ``textwrap.py``
(neither is SmolLM2 training data we could exclude, so "held-out" only means: not used by lmforge).
Layouts: ``fp32`` (the GGUF's Q4_1 tensors dequantized: the only weights shipped, so this is the
reference), ``bf16``, ``int8`` and ``int4`` loaded straight from the GGUF (int4 = Q4_1 exactly), and int4
re-quantized from the fp32 weights with groups of 32 and 64 (a second rounding). Non-overlapping windows of
``--window`` tokens; perplexity = exp(mean NLL) over all predicted tokens.
"""

from __future__ import annotations

import argparse
import math
import textwrap
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from paths import shared_data  # bench/paths.py (the scripts run from bench/)

from lmforge.generation.fast import prepare_for_decoding
from lmforge.hub import load_model
from lmforge.utils import machine_summary

# the shared benchmark text (read, never copied into the repo): next to the checkout, or /work/shared
SHAKESPEARE = shared_data("tinyshakespeare.txt")


@torch.no_grad()
def perplexity(model, ids: list[int], window: int) -> float:  # noqa: ANN001
    nll, n = 0.0, 0
    for s in range(0, len(ids) - 1, window):
        chunk = torch.tensor([ids[s:s + window + 1]])
        if chunk.shape[1] < 2:
            break
        logits, _ = model.forward_logits(chunk[:, :-1], None)
        nll += F.cross_entropy(logits[0].float(), chunk[0, 1:], reduction="sum").item()
        n += chunk.shape[1] - 1
    return math.exp(nll / n)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    print(machine_summary())
    base = load_model("smollm2")
    tok = base.tokenizer
    texts = {"tinyshakespeare": SHAKESPEARE.read_text(encoding="utf-8")[:60000],
             "textwrap.py": Path(textwrap.__file__).read_text(encoding="utf-8")}
    ids = {k: tok.encode(v)[:a.tokens] for k, v in texts.items()}
    layouts = {
        "fp32 (dequantized Q4_1)": lambda: base,
        "bf16": lambda: prepare_for_decoding(load_model("smollm2"), "bf16"),
        "int8 (from GGUF)": lambda: load_model("smollm2", decode_dtype="int8"),
        "int4 (from GGUF: Q4_1 exactly)": lambda: load_model("smollm2", decode_dtype="int4"),
        "int4 g32 (re-quantized from fp32)": lambda: prepare_for_decoding(load_model("smollm2"), "int4", 32),
        "int4 g64 (re-quantized from fp32)": lambda: prepare_for_decoding(load_model("smollm2"), "int4", 64),
    }
    print(f"SmolLM2-135M-Instruct perplexity, {a.tokens} tokens per text, windows of {a.window}")
    print(f"{'layout':36s} " + " ".join(f"{k:>16s}" for k in ids))
    for name, make in layouts.items():
        model = make()
        t0 = time.perf_counter()
        ppl = [perplexity(model, v, a.window) for v in ids.values()]
        print(f"{name:36s} " + " ".join(f"{p:16.3f}" for p in ppl) + f"   ({time.perf_counter() - t0:.0f} s)",
              flush=True)
        if model is not base:
            del model


if __name__ == "__main__":
    main()
