"""nanoGPT's shakespeare_char recipe on one GPU: lmforge's trainer against nanoGPT's own loop, same run.

    PYTHONPATH=src python bench/gpu_train.py                     # the full recipe on cuda (about 5-10 min)
    PYTHONPATH=src python bench/gpu_train.py --device cpu --iters 30 --eval-interval 10   # a smoke test

The recipe (nanoGPT's config/train_shakespeare_char.py): 6 layers, 6 heads, width 384, block 256, batch 64,
dropout 0.2, AdamW lr 1e-3 (betas 0.9/0.99, weight decay 0.1), 100 warmup iterations, cosine decay to 1e-4
over 5000 iterations, gradient clipping 1.0, bf16 autocast (fp16 + scaler where bf16 is missing) and
torch.compile, as nanoGPT runs it on a GPU. Both read Tiny Shakespeare at nanoGPT's character level and
split (first 90% train, last 10% val).

Reported for each: training time (evaluation excluded) until the validation loss first reaches 1.47 (it is
measured every --eval-interval iterations on the same number of validation batches), the final validation
loss, ms per iteration and model FLOPs utilisation (nanoGPT's estimate_mfu formula, 6N + 12 L H Q T FLOPs
per token, against the bf16 matmul peak measured in the same run). lmforge goal: reach 1.47 in at most 0.7x
nanoGPT's time. Results go to stdout and, with --json, to a file.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from nanogpt_ref import NanoGPT  # noqa: E402
from paths import shared_data  # noqa: E402

from lmforge.data import PrepareConfig, TokenData, prepare  # noqa: E402
from lmforge.train import TrainConfig, Trainer  # noqa: E402

TINY = shared_data("tinyshakespeare.txt")
L, H, D, T, B = 6, 6, 384, 256, 64
TARGET = 1.47


def matmul_peak(device: torch.device, dtype: torch.dtype, n: int = 8192, reps: int = 20) -> float:
    """FLOP/s of a large matmul in ``dtype``: the roofline MFU is measured against."""
    if device.type == "cpu":
        n, reps = 1024, 5
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    sync(device)
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(device)
    return 2 * n ** 3 * reps / (time.perf_counter() - t0)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def flops_per_token(n_params: int) -> float:
    return 6 * n_params + 12 * L * H * (D // H) * T


def lr_at(it: int, iters: int) -> float:
    """nanoGPT's get_lr: linear warmup 100, cosine to min_lr over lr_decay_iters = iters."""
    lr, min_lr, warmup = 1e-3, 1e-4, 100
    if it < warmup:
        return lr * (it + 1) / (warmup + 1)
    ratio = min((it - warmup) / max(iters - warmup, 1), 1.0)
    return min_lr + 0.5 * (1 + math.cos(math.pi * ratio)) * (lr - min_lr)


