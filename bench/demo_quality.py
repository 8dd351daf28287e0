"""Quality in a fixed budget: the demo recipe on Tiny Shakespeare, nanoGPT's split, 5 CPU minutes.

    python bench/demo_quality.py [--minutes 5] [--baseline]

Prepares ../shared/data/tinyshakespeare.txt at character level with nanoGPT's split (first 90%
train, last 10% val), trains lmforge's demo recipe (lmforge.apps.demo.DEMO_RECIPE) for the time
budget, and evaluates the full validation split. With --baseline, also runs nanoGPT's published
CPU recipe (4 layers, width 128, block 64, batch 12, 2000 iterations, lr 1e-3) in the same run.
Writes the loss curve to bench/out/demo_quality.png and the numbers to bench/out/demo_quality.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from lmforge import load
from lmforge.apps.demo import DEMO_RECIPE
from lmforge.data import PrepareConfig, TokenData, prepare
from lmforge.evaluate import evaluate
from lmforge.train import TrainConfig, train
from lmforge.utils import machine_summary

sys.path.insert(0, str(Path(__file__).parent))
from paths import shared_data  # noqa: E402

TINY = shared_data("tinyshakespeare.txt")


def nanogpt_baseline(data: Path) -> dict:
    sys.path.insert(0, str(Path(__file__).parent))
    from nanogpt_ref import NanoGPT, get_batch, train_step

    torch.manual_seed(1337)
    train_arr = np.memmap(data / "train-00000.bin", dtype=np.uint16, mode="r").astype(np.int64)
    val_arr = np.memmap(data / "val-00000.bin", dtype=np.uint16, mode="r").astype(np.int64)
    vocab = int(max(train_arr.max(), val_arr.max())) + 1
    model = NanoGPT(vocab, 64, 4, 4, 128)
    opt = model.optimizer(lr=1e-3)
    t0 = time.perf_counter()
    for it in range(2000):
        # nanoGPT's get_lr: linear warmup (100 iters), cosine decay to min_lr 1e-4 at lr_decay_iters 2000
        lr = 1e-3 * (it + 1) / 101 if it < 100 else \
            1e-4 + 0.5 * (1e-3 - 1e-4) * (1 + np.cos(np.pi * (it - 100) / (2000 - 100)))
        for g in opt.param_groups:
            g["lr"] = lr
        train_step(model, opt, train_arr, 12, 64)
    secs = time.perf_counter() - t0
    model.eval()
    with torch.no_grad():
        losses = [model(*get_batch(val_arr, 12, 64)).item() for _ in range(200)]
    return {"recipe": "nanoGPT CPU (4L/4H/128d, block 64, batch 12, 2000 iters)", "seconds": secs,
            "val_loss": float(np.mean(losses))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=5.0)
    ap.add_argument("--baseline", action="store_true", help="also run nanoGPT's CPU recipe")
    ap.add_argument("--baseline-only", action="store_true", help="run only nanoGPT's CPU recipe")
    ap.add_argument("--out", default="bench/out")
    ap.add_argument("--set", nargs="*", default=[], help="override recipe entries, e.g. lr=2e-3")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp())
    data = tmp / "tinyshakespeare-char"
    prepare(PrepareConfig(corpus=str(TINY), out=str(data), split="contiguous", val_frac=0.1, test_frac=0.0),
            progress=False)
    if args.baseline_only:
        b = nanogpt_baseline(data)
        print(f"nanoGPT CPU recipe: val loss {b['val_loss']:.4f} after {b['seconds']:.0f}s")
        return
    recipe = dict(DEMO_RECIPE)
    model_args = dict(recipe.pop("model_args", {}))
    for kv in args.set:
        k, v = kv.split("=", 1)
        val = json.loads(v) if v[:1].isdigit() or v in ("true", "false") or v[:1] == "-" else v
        if k.startswith("model."):
            model_args[k[6:]] = val
        else:
            recipe[k] = val
    run = tmp / "run"
    cfg = TrainConfig(data=str(data), out=str(run), max_time=args.minutes * 60, model_args=model_args, **recipe)
    print(machine_summary())
    print(f"recipe: {cfg.to_dict()}")
    result = train(cfg)
    res = evaluate(load(run), TokenData(data), split="val", batch_size=32)
    shutil.copy(run / "loss_curve.png", out / "demo_quality.png")
    report = {"budget_s": args.minutes * 60, "steps": result.step, "tokens": result.tokens_seen,
              "train_time_s": result.train_time, "tokens_per_s": result.tokens_per_second,
              "val_loss_full_split": res["loss"], "bits_per_char": res["bits_per_char"],
              "recipe": cfg.to_dict(), "params": load(run).num_parameters()}
    print(f"\nlmforge demo recipe: {result.step} steps, {result.tokens_seen:,} tokens in {result.train_time:.0f}s "
          f"({result.tokens_per_second:,.0f} tok/s), {report['params']:,} params")
    print(f"  val loss (full val split) {res['loss']:.4f} nats/char, {res['bits_per_char']:.3f} bits/char "
          f"[goal <= 1.50, stretch 1.47]")
    if args.baseline:
        b = nanogpt_baseline(data)
        report["nanogpt_baseline"] = b
        print(f"nanoGPT CPU recipe: val loss {b['val_loss']:.4f} after {b['seconds']:.0f}s")
    (out / "demo_quality.json").write_text(json.dumps(report, indent=2))
    print(f"wrote {out / 'demo_quality.json'} and {out / 'demo_quality.png'}")
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
