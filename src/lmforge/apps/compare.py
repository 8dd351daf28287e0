"""``lmforge compare``: every model family on the same data, budget and test split.

Each model is trained (or loaded, when its run directory already exists) with the same wall-clock
budget, evaluated on the same split, and timed at generation. The headline column is bits per
byte, which does not depend on the tokenizer. Results go to the terminal, JSON, CSV and a PNG chart
(bits per byte by model, and validation curves over wall-clock time).
"""

from __future__ import annotations

import csv
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..data import TokenData
from ..data.parallel import ParallelData, load_data
from ..errors import LMForgeError
from ..evaluate import evaluate
from ..generation import GenerationConfig, generate_ids
from ..models import MODEL_REGISTRY, load_model, model_class, on_device
from ..tokenizers import load_tokenizer
from ..train import TrainConfig, train
from ..train.checkpoint import read_state
from ..utils import atomic_write, atomic_write_json, atomic_write_text, read_json, read_jsonl, refuse_file
from .ngram_cli import train_ngram

NEURAL_RECIPES: dict[str, dict[str, Any]] = {
    # the demo recipe for Transformers; recurrent nets like the same learning rate and less weight decay
    # (bf16 autocast, where the CPU has it natively, is 1.6x faster than fp32 for the fused CPU LSTM: 18.7k vs
    # 11.9k tokens/s; `auto` falls back to fp32 elsewhere)
    "gpt": dict(batch_size=32, lr=3e-3, min_lr_ratio=0.05, warmup_steps=50, dtype="auto", weight_decay=0.1),
    "lstm": dict(batch_size=32, lr=3e-3, min_lr_ratio=0.05, warmup_steps=20, dtype="auto", weight_decay=0.01),
    "gru": dict(batch_size=32, lr=3e-3, min_lr_ratio=0.05, warmup_steps=20, dtype="auto", weight_decay=0.01),
    "rnn": dict(batch_size=32, lr=1e-3, min_lr_ratio=0.05, warmup_steps=20, dtype="auto", weight_decay=0.01),
}


@dataclass
class ModelSpec:
    family: str
    arg: str  # preset for neural models, order for n-grams

    @property
    def name(self) -> str:
        return f"{self.family}-{self.arg}"

    @classmethod
    def parse(cls, text: str) -> ModelSpec:
        family, _, arg = text.partition(":")
        if family not in MODEL_REGISTRY:
            raise LMForgeError(f"unknown model family {family!r} in --models {text!r}; choose from "
                               f"{', '.join(sorted(MODEL_REGISTRY))}")
        if family == "ngram":
            if not arg.isdigit() or int(arg) < 1:
                raise LMForgeError(f"--models {text!r}: give the n-gram order, e.g. ngram:3")
            return cls(family, arg)
        cls_ = model_class(family)
        if cls_.is_seq2seq:
            raise LMForgeError(f"--models {text!r}: seq2seq models learn from (source, target) pairs, not from one "
                               "text; compare language models (gpt, lstm, gru, rnn, ngram) here and score seq2seq "
                               "runs with lmforge eval")
        presets = cls_.presets
        if not presets:
            raise LMForgeError(f"--models {text!r}: {family} checkpoints are loaded, not trained; compare trains "
                               "gpt, lstm, gru, rnn and ngram")
        arg = arg or cls_.default_preset
        if arg not in presets:
            raise LMForgeError(f"unknown {family} preset {arg!r} in --models {text!r}; choose from "
                               f"{', '.join(presets)}")
        return cls(family, arg)


def _val_curve(run: Path) -> list[tuple[float, float]]:
    return [(r["time"], r["val_loss"]) for r in read_jsonl(run / "metrics.jsonl") if "val_loss" in r]


@torch.no_grad()
def generation_speed(model: Any, n_tokens: int = 100) -> float:
    prompt = [model.tokenizer.eot_id] if model.tokenizer is not None else [0]
    cfg = GenerationConfig(max_new_tokens=n_tokens, temperature=1.0, seed=0, ignore_eos=True)
    generate_ids(model, prompt, GenerationConfig(max_new_tokens=5, seed=0, ignore_eos=True))  # warm-up
    t0 = time.perf_counter()
    out = generate_ids(model, prompt, cfg)
    return len(out[0]) / (time.perf_counter() - t0)


