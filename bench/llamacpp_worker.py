"""llama.cpp side of bench/generate.py, run in the benchmark's own venv (bench/.venv-llamacpp, with
llama-cpp-python; never a dependency of lmforge):

    bench/.venv-llamacpp/bin/python bench/llamacpp_worker.py MODEL.gguf --prompt 1,2,3 --new 128 --batch 8

Greedy decoding of ``--batch`` copies of the prompt (token ids) through llama.cpp's own batch API (one
``llama_decode`` per step for all rows, as llama.cpp's ``batched`` example), printing one JSON line:
tokens/s (all rows' new tokens / decoding time; also per CPU-second of the process), time to first
token, peak RSS during decoding, and the tokens of row 0. ``--quantize Q8_0|Q4_0 --out FILE`` writes a
requantised copy of a GGUF and exits.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import time

import numpy as np
from peak_memory import peak_mib, reset_peak  # bench/peak_memory.py (the scripts run from bench/)


def main() -> None:
    import llama_cpp

    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--prompt", default="1,2,3")
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quantize", default=None, help="Q8_0 or Q4_0: write a requantised copy to --out")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    if a.quantize:
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{a.quantize}")
        params.allow_requantize = True
        params.nthread = a.threads
        rc = llama_cpp.llama_model_quantize(a.model.encode(), a.out.encode(), ctypes.byref(params))
        print(json.dumps({"quantized": a.out, "rc": rc}))
        return
    prompt = [int(t) for t in a.prompt.split(",")]
    B, P = a.batch, len(prompt)
    llm = llama_cpp.Llama(a.model, n_ctx=512, n_threads=a.threads, verbose=False)  # loads the weights
    cp = llama_cpp.llama_context_default_params()  # a context with B sequences (the Llama class makes one)
    cp.n_ctx, cp.n_batch, cp.n_ubatch = B * (P + a.new + 8), max(512, B * P), max(512, B * P)
    cp.n_seq_max, cp.n_threads, cp.n_threads_batch, cp.kv_unified = B, a.threads, a.threads, True
    ctx = llama_cpp.llama_init_from_model(llm._model.model, cp)
    V = llm.n_vocab()
    batch = llama_cpp.llama_batch_init(max(B * P, B), 0, B)

    def fill(rows: list[tuple[int, int, int, bool]]) -> None:
        batch.n_tokens = len(rows)
        for i, (tok, pos, seq, logits) in enumerate(rows):
            batch.token[i], batch.pos[i], batch.n_seq_id[i] = tok, pos, 1
            batch.seq_id[i][0], batch.logits[i] = seq, logits

    def greedy(i: int) -> int:
        return int(np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx, i), shape=(V,)).argmax())

    def run(new: int) -> tuple[list[list[int]], float, float]:
        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(ctx), True)
        t0 = time.perf_counter()
        fill([(tok, p, b, p == P - 1) for b in range(B) for p, tok in enumerate(prompt)])
        assert llama_cpp.llama_decode(ctx, batch) == 0
        nxt = [greedy(b * P + P - 1) for b in range(B)]
        ttft = time.perf_counter() - t0
        out = [[t] for t in nxt]
        for step in range(1, new):
            fill([(nxt[b], P + step - 1, b, True) for b in range(B)])
            assert llama_cpp.llama_decode(ctx, batch) == 0
            nxt = [greedy(b) for b in range(B)]
            for b in range(B):
                out[b].append(nxt[b])
        return out, time.perf_counter() - t0, ttft

    run(4)  # warm-up
    _, _, ttft = run(1)
    reset_peak()
    c0 = time.process_time()
    out, dt, _ = run(a.new)
    cpu = time.process_time() - c0
    print(json.dumps({"tokens_per_s": B * a.new / dt, "tokens_per_cpu_s": B * a.new / cpu, "ttft_ms": ttft * 1000,
                      "peak_mib": peak_mib(), "tokens": out[0]}))


if __name__ == "__main__":
    main()
