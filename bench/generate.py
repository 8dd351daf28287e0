"""Decoding speed: lmforge against llama.cpp and transformers on the same weights, in the same run.

    python bench/generate.py [--models smollm2 gpt2-shape] [--threads 2] [--new-tokens 128] [--rounds 3]
                             [--speculative] [--memory]

For each model and batch size (1 and 8: eight copies of the prompt): greedy decoding of ``--new-tokens``
new tokens after a 16-token prompt (``--prompt-tokens``; end-of-text ignored), reporting new tokens/s (all rows'
new tokens / wall time including the prompt), time to first token (prefill + one token), and whether the greedy tokens
equal the reference (transformers fp32; llama.cpp's own output for the GGUF layouts).

Columns:
* ``transformers``: ``generate`` on the fp32 weights (GPT-2 shape; ``--transformers`` for SmolLM2 too).
* ``lmforge`` per layout (generation/fast.py): ``fp32`` (transposed), ``bf16``, ``int8``, ``int4``. For
  ``smollm2`` the int8/int4 layouts are loaded straight from the GGUF (hub/gguf_io.py: Q4_1 -> int4 exactly,
  the Q8_0 embedding/head -> int8).
* ``llama.cpp``: llama-cpp-python in the benchmark's own venv (``bench/.venv-llamacpp``, see
  bench/llamacpp_worker.py; not an lmforge dependency) on the shipped Q4_1 GGUF and on Q8_0 / Q4_0 copies
  requantised by llama.cpp itself (bench/out/), same prompt ids, same threads, via its batch API.

The machine may be shared: configurations are interleaved round by round (A/B/A/B) and the median over
``--rounds`` is reported, with ratios against llama.cpp at the same weight precision (int8 vs Q8_0,
int4 vs Q4_1 and Q4_0) and against transformers. ``--memory`` runs each layout once in a fresh process for
its peak RSS (VmHWM after load, during decoding). ``--blocks`` adds each layout decoded block by block
(``<dtype>-blk``: one Python call per block, Block._step, instead of every block's step in one C++ call,
decode_stack) and prints the ratios. ``--speculative`` times a repetitive chat task (rewriting
code given in the prompt) with and without prompt-lookup speculative decoding. The CPU model and flags are
printed with every run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any
from unittest import mock

import torch
from peak_memory import peak_mib, reset_peak  # noqa: F401  (peak_mib: read by --memory's child) bench/peak_memory.py (the scripts run from bench/)

from lmforge.generation import GenerationConfig, generate_ids, speculative
from lmforge.generation.fast import prepare_for_decoding
from lmforge.hub import load_model
from lmforge.models import layers
from lmforge.models.gpt import GPT, PRESETS, GPTConfig
from lmforge.utils import machine_summary

ROOT = Path(__file__).resolve().parent
LLAMA_PY = ROOT / ".venv-llamacpp" / "bin" / "python"
SAME_PRECISION = {"int8": ("Q8_0",), "int4": ("Q4_1", "Q4_0")}


def gguf_path() -> str:
    from lmforge.hub import resolve_model

    return resolve_model("smollm2")


def build(name: str, dtype: str) -> GPT:
    if name == "gpt2-shape":
        torch.manual_seed(0)
        model = GPT(GPTConfig(**PRESETS["gpt2"])).eval()
        return model if dtype == "plain" else prepare_for_decoding(model, dtype)  # type: ignore[return-value]
    if dtype in ("int8", "int4"):
        return load_model(gguf_path(), decode_dtype=dtype)  # type: ignore[return-value]
    model = load_model(gguf_path()).eval()
    return model if dtype == "plain" else prepare_for_decoding(model, dtype)  # type: ignore[return-value]


def to_transformers(model: GPT) -> Any:
    import transformers

    from lmforge.hub.export import hf_config_and_weights

    cfg, weights = hf_config_and_weights(model)
    config = transformers.AutoConfig.for_model(**cfg)
    hf = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = hf.load_state_dict(weights, strict=False)
    assert not unexpected and all("lm_head" in k or "rotary" in k for k in missing), (missing, unexpected)
    if cfg.get("tie_word_embeddings"):
        hf.tie_weights()
    return hf.eval()


def run_lmforge(model: GPT, prompt: list[int], batch: int, new: int, stack: bool = True) -> dict:
    def cfg(n: int) -> GenerationConfig:
        return GenerationConfig(max_new_tokens=n, temperature=0, ignore_eos=True, num_return_sequences=batch,
                                compile="off")

    # stack=False: block by block (Block._step per block), the baseline of --blocks
    with nullcontext() if stack else mock.patch.object(GPT, "_decode_stack", lambda self: None):
        generate_ids(model, prompt, cfg(4))  # warm-up
        t0 = time.perf_counter()
        generate_ids(model, prompt, cfg(1))
        ttft = time.perf_counter() - t0
        reset_peak()
        t0, c0 = time.perf_counter(), time.process_time()
        out = generate_ids(model, prompt, cfg(new))
        dt, cpu = time.perf_counter() - t0, time.process_time() - c0
    return dict(tokens_per_s=batch * new / dt, tokens_per_cpu_s=batch * new / cpu, ttft_ms=ttft * 1000,
                tokens=out[0])


@torch.no_grad()
def run_transformers(hf: Any, prompt: list[int], batch: int, new: int) -> dict:
    ids = torch.tensor([prompt] * batch)
    kw = dict(do_sample=False, pad_token_id=0, eos_token_id=None)
    hf.generate(ids, max_new_tokens=4, min_new_tokens=4, **kw)  # warm-up
    t0 = time.perf_counter()
    hf.generate(ids, max_new_tokens=1, min_new_tokens=1, **kw)
    ttft = time.perf_counter() - t0
    t0, c0 = time.perf_counter(), time.process_time()
    out = hf.generate(ids, max_new_tokens=new, min_new_tokens=new, **kw)
    dt, cpu = time.perf_counter() - t0, time.process_time() - c0
    return dict(tokens_per_s=batch * new / dt, tokens_per_cpu_s=batch * new / cpu, ttft_ms=ttft * 1000,
                tokens=out[0, len(prompt):].tolist())


def run_llamacpp(gguf: str, prompt: list[int], batch: int, new: int, threads: int) -> dict:
    cmd = [str(LLAMA_PY), str(ROOT / "llamacpp_worker.py"), gguf, "--prompt", ",".join(map(str, prompt)),
           "--new", str(new), "--batch", str(batch), "--threads", str(threads)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    if res.returncode:
        raise RuntimeError(f"llama.cpp worker failed: {res.stderr[-500:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def llamacpp_models(threads: int) -> dict[str, str]:
    """The shipped Q4_1 file plus Q8_0 and Q4_0 copies requantised by llama.cpp (cached in bench/out/)."""
    src = gguf_path()
    files = {"Q4_1": src}
    out = ROOT / "out"
    out.mkdir(exist_ok=True)
    for q in ("Q8_0", "Q4_0"):
        path = out / f"SmolLM2-135M-Instruct.{q}.gguf"
        if not path.exists():
            subprocess.run([str(LLAMA_PY), str(ROOT / "llamacpp_worker.py"), src, "--quantize", q, "--out",
                            str(path), "--threads", str(threads)], check=True, capture_output=True, timeout=600)
        files[q] = str(path)
    return files


def memory_of(name: str, dtype: str, batch: int, new: int, threads: int) -> float:
    """Peak RSS of a fresh process that loads one layout and decodes (``--memory``)."""
    code = (f"import sys, torch; sys.argv=['x']; torch.set_num_threads({threads}); import generate as g; "
            f"m = g.build({name!r}, {dtype!r}); import torch; p = list(range(100, 116)); "
            f"g.reset_peak(); g.run_lmforge(m, p, {batch}, {new}); print(g.peak_mib())")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=1800)
    if res.returncode != 0:  # say why rather than print a bare nan
        print(f"  ({name} {dtype} b{batch}: the memory probe failed: {res.stderr.strip().splitlines()[-1:]})")
        return float("nan")
    return float(res.stdout.strip().splitlines()[-1])


CODE = '''def moving_average(values, window):
    """Return the moving averages of values over a window of the given size."""
    if window <= 0:
        raise ValueError("window must be positive")
    result = []
    total = 0.0
    for index, value in enumerate(values):
        total += value
        if index >= window:
            total -= values[index - window]
        if index >= window - 1:
            result.append(total / window)
    return result
'''


#: repetitive chat tasks: the reply rewrites code given in the prompt (prompt lookup drafts the copied spans)
SPEC_TASKS = {
    "type-hints": "Add type hints to this Python function (values: list[float], window: int, returns list[float]) "
                  "and print the whole function:",
    "rename": "Rename the variable `total` to `running_sum` in this Python function and print the whole function:",
}


def bench_speculative(models: dict[str, GPT], new: int, rounds: int, draft_tokens: int,
                      tasks: list[str]) -> list[dict]:
    """Plain vs prompt-lookup speculative greedy decoding of the same prompt, interleaved round by round; wall
    and CPU time of the whole generation (prefill included), and the prefill alone (for decode-only ratios)."""
    from lmforge.apps.chat import ChatSession

    rows = []
    for dtype, model in models.items():
        for task in tasks:
            session = ChatSession(model)
            session.messages.append({"role": "user", "content": f"{SPEC_TASKS[task]}\n```python\n{CODE}```"})
            prompt = model.tokenizer.encode(session.prompt() + "```python\n")  # the reply starts with the code
            base = dict(max_new_tokens=new, temperature=0, ignore_eos=False, compile="off")
            t: dict[str, list[float]] = {k: [] for k in ("plain", "spec", "prefill", "plain_cpu", "spec_cpu",
                                                         "prefill_cpu")}
            stats = None
            for _ in range(rounds):  # interleaved: prefill alone, plain, speculative, prefill, ...
                w0, c0 = time.perf_counter(), time.process_time()
                with torch.no_grad():
                    model.forward_logits(torch.tensor([prompt]), model.init_state(1, len(prompt)), last_only=True)
                t["prefill"].append(time.perf_counter() - w0)
                t["prefill_cpu"].append(time.process_time() - c0)
                w0, c0 = time.perf_counter(), time.process_time()
                plain = generate_ids(model, prompt, GenerationConfig(**base))[0]
                t["plain"].append(time.perf_counter() - w0)
                t["plain_cpu"].append(time.process_time() - c0)
                w0, c0 = time.perf_counter(), time.process_time()
                spec = generate_ids(model, prompt, GenerationConfig(speculative="prompt-lookup",
                                                                    draft_tokens=draft_tokens, **base))[0]
                t["spec"].append(time.perf_counter() - w0)
                t["spec_cpu"].append(time.process_time() - c0)
                stats = speculative.last_stats
            assert stats is not None
            m = {k: statistics.median(v) for k, v in t.items()}
            pre = m["prefill_cpu"]
            rows.append(dict(dtype=dtype, task=task, prompt_tokens=len(prompt), new_tokens=len(plain),
                             identical=plain == spec, plain_tok_s=len(plain) / m["plain"],
                             spec_tok_s=len(spec) / m["spec"], speedup=m["plain"] / m["spec"],
                             speedup_cpu=m["plain_cpu"] / m["spec_cpu"],
                             decode_speedup_cpu=(m["plain_cpu"] - pre) / (m["spec_cpu"] - pre),
                             prefill_share_cpu=m["prefill_cpu"] / m["plain_cpu"],
                             acceptance=stats.acceptance_rate, tokens_per_pass=stats.tokens_per_round,
                             rounds=stats.rounds, timing=stats.timing(), text=model.tokenizer.decode(spec)))
            r = rows[-1]
            print(f"  speculative {dtype} {task}: {r['speedup']:.2f}x wall, {r['speedup_cpu']:.2f}x CPU "
                  f"(decode only {r['decode_speedup_cpu']:.2f}x); {stats.summary()}; {stats.timing()}", flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="+", default=["smollm2", "gpt2-shape"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--prompt-tokens", type=int, default=16,
                    help="prompt length (random ids); a long one makes TTFT the prompt's processing time")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds; the median is reported")
    ap.add_argument("--dtypes", nargs="+", default=None,
                    help="lmforge layouts: plain (training layout), fp32, bf16, int8, int4 (default: smollm2 "
                         "fp32 int8 int4; gpt2-shape plain fp32 bf16 int8 int4)")
    ap.add_argument("--transformers", action="store_true", help="transformers column for smollm2 too")
    ap.add_argument("--no-llamacpp", action="store_true")
    ap.add_argument("--memory", action="store_true", help="peak RSS of each layout in a fresh process")
    ap.add_argument("--blocks", action="store_true", help="each layout also block by block (decode_stack off: "
                    "one Python call per block), interleaved, with the ratios")
    ap.add_argument("--speculative", action="store_true", help="the repetitive-task speculative benchmark")
    ap.add_argument("--speculative-only", action="store_true", help="skip the throughput table")
    ap.add_argument("--fused-verify", action="store_true", help="verify passes attend in one fused masked call "
                    "instead of row by row (models/layers.py EXACT_CHUNK = 0): faster, not bit-exact")
    ap.add_argument("--spec-tasks", nargs="+", default=["type-hints"], choices=sorted(SPEC_TASKS))
    ap.add_argument("--draft-tokens", type=int, default=15, help="most tokens drafted per pass (prompt lookup "
                    "drafts as many tokens as matched)")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    if a.fused_verify:
        layers.EXACT_CHUNK = 0
    print(f"{machine_summary(a.threads)}; machine load "
          f"{os.getloadavg()[0]:.1f}", flush=True)
    g = torch.Generator().manual_seed(1)
    results: list[dict] = []
    spec_rows: list[dict] = []
    for name in a.models:
        dtypes = a.dtypes or (["fp32", "int8", "int4"] if name == "smollm2" else ["plain", "fp32", "bf16", "int8",
                                                                                 "int4"])
        t0 = time.perf_counter()
        models = {d: build(name, d) for d in dtypes}
        print(f"{name}: loaded {', '.join(dtypes)} in {time.perf_counter() - t0:.0f} s", flush=True)
        ref_model = models.get("fp32") or models.get("plain") or next(iter(models.values()))
        vocab = ref_model.config.vocab_size
        prompt = torch.randint(0, vocab, (a.prompt_tokens,), generator=g).tolist()
        runners: list[tuple[str, str, Any]] = []
        if name == "gpt2-shape" or a.transformers:
            plain = build(name, "plain") if "plain" not in models else models["plain"]
            hf = to_transformers(plain)
            runners.append(("transformers", "fp32",
                            lambda b, hf=hf, p=prompt: run_transformers(hf, p, b, a.new_tokens)))
        for d, m in models.items():
            runners.append(("lmforge", d, lambda b, m=m, p=prompt: run_lmforge(m, p, b, a.new_tokens)))
            if a.blocks and d != "plain":  # (the training layout never takes decode_stack)
                runners.append(("lmforge", f"{d}-blk",
                                lambda b, m=m, p=prompt: run_lmforge(m, p, b, a.new_tokens, stack=False)))
        if name == "smollm2" and not a.no_llamacpp and LLAMA_PY.exists():
            for q, path in llamacpp_models(a.threads).items():
                runners.append(("llama.cpp", q, lambda b, f=path, p=prompt: run_llamacpp(f, p, b, a.new_tokens,
                                                                                          a.threads)))
        for r in range(0 if a.speculative_only else a.rounds):
            for batch in a.batches:
                for impl, dtype, fn in runners:
                    res = fn(batch)
                    results.append(dict(model=name, impl=impl, dtype=dtype, batch=batch, round=r, **res))
                    print(f"  round {r} {impl:12s} {dtype:8s} b{batch}: {res['tokens_per_s']:7.1f} tok/s, "
                          f"{res['tokens_per_cpu_s']:7.1f} tok/CPU-s", flush=True)
        if a.speculative and name == "smollm2":
            spec_rows = bench_speculative({d: m for d, m in models.items() if d != "plain"}, 160, a.rounds,
                                          a.draft_tokens, a.spec_tasks)
        del models
    table(results, a)
    if a.blocks:
        stack_ratios(results)
    if spec_rows:
        print(f"\nspeculative decoding (prompt lookup, at most {a.draft_tokens} drafts), rewriting code given in "
              f"the prompt, greedy, prefill included (median of {a.rounds} interleaved rounds):")
        for s in spec_rows:
            print(f"  smollm2 {s['dtype']} {s['task']}: {s['prompt_tokens']}-token prompt, {s['new_tokens']} new "
                  f"tokens: plain {s['plain_tok_s']:.1f} tok/s, speculative {s['spec_tok_s']:.1f} tok/s = "
                  f"{s['speedup']:.2f}x wall, {s['speedup_cpu']:.2f}x CPU time "
                  f"(decode only {s['decode_speedup_cpu']:.2f}x; "
                  f"the prefill is {100 * s['prefill_share_cpu']:.0f}% of plain); identical output: {s['identical']}; "
                  f"acceptance {100 * s['acceptance']:.0f}%, {s['tokens_per_pass']:.2f} tokens per target pass")
    if a.memory:
        print("\npeak RSS (fresh process, load + decode), MiB:")
        for name in a.models:
            for d in a.dtypes or ["fp32", "int8", "int4"]:
                for b in a.batches:
                    print(f"  {name} lmforge {d} b{b}: {memory_of(name, d, b, a.new_tokens, a.threads):.0f}",
                          flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"cpu": machine_summary(a.threads), "results": results, "speculative": spec_rows}, f, indent=2)


def agreement(tokens: list, ref: list) -> str:
    """How many leading greedy tokens agree with the reference implementation's, e.g. "128/128" (of the first row
    of a batch): quantized kernels round differently, so a near-tie can flip late in a generation."""
    a, b = (tokens[0], ref[0]) if tokens and isinstance(tokens[0], list) else (tokens, ref)
    n = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    return f"{n}/{max(len(a), len(b))}"


def table(results: list[dict], a: argparse.Namespace) -> None:
    keys: dict[tuple, list[dict]] = {}
    for r in results:
        keys.setdefault((r["model"], r["impl"], r["dtype"], r["batch"]), []).append(r)
    med = {k: statistics.median(x["tokens_per_s"] for x in v) for k, v in keys.items()}
    cpu = {k: statistics.median(x["tokens_per_cpu_s"] for x in v) for k, v in keys.items()}
    print(f"\n{'model':11s} {'impl':12s} {'dtype':8s} {'batch':>5s} {'tok/s':>8s} {'tok/CPU-s':>9s} {'TTFT ms':>8s} "
          f"{'peak MiB':>8s} {'vs hf':>6s} {'vs llama.cpp same precision (wall; CPU)':40s} same greedy tokens")
    for (model, impl, dtype, batch), rows in keys.items():
        tps = med[(model, impl, dtype, batch)]
        ttft = statistics.median(x["ttft_ms"] for x in rows)
        peak = rows[-1].get("peak_mib", float("nan"))
        hf = med.get((model, "transformers", "fp32", batch))
        vs_hf = f"{tps / hf:.2f}x" if hf and impl == "lmforge" else ""
        vs_ll = ", ".join(f"{q} {tps / med[(model, 'llama.cpp', q, batch)]:.2f}x; "
                          f"{cpu[(model, impl, dtype, batch)] / cpu[(model, 'llama.cpp', q, batch)]:.2f}x"
                          for q in SAME_PRECISION.get(dtype, ()) if impl == "lmforge"
                          and (model, "llama.cpp", q, batch) in med)
        if impl == "transformers":
            ref = None
        elif impl == "llama.cpp":
            ref = None
        else:
            ref = next((x["tokens"] for x in results if x["model"] == model and x["batch"] == batch
                        and x["impl"] == "transformers"), None)
            if dtype in SAME_PRECISION:  # quantized: compare with llama.cpp at that precision
                ref = next((x["tokens"] for x in results if x["model"] == model and x["batch"] == batch
                            and x["impl"] == "llama.cpp" and x["dtype"] in SAME_PRECISION[dtype]), ref)
        same = "" if ref is None else agreement(rows[0]["tokens"], ref)
        c = cpu[(model, impl, dtype, batch)]
        print(f"{model:11s} {impl:12s} {dtype:8s} {batch:5d} {tps:8.1f} {c:9.1f} {ttft:8.0f} {peak:8.0f} {vs_hf:>6s} "
              f"{vs_ll:40s} {same}")


def stack_ratios(results: list[dict]) -> None:
    """``--blocks``: every block's step in one C++ call (decode_stack) against block by block, per layout."""
    print("\ndecode_stack vs block by block (median tok/s ratio, wall; CPU time), same greedy tokens:")
    runs: dict[tuple, list[dict]] = {}
    for r in results:
        if r["impl"] == "lmforge":
            runs.setdefault((r["model"], r["dtype"], r["batch"]), []).append(r)
    for (model, dtype, batch), blk in runs.items():
        stack = runs.get((model, dtype.removesuffix("-blk"), batch))
        if not dtype.endswith("-blk") or stack is None:
            continue
        ratio = [statistics.median(x[k] for x in stack) / statistics.median(x[k] for x in blk)
                 for k in ("tokens_per_s", "tokens_per_cpu_s")]
        print(f"  {model} {dtype.removesuffix('-blk')} b{batch}: {ratio[0]:.2f}x; {ratio[1]:.2f}x "
              f"({statistics.median(x['tokens_per_s'] for x in blk):.1f} -> "
              f"{statistics.median(x['tokens_per_s'] for x in stack):.1f} tok/s), "
              f"{stack[0]['tokens'] == blk[0]['tokens']}")


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
