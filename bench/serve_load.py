"""Load test of ``lmforge serve``: concurrent streaming clients on loopback against one server process.

    python bench/serve_load.py [--model smollm2] [--clients 1 4 8 32] [--passes 2] [--max-tokens 48]
                               [--parallel 8] [--ctx 512] [--threads 2] [--dtype fp32]

The server runs in a subprocess (``lmforge serve``, 127.0.0.1, a free port). Each round starts C clients at
once; each streams one completion of ``--max-tokens`` tokens (end-of-text ignored, greedy, a different short
prompt per client) and checks it: HTTP 200, ``finish_reason == "length"``, exactly ``--max-tokens`` tokens in the
``include_usage`` chunk, ``data: [DONE]`` at the end. A round reports failed/truncated responses, the server's
peak resident memory during the round (VmHWM of the server process, reset before each round), time to first
token (p50/p95), inter-token latency (p50/p95 of the gaps between streamed chunks) and aggregate tokens/s
(all tokens of the round / the round's wall time). Rounds are interleaved over ``--passes`` passes so that the
ratios against one stream (same pass) are not skewed by load that comes and goes on a shared machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

from lmforge.utils import machine_summary

PROMPTS = ["The history of the Roman empire", "A recipe for bread:", "Once upon a time, in a small village,",
           "The three laws of motion are", "Dear diary, today I", "In computer science, a hash table",
           "The best way to learn a language is", "Paris is the capital of"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def reset_peak(pid: int) -> None:
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")  # VmHWM := current RSS (Linux)
    except OSError:
        pass


def peak_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, int(round(q * (len(s) - 1))))]


async def one_stream(client: httpx.AsyncClient, url: str, prompt: str, max_tokens: int) -> dict:
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    first, last, gaps, usage, reason, done, pieces = None, None, [], None, None, False, 0
    try:
        async with client.stream("POST", url + "/v1/completions", json=body) as r:
            if r.status_code != 200:
                return {"ok": False, "why": f"HTTP {r.status_code}"}
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    done = True
                    break
                chunk = json.loads(data)
                if chunk.get("usage"):
                    usage = chunk["usage"]
                for c in chunk.get("choices", []):
                    if c.get("text"):
                        now = time.perf_counter()
                        if first is None:
                            first = now
                        else:
                            gaps.append(now - last)
                        last = now
                        pieces += 1
                    if c.get("finish_reason"):
                        reason = c["finish_reason"]
    except (httpx.HTTPError, json.JSONDecodeError) as e:
        return {"ok": False, "why": f"{type(e).__name__}: {e}"}
    tokens = usage["completion_tokens"] if usage else 0
    ok = done and reason == "length" and tokens == max_tokens
    return {"ok": ok, "why": "" if ok else f"truncated (done={done}, reason={reason}, tokens={tokens})",
            "ttft": (first or time.perf_counter()) - t0, "gaps": gaps, "tokens": tokens}


async def run_round(url: str, clients: int, max_tokens: int) -> dict:
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0), limits=limits) as client:
        t0 = time.perf_counter()
        res = await asyncio.gather(*(one_stream(client, url, PROMPTS[i % len(PROMPTS)] + f" ({i})", max_tokens)
                                     for i in range(clients)))
        wall = time.perf_counter() - t0
    ok = [r for r in res if r["ok"]]
    gaps = [g for r in ok for g in r["gaps"]]
    return {"clients": clients, "failed": len(res) - len(ok), "why": sorted({r["why"] for r in res if not r["ok"]}),
            "wall_s": wall, "tokens": sum(r["tokens"] for r in ok), "tok_s": sum(r["tokens"] for r in ok) / wall,
            "ttft_p50": pct([r["ttft"] for r in ok], 0.5), "ttft_p95": pct([r["ttft"] for r in ok], 0.95),
            "itl_p50": pct(gaps, 0.5), "itl_p95": pct(gaps, 0.95)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2", help="what lmforge serve loads (default smollm2)")
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 4, 8, 32], help="concurrent clients per round")
    ap.add_argument("--passes", type=int, default=2, help="passes over the rounds (interleaved)")
    ap.add_argument("--max-tokens", type=int, default=48, help="tokens per response")
    ap.add_argument("--parallel", type=int, default=8, help="the server's decoding slots")
    ap.add_argument("--ctx", type=int, default=512, help="the server's context per slot")
    ap.add_argument("--threads", type=int, default=2, help="the server's torch threads")
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "int8", "int4"], help="decoding weights")
    ap.add_argument("--json", default=None, help="write the rounds here as JSON")
    a = ap.parse_args()

    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    cmd = [sys.executable, "-m", "lmforge.cli", "serve", a.model, "--port", str(port), "--parallel", str(a.parallel),
           "--ctx", str(a.ctx), "--threads", str(a.threads), "--dtype", a.dtype, "--max-queue", "256"]
    server = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        t0 = time.perf_counter()
        while True:
            if server.poll() is not None:
                print(server.stderr.read() if server.stderr else "", file=sys.stderr)
                return 1
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.perf_counter() - t0 > 600:
                print("the server did not become ready in 10 minutes", file=sys.stderr)
                return 1
            time.sleep(0.5)
        load_s = time.perf_counter() - t0
        print(f"{machine_summary()}; load average {os.getloadavg()[0]:.1f} (a shared machine: other work runs "
              "on the same cores)")
        print(f"server: lmforge serve {a.model} --parallel {a.parallel} --ctx {a.ctx} --threads {a.threads} "
              f"--dtype {a.dtype} (ready in {load_s:.1f}s); {a.max_tokens} tokens per streamed response")
        print(f"{'pass':>4} {'clients':>7} {'failed':>6} {'tokens':>6} {'wall s':>7} {'tok/s':>7} {'x1':>5} "
              f"{'TTFT p50':>9} {'p95':>7} {'ITL p50':>8} {'p95':>7} {'peak MiB':>9}")
        asyncio.run(run_round(url, 1, 4))  # warm-up
        rows = []
        for p in range(a.passes):
            base = None
            for c in a.clients:
                reset_peak(server.pid)
                r = asyncio.run(run_round(url, c, a.max_tokens))
                r["pass"], r["peak_mib"] = p + 1, peak_mib(server.pid)
                base = r["tok_s"] if c == 1 else base
                r["x1"] = r["tok_s"] / base if base else float("nan")
                rows.append(r)
                print(f"{p + 1:>4} {c:>7} {r['failed']:>6} {r['tokens']:>6} {r['wall_s']:>7.1f} {r['tok_s']:>7.1f} "
                      f"{r['x1']:>5.2f} {r['ttft_p50'] * 1e3:>7.0f}ms {r['ttft_p95'] * 1e3:>5.0f}ms "
                      f"{r['itl_p50'] * 1e3:>6.0f}ms {r['itl_p95'] * 1e3:>5.0f}ms {r['peak_mib']:>9.0f}", flush=True)
                for why in r["why"]:
                    print(f"      failure: {why}")
        failed = sum(r["failed"] for r in rows)
        by_c = {c: [r for r in rows if r["clients"] == c] for c in a.clients}
        if 1 in by_c and 8 in by_c:
            ratios = [r8["tok_s"] / r1["tok_s"] for r1, r8 in zip(by_c[1], by_c[8])]
            print(f"8 streams / 1 stream aggregate tokens/s: {', '.join(f'{x:.2f}x' for x in ratios)} "
                  f"(median {statistics.median(ratios):.2f}x; goal >= 3x)")
        peaks = [r["peak_mib"] for r in rows]
        print(f"failed or truncated responses: {failed}; server peak memory per round {min(peaks):.0f}.."
              f"{max(peaks):.0f} MiB")
        metrics = httpx.get(url + "/metrics", timeout=10).text
        cancelled = [line for line in metrics.splitlines() if line.startswith("lmforge_sequences_total")]
        print("server sequences:", "; ".join(cancelled))
        if a.json:
            Path(a.json).write_text(json.dumps({"cpu": machine_summary(), "args": vars(a), "rounds": rows}, indent=2))
        return 0 if failed == 0 else 1
    finally:
        server.terminate()
        try:
            server.wait(20)
        except subprocess.TimeoutExpired:
            server.kill()


if __name__ == "__main__":
    sys.exit(main())