REPORT_FILES = ("table.txt", "compare.json", "compare.csv", "compare.png")


def compare(data: str, budget: float, models: list[str], out: str, split: str = "test",
            progress: bool = True, eval_max_tokens: int | None = None, force: bool = False,
            device: str = "auto") -> list[dict[str, Any]]:
    """``force``: replace the report files of an earlier comparison in ``out`` (its runs are reused either way);
    ``device``: where the neural models train and are evaluated (``--device``)."""
    specs = [ModelSpec.parse(m) for m in models]  # every spec is checked before any training
    if not specs:
        raise LMForgeError("give at least one model in --models, e.g. ngram:3 lstm:small gpt:tiny")
    out_dir = refuse_file(out)

    td = load_data(data)
    if isinstance(td, ParallelData):
        raise LMForgeError(f"{data} holds parallel (source, target) pairs for seq2seq models; compare needs a text "
                           "corpus prepared for language models (lmforge prepare --corpus ...)")
    for spec in specs:  # an existing run must have been trained with this data's tokenizer
        _check_existing_run(out_dir / "runs" / spec.name, td)
    kept = [f for f in REPORT_FILES if (out_dir / f).exists()]
    if kept and not force:  # checked before any training: the report is written at the end
        raise LMForgeError(f"{out_dir} already holds a comparison report ({', '.join(kept)}); pass --force to "
                           "replace it (the runs in OUT/runs are reused), or choose another --out")
    for f in REPORT_FILES:
        if (out_dir / f).is_dir():
            raise LMForgeError(f"{out_dir / f} is a directory; the report file cannot be written there")
    if not td.has_split(split):
        split = "val"
    if td.meta["tokenizer"]["kind"] == "word" and any(s.family != "ngram" for s in specs):
        print("lmforge: note: neural models on word-level data use the word vocabulary (<unk> included)")
    (out_dir / "runs").mkdir(parents=True, exist_ok=True)
    rows = []
    for spec in specs:
        run = out_dir / "runs" / spec.name
        if (run / "config.json").exists() and (run / "model.safetensors").exists():
            print(f"== {spec.name}: loading the existing run {run}")
            train_info = _existing_train_info(run)
        else:
            print(f"== {spec.name}: training for {budget:.0f}s")
            train_info = _train(spec, data, str(run), budget, progress, device)
        model = on_device(load_model(run), device if spec.family != "ngram" else "cpu")
        res = evaluate(model, td, split=split, max_tokens=eval_max_tokens)
        rows.append({
            "model": spec.name, "family": spec.family, "parameters": model.num_parameters(),
            "train_seconds": round(train_info["train_seconds"], 1), "tokens_seen": train_info["tokens_seen"],
            "test_loss": res["loss"], "test_perplexity": res["perplexity"], "bits_per_byte": res["bits_per_byte"],
            "train_tokens_per_s": train_info["tokens_per_s"], "gen_tokens_per_s": generation_speed(model),
            "split": split, "val_curve": _val_curve(run),
        })
        print(f"   {spec.name}: {res['bits_per_byte']:.4f} bits/byte on {split}")
    write_reports(rows, out_dir, Path(data).name, budget)
    return rows


def _check_existing_run(run: Path, data: TokenData) -> None:
    """A run kept from an earlier comparison is reused only if it reads this data's tokens: a model
    whose tokenizer differs would score ids that mean other strings (silently wrong numbers)."""
    if not (run / "config.json").exists():
        return

    if not (run / "tokenizer.json").exists():
        raise LMForgeError(f"{run} has no tokenizer.json; delete it so that compare retrains it")
    if read_json(run / "tokenizer.json") != read_json(data.path / "tokenizer.json"):
        tok = load_tokenizer(run)
        raise LMForgeError(f"{run} was trained with another tokenizer ({tok.kind}, vocab {tok.vocab_size}) than "
                           f"{data.path} ({data.meta['tokenizer']['kind']}, vocab {data.vocab_size}); delete the "
                           "run or choose another --out")