def run_nanogpt(train: np.ndarray, val: np.ndarray, vocab: int, device: torch.device, amp: torch.dtype | None,
                iters: int, eval_interval: int, eval_iters: int, compile_: bool) -> dict:
    """nanoGPT's train.py loop, restated (one process, no accumulation)."""
    torch.manual_seed(1337)
    model = NanoGPT(vocab, T, L, H, D, dropout=0.2).to(device)
    opt = model.optimizer(lr=1e-3, wd=0.1, fused=device.type == "cuda")
    scaler = torch.amp.GradScaler(device.type, enabled=amp == torch.float16)
    fwd = torch.compile(model) if compile_ else model
    ctx = (lambda: torch.autocast(device.type, dtype=amp)) if amp else (lambda: torch.autocast(device.type,
                                                                                              enabled=False))

    def batch(data: np.ndarray, gen: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        ix = torch.randint(len(data) - T, (B,), generator=gen)
        x = torch.stack([torch.from_numpy(data[i:i + T].astype(np.int64)) for i in ix])
        y = torch.stack([torch.from_numpy(data[i + 1:i + 1 + T].astype(np.int64)) for i in ix])
        if device.type == "cuda":
            return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
        return x.to(device), y.to(device)

    @torch.no_grad()
    def val_loss() -> float:
        model.eval()
        gen = torch.Generator().manual_seed(12345)
        losses = []
        for _ in range(eval_iters):
            x, y = batch(val, gen)
            with ctx():
                losses.append(fwd(x, y).item())
        model.train()
        return sum(losses) / len(losses)

    train_time, reached, history = 0.0, None, []
    x, y = batch(train)
    for it in range(1, iters + 1):
        sync(device)
        t0 = time.perf_counter()
        for g in opt.param_groups:
            g["lr"] = lr_at(it - 1, iters)
        with ctx():
            loss = fwd(x, y)
        x, y = batch(train)  # prefetch while the GPU works, as nanoGPT does
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        sync(device)
        train_time += time.perf_counter() - t0
        if it % eval_interval == 0 or it == iters:
            v = val_loss()
            history.append((it, train_time, v))
            if reached is None and v <= TARGET:
                reached = train_time
    n = sum(p.numel() for p in model.parameters()) - model.wpe.weight.numel()
    return {"time_to_target_s": reached, "final_val_loss": history[-1][2], "train_time_s": train_time,
            "ms_per_iter": 1000 * train_time / iters, "params": n, "history": history}


def run_lmforge(data: Path, out: Path, device: str, iters: int, eval_interval: int, eval_iters: int,
                compile_: bool) -> dict:
    cfg = TrainConfig(data=str(data), out=str(out), model="gpt", preset="small",
                      model_args=dict(n_layer=L, n_head=H, n_embd=D, block_size=T, dropout=0.2),
                      batch_size=B, lr=1e-3, min_lr_ratio=0.1, weight_decay=0.1, beta1=0.9, beta2=0.99,
                      grad_clip=1.0, warmup_steps=100, schedule="cosine", max_steps=iters,
                      eval_interval=eval_interval, eval_iters=eval_iters, log_interval=50,
                      checkpoint_interval=iters, dtype="auto", compile=compile_, device=device, progress=False)
    trainer = Trainer(cfg)
    n = trainer.model.num_parameters()
    res = trainer.train()
    history = [(r["step"], r["time"], r["val_loss"]) for r in map(json.loads, (out / "metrics.jsonl").open())
               if "val_loss" in r]
    reached = next((t for _, t, v in history if v <= TARGET), None)
    return {"time_to_target_s": reached, "final_val_loss": res.val_loss, "train_time_s": res.train_time,
            "ms_per_iter": 1000 * res.train_time / iters, "params": n, "history": history}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", help="cuda (the benchmark) or cpu (a smoke test)")
    ap.add_argument("--iters", type=int, default=5000, help="training iterations (the recipe: 5000)")
    ap.add_argument("--eval-interval", type=int, default=250, help="iterations between validations")
    ap.add_argument("--eval-iters", type=int, default=50, help="validation batches of 64 sequences")
    ap.add_argument("--no-compile", action="store_true", help="eager mode for both")
    ap.add_argument("--json", default=None, help="also write the results to this file")
    a = ap.parse_args()
    device = torch.device(a.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench/gpu_train.py needs a CUDA GPU (or --device cpu for a smoke test)")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    amp = (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16) if device.type == "cuda" else None
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    peak = matmul_peak(device, amp or torch.float32)
    print(f"device: {name}; torch {torch.__version__}; autocast {amp}; matmul peak {peak / 1e9:,.0f} GFLOP/s; "
          f"{a.iters} iterations, validation every {a.eval_interval} on {a.eval_iters} batches", flush=True)
    with tempfile.TemporaryDirectory(prefix="lmforge-gpu-") as tmp:
        data = Path(tmp) / "shk"
        prepare(PrepareConfig(corpus=str(TINY), out=str(data), tokenizer="char", val_frac=0.1, test_frac=0.0,
                              byte_fallback=False), progress=False)
        td = TokenData(data)
        train, val = (np.asarray(td.split(s).arrays[0]) for s in ("train", "val"))
        results = {
            "nanogpt": run_nanogpt(train, val, td.vocab_size, device, amp, a.iters, a.eval_interval, a.eval_iters,
                                   not a.no_compile),
            "lmforge": run_lmforge(data, Path(tmp) / "run", a.device, a.iters, a.eval_interval, a.eval_iters,
                                   not a.no_compile),
        }
    print(f"\n{'loop':8s} {'to val 1.47':>12s} {'final val':>10s} {'ms/iter':>8s} {'MFU':>6s}")
    for k, r in results.items():
        r["mfu"] = flops_per_token(r["params"]) * B * T / (r["ms_per_iter"] / 1000) / peak
        reached = f"{r['time_to_target_s']:.1f} s" if r["time_to_target_s"] is not None else "not reached"
        print(f"{k:8s} {reached:>12s} {r['final_val_loss']:10.4f} {r['ms_per_iter']:8.1f} {r['mfu']:6.1%}")
    a_, b_ = results["lmforge"]["time_to_target_s"], results["nanogpt"]["time_to_target_s"]
    if a_ and b_:
        print(f"lmforge reaches {TARGET} in {a_ / b_:.2f}x nanoGPT's time (goal: <= 0.7x)")
    if a.json:
        Path(a.json).write_text(json.dumps({"device": name, "torch": torch.__version__, **results}, indent=2))


if __name__ == "__main__":
    main()
