"""Throughput of `lmforge train` on one machine: one process against two processes (DDP, FSDP2).

The 6-layer, 6-head, 384-wide nanoGPT shape (block 256, dropout 0, fp32) trains the same global batch
(8 sequences = 2,048 tokens per step) as:

  1 proc x 1 thread    the baseline of classic scaling efficiency
  1 proc x 2 threads   the same two cores used by intra-op threads
  DDP 2 procs x 1      torchrun, gloo; gradients all-reduced once per step
  FSDP2 2 procs x 1    torchrun, gloo; parameters all-gathered per block, gradients reduce-scattered

Rounds are interleaved (every configuration once per round) so that load from other work on a shared
machine spreads over all of them; the median step time over the steady steps of each run is kept, and
the best round reported. The communication share of a step is measured in the same run by timing the
collectives a step issues on tensors of the model's size (DDP: one all-reduce of the gradients; FSDP:
two all-gathers of the parameters and one reduce-scatter of the gradients) and dividing by the step time;
DDP overlaps part of its all-reduce with the backward pass, so this is an upper bound.

    PYTHONPATH=src .venv/bin/python bench/scaling.py [--steps 12] [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from paths import shared_data  # bench/paths.py (the scripts run from bench/)

from lmforge.utils import machine_summary

ROOT = Path(__file__).resolve().parents[1]
SHAKESPEARE = shared_data("tinyshakespeare.txt")
SHAPE = ["--preset", "nano", "--n-layer", "6", "--n-head", "6", "--n-embd", "384", "--block-size", "256",
         "--dropout", "0", "--dtype", "fp32"]
GLOBAL_BATCH = 8


def env(threads: int) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(ROOT / "src")}


def run_train(data: Path, out: Path, nproc: int, threads: int, strategy: str, steps: int) -> float:
    """Median seconds per optimizer step over the steady steps of one run."""
    args = ["train", "--data", str(data), "--out", str(out), *SHAPE, "--batch-size", str(GLOBAL_BATCH // nproc),
            "--max-steps", str(steps), "--log-interval", "1", "--eval-interval", "100000", "--eval-iters", "1",
            "--warmup-steps", "1", "--threads", str(threads), "--no-progress"]
    if nproc == 1:
        cmd = [sys.executable, "-m", "lmforge", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", "-m",
               "lmforge", *args, "--strategy", strategy]
    r = subprocess.run(cmd, env=env(threads), capture_output=True, text=True, timeout=1800)
    if r.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{r.stderr[-3000:]}")
    times = [json.loads(line)["time"] for line in (out / "metrics.jsonl").read_text().splitlines()
             if '"loss"' in line]
    dts = [b - a for a, b in zip(times, times[1:])][2:]  # drop the first steps (allocation, warm-up)
    return statistics.median(dts)


def comm_worker(numel: int, reps: int) -> None:
    """Under torchrun: time the collectives of one DDP step and one FSDP step for ``numel`` parameters."""
    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo")
    world, rank = dist.get_world_size(), dist.get_rank()
    grads = torch.randn(numel)
    shard = torch.randn(numel // world)
    full = torch.empty(shard.numel() * world)

    def timed(fn) -> float:
        fn()
        dist.barrier()
        ts = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
        return statistics.median(ts)

    t_ar = timed(lambda: dist.all_reduce(grads))
    t_ag = timed(lambda: dist.all_gather_into_tensor(full, shard))
    t_rs = timed(lambda: dist.reduce_scatter_tensor(shard, full))
    if rank == 0:
        print(json.dumps({"all_reduce": t_ar, "all_gather": t_ag, "reduce_scatter": t_rs}))
    dist.destroy_process_group()


def measure_comm(numel: int) -> dict[str, float]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", __file__,
           "--comm-worker", str(numel)]
    r = subprocess.run(cmd, env=env(1), capture_output=True, text=True, timeout=600)
    if r.returncode:
        raise SystemExit(r.stderr[-3000:])
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=12, help="optimizer steps per run (the first 3 are not timed)")
    ap.add_argument("--rounds", type=int, default=2, help="interleaved rounds of all configurations")
    ap.add_argument("--comm-worker", type=int, default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.comm_worker is not None:
        comm_worker(a.comm_worker, reps=5)
        return
    configs = [("1 proc x 1 thread", 1, 1, "none"), ("1 proc x 2 threads", 1, 2, "none"),
               ("DDP 2 procs x 1 thread", 2, 1, "ddp"), ("FSDP2 2 procs x 1 thread", 2, 1, "fsdp")]
    tokens_per_step = GLOBAL_BATCH * 256
    print(f"{machine_summary()} (each configuration sets its own threads, below)")
    print(f"torch: {__import__('torch').__version__}; global batch {GLOBAL_BATCH} x 256 tokens; {a.steps} steps "
          f"per run, {a.rounds} interleaved rounds; the machine may be shared with other work")
    with tempfile.TemporaryDirectory(prefix="lmforge-scaling-") as tmp:
        data = Path(tmp) / "data"
        subprocess.run([sys.executable, "-m", "lmforge", "prepare", "--corpus", str(SHAKESPEARE), "--out", str(data),
                        "--val-frac", "0.1", "--test-frac", "0", "--no-progress"], env=env(2), check=True,
                       capture_output=True)
        best: dict[str, float] = {}
        for rnd in range(a.rounds):
            for name, nproc, threads, strategy in configs:
                dt = run_train(data, Path(tmp) / f"r{rnd}-{nproc}-{threads}-{strategy}", nproc, threads, strategy,
                               a.steps)
                best[name] = min(best.get(name, dt), dt)
                print(f"  round {rnd + 1}: {name:26s} {dt * 1000:8.1f} ms/step {tokens_per_step / dt:9.0f} tok/s",
                      flush=True)
        sys.path.insert(0, str(ROOT / "src"))
        from lmforge.models import create_model

        numel = create_model("gpt", 65, "nano", n_layer=6, n_head=6, n_embd=384, block_size=256).num_parameters()
        comm = measure_comm(numel)
    base1, base2 = best["1 proc x 1 thread"], best["1 proc x 2 threads"]
    print(f"\n{'configuration':26s} {'ms/step':>9s} {'tok/s':>9s} {'vs 1x2 threads':>15s} {'efficiency':>11s} "
          f"{'comm share':>11s}")
    for name, nproc, threads, strategy in configs:
        dt = best[name]
        eff = base1 / (dt * nproc * threads)  # classic: speed-up over 1 core / cores used
        share = ""
        if strategy == "ddp":
            share = f"{min(comm['all_reduce'] / dt, 1):.0%}"
        elif strategy == "fsdp":
            share = f"{min((2 * comm['all_gather'] + comm['reduce_scatter']) / dt, 1):.0%}"
        print(f"{name:26s} {dt * 1000:9.1f} {tokens_per_step / dt:9.0f} {base2 / dt:14.2f}x {eff:10.0%} {share:>11s}")
    print(f"\ncollectives on {numel:,} fp32 parameters (2 processes, gloo): all-reduce {comm['all_reduce'] * 1000:.1f} "
          f"ms, all-gather {comm['all_gather'] * 1000:.1f} ms, reduce-scatter {comm['reduce_scatter'] * 1000:.1f} ms")


if __name__ == "__main__":
    main()
