"""LoRA fine-tuning speed and memory: lmforge vs transformers + peft, same weights, same batches.

    python bench/finetune.py [--batch-size 4] [--seq-len 128] [--steps 3] [--rounds 3] [--threads 1] [--dtype bf16]
                             [--compile]

Both sides fine-tune SmolLM2-135M-Instruct (the ``smollm2`` GGUF, dequantised to fp32 and exported to a
Hugging Face directory that both load) with LoRA r=8, alpha=16, dropout 0.05 on q,k,v,o,gate,up,down, AdamW
(lr 1e-4), fp32 weights (``--dtype bf16``: bf16 autocast on both sides; lmforge stores the frozen block
weights in bf16 as ``lmforge finetune`` does, the same products that autocast casts to), on the same batches: chitchat
conversations rendered by the model's chat template, cut to ``--seq-len`` + 1 tokens (every row full, no
padding), loss on the assistant tokens only (labels -100 elsewhere). transformers gets the standard
``labels=`` (it shifts them itself: the same targets but the last position's). A step is forward + backward
+ optimizer step; tokens/s counts input tokens.

Each measurement runs in a fresh process (``--worker``), so that peak memory is that implementation's
alone: the peak resident set (VmHWM) from just before the first training step to the end, weights included.
The two implementations alternate, in alternating order, for ``--rounds`` rounds; the script prints every
round and the medians, of wall-clock tokens/s and of tokens per CPU second of the process (one thread: the same
figure on a quiet core, and one that other jobs taking the core do not lower). The machine may be shared:
ratios of interleaved rounds are the figure to read.
``--compile``: lmforge compiles each Transformer block (``lmforge finetune --compile``; transformers + peft
stays eager); its warm-up step, which compiles, is timed and printed as the compile time.
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

import torch
from peak_memory import peak_mib, reset_peak  # bench/peak_memory.py (the scripts run from bench/)

from lmforge.utils import machine_summary

CONFIG = dict(r=8, alpha=16, dropout=0.05, targets=("q", "k", "v", "o", "gate", "up", "down"), lr=1e-4)


def batches(hf_dir: Path, batch_size: int, seq_len: int, steps: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(tokens (B, seq_len + 1), labels (B, seq_len + 1)) for each step: chitchat conversations, full rows."""
    from lmforge.data.sft import SFTEncoder, load_sft_data
    from lmforge.hub import load_model
    from lmforge.tokenizers.chat_template import ChatTemplate

    m = load_model(hf_dir)
    enc = SFTEncoder(m.tokenizer, ChatTemplate(m.chat_template))
    rows = []
    for ex in load_sft_data("chitchat", seed=0).splits["train"]:
        e = enc.encode(ex)
        if len(e.ids) > seq_len + 1 and sum(1 for t in e.labels[1:seq_len + 1] if t != -100) > seq_len // 4:
            rows.append((e.ids[: seq_len + 1], e.labels[: seq_len + 1]))
        if len(rows) == batch_size * steps:
            break
    out = []
    for s in range(steps):
        chunk = rows[s * batch_size:(s + 1) * batch_size]
        out.append((torch.tensor([r[0] for r in chunk]), torch.tensor([r[1] for r in chunk])))
    return out


