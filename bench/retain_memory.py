"""Training steps with and without retain_freed_memory: ms per step, page faults and system time per step.

    python bench/retain_memory.py [--shape B] [--rounds 2] [--threads 1]

Each configuration runs in its own process (malloc's settings are per process), alternating, ``--rounds`` times:
``Trainer.train_step`` on nanoGPT's CPU shape (A: 4x128, block 64, batch 12) or the 6-layer, 384-wide one
(B: block 256, batch 16), bf16, with ``LMFORGE_RETAIN_MEMORY`` 1 and 0.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from paths import shared_data  # noqa: E402

SHAPES = {"A": (dict(n_layer=4, n_head=4, n_embd=128, block_size=64), 12, 30),
          "B": (dict(n_layer=6, n_head=6, n_embd=384, block_size=256), 16, 3)}


def worker(shape: str, threads: int) -> dict:
    import torch

    from lmforge.data import PrepareConfig, prepare
    from lmforge.train import TrainConfig, Trainer

    torch.set_num_threads(threads)
    tmp = Path(tempfile.mkdtemp())
    prepare(PrepareConfig(corpus=str(shared_data("tinyshakespeare.txt")), out=str(tmp / "data"), split="contiguous",
                          val_frac=0.1, test_frac=0.0, byte_fallback=False), progress=False)
    model_args, batch, steps = SHAPES[shape]
    tr = Trainer(TrainConfig(data=str(tmp / "data"), out=str(tmp / "run"), preset="nano", batch_size=batch,
                             max_steps=10 ** 9, dtype="bf16", progress=False, threads=threads, model_args=model_args))
    for _ in range(3):
        tr.train_step()
    r0, times = resource.getrusage(resource.RUSAGE_SELF), []
    for _ in range(3):
        t = time.perf_counter()
        for _ in range(steps):
            tr.train_step()
        times.append((time.perf_counter() - t) / steps)
    r1, n = resource.getrusage(resource.RUSAGE_SELF), 3 * steps
    return {"ms_per_step": 1e3 * float(np.median(times)), "faults_per_step": (r1.ru_minflt - r0.ru_minflt) / n,
            "sys_ms_per_step": 1e3 * (r1.ru_stime - r0.ru_stime) / n}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="B", choices=sorted(SHAPES))
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args.shape, args.threads)))
        return
    from lmforge.utils import machine_summary

    print(machine_summary(args.threads))
    rows: dict[str, list[dict]] = {"1": [], "0": []}
    for _ in range(args.rounds):
        for flag in rows:
            out = subprocess.run([sys.executable, __file__, "--worker", "--shape", args.shape, "--threads",
                                  str(args.threads)], capture_output=True, text=True, check=True,
                                 env={**os.environ, "LMFORGE_RETAIN_MEMORY": flag}).stdout
            res = json.loads(out.strip().splitlines()[-1])
            rows[flag].append(res)
            print(f"LMFORGE_RETAIN_MEMORY={flag}: {res['ms_per_step']:.1f} ms/step, {res['faults_per_step']:,.0f} page "
                  f"faults and {res['sys_ms_per_step']:.1f} ms system time per step", flush=True)
    kept, default = (float(np.median([r["ms_per_step"] for r in rows[f]])) for f in ("1", "0"))
    print(f"shape {args.shape}: retained {kept:.1f} vs malloc's defaults {default:.1f} ms/step ({default / kept:.2f}x)")


if __name__ == "__main__":
    main()
