"""``lmforge demo`` (what ``make demo`` runs): Shakespeare -> char tokenizer -> small GPT -> report.

The recipe (model preset ``tiny`` plus the training settings in ``DEMO_RECIPE``) was chosen to get
the furthest in five minutes on a 2-core CPU; docs/demo.md has the measurements behind it.
"""

from __future__ import annotations

import math
from pathlib import Path

from ..data import PrepareConfig, TokenData, prepare
from ..errors import LMForgeError
from ..evaluate import evaluate
from ..generation import generate_text
from ..hub import load_model
from ..train import TrainConfig, train

DEMO_RECIPE: dict = dict(
    model="gpt", preset="tiny", batch_size=32, lr=3e-3, min_lr_ratio=0.05, weight_decay=0.1, beta2=0.99,
    warmup_steps=50, schedule="linear", cooldown_frac=0.2, grad_clip=1.0, dtype="auto", eval_interval=250,
    eval_iters=20, optimizer="muon", muon_lr=0.02, model_args=dict(tie_embeddings=True),
)
# Why these (same-run comparisons in docs/demo.md, bench/recipes.py): at ~25k tokens/s the budget buys ~7M
# tokens, so a 0.87M-parameter model (4 layers, width 128) trained on all of them beats a wider one on fewer.
# Muon on the blocks' matrices (AdamW at 3e-3 on embeddings, norms) is worth ~0.17 nats at equal time;
# warmup-stable-decay (constant, then a linear cooldown over the last 20%) ~0.03 and a tied head ~0.02 more.
# Tried and dropped: QK-norm (slower, no better), ReLU^2 (helps AdamW, not Muon), lr 5e-3, batch 64, Muon at
# lr 0.01 or 0.04. --dtype auto: bf16 autocast where the matmul probe finds it faster (attention: lmforge's kernel,
# bf16 in and out, fp32 arithmetic, RoPE inside).


def free_run_dir(base: str = "runs/demo") -> str:
    p, i = Path(base), 2
    while p.exists():
        p = Path(f"{base}-{i}")
        i += 1
    return str(p)


def run_demo(data: str = "data/shakespeare-char", out: str | None = None, max_time: float = 300.0,
             progress: bool = True) -> dict:
    data_dir = Path(data)
    if not (data_dir / "meta.json").exists():
        print("1/4  preparing the built-in Shakespeare corpus at character level ...")
        prepare(PrepareConfig(corpus="shakespeare", out=str(data_dir), tokenizer="char"), progress=progress)
    else:
        print(f"1/4  using prepared data in {data_dir}")
    td = TokenData(data_dir)
    if td.meta["tokenizer"]["kind"] != "char":
        raise LMForgeError(f"{data_dir} is not character-level data; pass another --data")
    out = out or free_run_dir()
    print(f"2/4  training a small GPT for {max_time / 60:.1f} minutes on the CPU -> {out}")
    cfg = TrainConfig(data=str(data_dir), out=out, max_time=max_time, progress=progress, **DEMO_RECIPE)
    result = train(cfg)
    print("3/4  evaluating on the validation split ...")
    model = load_model(out)
    res = evaluate(model, td, split="val", batch_size=32)
    print(f"     val loss {res['loss']:.4f} nats/char | perplexity {math.exp(res['loss']):.2f} | "
          f"{res['bits_per_char']:.3f} bits/char | {result.tokens_per_second:,.0f} training tokens/s")
    print("4/4  a sample (temperature 0.8, top-k 50):\n")
    sample = generate_text(model, "ROMEO:", max_new_tokens=300, temperature=0.8, top_k=50, seed=1)
    print(sample)
    (Path(out) / "samples.txt").write_text(sample + "\n", encoding="utf-8")
    print(f"""
Next, try:
  lmforge generate {out} --prompt "JULIET:" --max-new-tokens 200 --temperature 0.8 --top-k 50 --stream
  lmforge eval {out} --split test
  lmforge train --resume {out} --max-time 2m          # train two more minutes
  python -c 'import lmforge; print(lmforge.generate("{out}", "HAMLET:", max_new_tokens=80))'
  open {out}/loss_curve.png
""")
    return res