def _existing_train_info(run: Path) -> dict[str, Any]:
    state = run / "checkpoint" / "state.json"
    if state.exists():
        s = read_state(state.parent)
        return {"train_seconds": s["train_time"], "tokens_seen": s["tokens_seen"],
                "tokens_per_s": s["tokens_seen"] / max(s["train_time"], 1e-9)}
    m = run / "metrics.json"
    info = read_json(m, "run metrics") if m.exists() else {}
    try:
        secs = float(info.get("build_seconds", info.get("train_seconds", 0.0)))
        toks = int(info.get("train_tokens", info.get("tokens", 0)))
    except (AttributeError, TypeError, ValueError):
        raise LMForgeError(f"{m} is damaged; delete the run {run} so that compare retrains it") from None
    return {"train_seconds": secs, "tokens_seen": toks, "tokens_per_s": toks / max(secs, 1e-9)}


def _train(spec: ModelSpec, data: str, run: str, budget: float, progress: bool,
           device: str = "auto") -> dict[str, Any]:
    if spec.family == "ngram":

        t0 = time.perf_counter()
        # small vocabularies (characters) often give counts-of-counts without valid discounts at low
        # orders: fall back there as KenLM's --discount_fallback does
        train_ngram(data, run, order=int(spec.arg), smoothing="modified-kneser-ney", discount_fallback=True)
        secs = time.perf_counter() - t0
        toks = len(TokenData(data).split("train"))
        return {"train_seconds": secs, "tokens_seen": toks, "tokens_per_s": toks / max(secs, 1e-9)}

    recipe = dict(NEURAL_RECIPES.get(spec.family, NEURAL_RECIPES["lstm"]))
    cfg = TrainConfig(data=data, out=run, model=spec.family, preset=spec.arg, max_time=budget,
                      eval_interval=100, eval_iters=10, progress=progress, device=device, **recipe)
    r = train(cfg)
    return {"train_seconds": r.train_time, "tokens_seen": r.tokens_seen, "tokens_per_s": r.tokens_per_second}


COLUMNS = [("model", "model", "{}"), ("parameters", "params", "{:,}"), ("train_seconds", "train s", "{:.0f}"),
           ("tokens_seen", "tokens seen", "{:,}"), ("test_loss", "loss/token", "{:.4f}"),
           ("test_perplexity", "ppl/token", "{:.3f}"), ("bits_per_byte", "bits/byte", "{:.4f}"),
           ("train_tokens_per_s", "train tok/s", "{:,.0f}"), ("gen_tokens_per_s", "gen tok/s", "{:,.1f}")]


def format_table(rows: list[dict[str, Any]]) -> str:
    cells = [[h for _, h, _ in COLUMNS]] + [[f.format(r[k]) for k, _, f in COLUMNS] for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(COLUMNS))]
    lines = []
    for j, c in enumerate(cells):
        lines.append("  ".join(x.ljust(w) if i == 0 else x.rjust(w) for i, (x, w) in enumerate(zip(c, widths))))
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def write_reports(rows: list[dict[str, Any]], out_dir: Path, data_name: str, budget: float) -> None:
    table = format_table(rows)
    print("\n" + table)
    atomic_write_text(out_dir / "table.txt", table + "\n")
    atomic_write_json(out_dir / "compare.json", {"data": data_name, "budget_seconds": budget, "models": rows})

    def write_csv(tmp: str) -> None:
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow([k for k, _, _ in COLUMNS] + ["split"])
            for r in rows:
                w.writerow([r[k] for k, _, _ in COLUMNS] + [r["split"]])

    atomic_write(out_dir / "compare.csv", write_csv)
    from ..viz.plots import plot_comparison

    plot_comparison(rows, out_dir / "compare.png", title=f"{data_name}: {budget / 60:.1f} min per model")
    print(f"\nwrote {out_dir}/table.txt, compare.json, compare.csv, compare.png")