def worker(impl: str, hf_dir: Path, args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    data = batches(hf_dir, args.batch_size, args.seq_len, args.steps + 1)
    c = CONFIG
    if impl == "lmforge":
        from lmforge.hub import load_model
        from lmforge.models.lora import LoRAConfig, add_lora
        from lmforge.train.finetune import low_precision_frozen_linears
        from lmforge.utils import retain_freed_memory

        retain_freed_memory()  # as lmforge finetune's Trainer does (LMFORGE_RETAIN_MEMORY=0: malloc's defaults)
        model = load_model(hf_dir)
        add_lora(model, LoRAConfig(r=c["r"], alpha=c["alpha"], dropout=c["dropout"], targets=c["targets"]))
        if args.dtype == "bf16":  # as lmforge finetune --dtype bf16: the frozen block weights cast once, not per step
            low_precision_frozen_linears(model, torch.bfloat16)
        if args.compile:  # regional, as FineTuner.compile_steps: the blocks, not the head
            for block in model.blocks:
                block.compile()

        def loss_of(ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
            return model(ids[:, :-1], labels[:, 1:])[1]
    else:
        import peft
        import transformers

        base = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
        model = peft.get_peft_model(base, peft.LoraConfig(
            r=c["r"], lora_alpha=c["alpha"], lora_dropout=c["dropout"], task_type="CAUSAL_LM",
            target_modules=[f"{t}_proj" for t in c["targets"]]))

        def loss_of(ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
            return model(input_ids=ids[:, :-1], labels=labels[:, :-1]).loss
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=c["lr"])
    n_params = sum(p.numel() for p in params)

    def step(ids: torch.Tensor, labels: torch.Tensor) -> float:
        loss = loss_of(ids, labels)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss)

    if args.dtype == "bf16":  # autocast on both sides: bf16 matmuls, fp32 weights and optimizer
        plain = step

        def step(ids: torch.Tensor, labels: torch.Tensor) -> float:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return plain(ids, labels)

    reset_peak()
    t0 = time.perf_counter()
    step(*data[0])  # warm-up (allocates the optimizer state; compiles with --compile)
    warmup_s = time.perf_counter() - t0
    t0, c0 = time.perf_counter(), time.process_time()
    losses = [step(*b) for b in data[1:]]
    dt, cpu = time.perf_counter() - t0, time.process_time() - c0
    tokens = args.steps * args.batch_size * args.seq_len
    return {"impl": impl, "tokens_per_s": tokens / dt, "tokens_per_cpu_s": tokens / cpu, "peak_mib": peak_mib(),
            "loss": losses[0], "trainable_params": n_params, "warmup_s": warmup_s}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--steps", type=int, default=3, help="timed steps per measurement (after one warm-up step)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"], help="bf16: autocast on both sides")
    ap.add_argument("--compile", action="store_true", help="lmforge compiles each block (finetune --compile)")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--hf-dir", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, Path(args.hf_dir), args)))
        return
    from lmforge.hub import load_model
    from lmforge.hub.export import export_hf

    print(f"{machine_summary(args.threads)}; load average "
          f"{os.getloadavg()[0]:.1f} (a shared machine when it exceeds the core count)")
    print(f"SmolLM2-135M-Instruct, LoRA r={CONFIG['r']} alpha={CONFIG['alpha']} dropout={CONFIG['dropout']} on "
          f"{','.join(CONFIG['targets'])}; batch {args.batch_size} x {args.seq_len} tokens, {args.dtype}, AdamW"
          + ("; lmforge's blocks compiled" if args.compile else ""))
    with tempfile.TemporaryDirectory() as tmp:
        hf_dir = Path(tmp) / "smollm2-hf"
        export_hf(load_model("smollm2"), hf_dir)  # the same fp32 weights for both
        results: dict[str, list[dict]] = {"lmforge": [], "transformers+peft": []}
        for r in range(args.rounds):
            order = ["lmforge", "transformers+peft"] if r % 2 == 0 else ["transformers+peft", "lmforge"]
            for impl in order:
                cmd = [sys.executable, __file__, "--worker", "lmforge" if impl == "lmforge" else "hf", "--hf-dir",
                       str(hf_dir), "--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len),
                       "--steps", str(args.steps), "--threads", str(args.threads), "--dtype", args.dtype]
                cmd += ["--compile"] if args.compile else []
                out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
                res = json.loads(out.strip().splitlines()[-1])
                results[impl].append(res)
                print(f"round {r + 1} {impl:18s} {res['tokens_per_s']:8.1f} tokens/s "
                      f"({res['tokens_per_cpu_s']:.1f} per CPU second)  peak {res['peak_mib']:7.0f} MiB  "
                      f"first loss {res['loss']:.4f}  "
                      f"({res['trainable_params']:,} trainable; warm-up step {res['warmup_s']:.1f} s)", flush=True)
    ours, theirs = results["lmforge"], results["transformers+peft"]
    ratios = [a["tokens_per_s"] / b["tokens_per_s"] for a, b in zip(ours, theirs)]
    med = {k: statistics.median(x["tokens_per_s"] for x in v) for k, v in results.items()}
    mem = {k: statistics.median(x["peak_mib"] for x in v) for k, v in results.items()}
    print(f"median tokens/s: lmforge {med['lmforge']:.1f}, transformers+peft {med['transformers+peft']:.1f}; "
          f"per-round ratios {', '.join(f'{x:.2f}' for x in ratios)} (median {statistics.median(ratios):.2f}x)")
    cpu_ratios = [a["tokens_per_cpu_s"] / b["tokens_per_cpu_s"] for a, b in zip(ours, theirs)]
    print(f"per CPU second (what a core shared with other jobs does not skew): per-round ratios "
          f"{', '.join(f'{x:.2f}' for x in cpu_ratios)} (median {statistics.median(cpu_ratios):.2f}x)")
    print(f"median peak memory: lmforge {mem['lmforge']:.0f} MiB, transformers+peft {mem['transformers+peft']:.0f} MiB "
          f"({mem['lmforge'] / mem['transformers+peft']:.2f}x)")


if __name__ == "__main__":
    main()
