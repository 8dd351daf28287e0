"""``lmforge compare``: every model family on the same data, budget and test split.

Each model is trained (or loaded, when its run directory already exists and was trained under the
same budget) with the same budget, either wall-clock training time (``5m``: equal compute on this
machine) or training tokens (``5M``: equal data), evaluated on the same split, and timed at
generation. The headline column is bits per byte, which does not depend on the tokenizer. Results go
to the terminal, JSON, CSV and a PNG chart (bits per byte by model, and validation curves over both
wall-clock time and tokens seen, with the n-grams as reference lines).
"""

from __future__ import annotations

import csv
import math
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from ..data import TokenData
from ..data.parallel import ParallelData, load_data
from ..errors import LMForgeError
from ..evaluate import evaluate
from ..generation import GenerationConfig, generate_ids
from ..models import MODEL_REGISTRY, LanguageModel, load_model, model_class, on_device
from ..tokenizers import load_tokenizer
from ..train import TrainConfig, train
from ..train.checkpoint import read_state
from ..utils import (
    atomic_write,
    atomic_write_json,
    atomic_write_text,
    parse_duration,
    parse_token_count,
    read_json,
    read_jsonl,
    refuse_file,
)
from .demo import DEMO_RECIPE
from .ngram_cli import train_ngram

RECURRENT_RECIPE: dict[str, Any] = dict(
    batch_size=32, lr=3e-3, min_lr_ratio=0.05, warmup_steps=20, dtype="auto", weight_decay=0.01, optimizer="muon",
    muon_lr=0.04, schedule="linear", cooldown_frac=0.2, model_args=dict(dropout=0.0, dropout_out=0.0))
NEURAL_RECIPES: dict[str, dict[str, Any]] = {
    # The demo recipe for Transformers (Muon, warmup-stable-decay, tied head). Recurrent nets (LSTM, GRU, Elman RNN):
    # Muon on the W and U matrices with warmup-stable-decay and no dropout. The same-run comparisons behind both are
    # in docs/demo.md, "What was tried" (after 2 minutes: LSTM 2.29 -> 1.57, GRU 1.97 -> 1.58, RNN 1.78 -> 1.61
    # nats/char). `auto` dtype: bf16 autocast where the matmul probe finds it faster (the fused CPU kernels of the
    # recurrent cells run bf16 natively).
    "gpt": {k: v for k, v in DEMO_RECIPE.items() if k not in ("model", "preset", "eval_interval", "eval_iters")},
    "lstm": RECURRENT_RECIPE,
    "gru": RECURRENT_RECIPE,
    "rnn": dict(RECURRENT_RECIPE, lr=1e-3),  # AdamW's rate for the embedding and head (3e-3 not screened)
}


MAX_BUDGET_SECONDS = 366 * 86400.0  # a year of training per model is a typo, not a plan
BUDGET_GRAMMAR = ("give a time (90s, 5m = 5 minutes, 1.5h) or a token count (200k, 5M = 5 million tokens, 2G, "
                  "5Mtok, 20000tok)")
_TOKEN_BUDGET = re.compile(r"^\d+(?:\.\d*)?\s*(?:[kKMG]\s*(?:tok|tokens)?|tok|tokens)$")


@dataclass(frozen=True)
class Budget:
    """What every model of a comparison gets: seconds of training (equal compute) or training tokens
    (equal data). Text grammar: a number with s/sec/m/min/h is time (lowercase m = minutes); a number
    with k/K/M/G (thousand, million, billion) and/or tok/tokens is tokens (capital M = million). A bare
    number is refused as ambiguous on the command line; from Python, a number is seconds."""

    kind: Literal["time", "tokens"]
    amount: float  # seconds, or a whole number of tokens

    @classmethod
    def parse(cls, value: str | float | Budget) -> Budget:
        if isinstance(value, Budget):
            return value
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            raise LMForgeError(f"bad budget {value!r}: {BUDGET_GRAMMAR}")
        if not isinstance(value, str):  # seconds, as compare(data, 300.0, ...) always took
            if not math.isfinite(value) or value <= 0:
                raise LMForgeError(f"bad budget {value!r}: seconds must be a positive finite number")
            return cls._time(float(value), str(value))
        text = value.strip()
        if text.startswith("-"):
            raise LMForgeError(f"bad budget {value!r}: it must be positive; {BUDGET_GRAMMAR}")
        if re.fullmatch(r"\d+(?:\.\d*)?", text):
            raise LMForgeError(f"bad budget {value!r}: give a unit, {text}s (seconds) or {text}tok (tokens)")
        if _TOKEN_BUDGET.match(text):
            try:
                return cls("tokens", parse_token_count(text))
            except LMForgeError as e:  # zero, a fraction of a token, absurdly many
                raise LMForgeError(f"bad budget: {e}") from None
        try:
            seconds = parse_duration(text) or 0.0
        except LMForgeError:
            why = "it must be positive" if re.fullmatch(r"[0.]+\s*[a-z]*", text) else "not a time or a token count"
            raise LMForgeError(f"bad budget {value!r}: {why}; {BUDGET_GRAMMAR}") from None
        return cls._time(seconds, value)

    @classmethod
    def _time(cls, seconds: float, text: str) -> Budget:
        if seconds > MAX_BUDGET_SECONDS:
            raise LMForgeError(f"bad budget {text!r}: more than a year of training per model; {BUDGET_GRAMMAR}")
        return cls("time", seconds)

    def words(self) -> str:
        """The budget in words, e.g. '5 minutes of training per model' or '5,000,000 training tokens per
        model' (5m and 5M differ only in case: the report says which was meant)."""
        if self.kind == "tokens":
            return f"{int(self.amount):,} training tokens per model"
        s = self.amount
        n, unit = (s / 3600, "hour") if s >= 3600 and s % 900 == 0 else (s / 60, "minute") \
            if s >= 60 and s % 15 == 0 else (s, "second")
        return f"{n:g} {unit}{'' if n == 1 else 's'} of training per model"

    def short(self) -> str:
        """For table cells and CSV: '300 s' or '5,000,000 tok'."""
        return f"{int(self.amount):,} tok" if self.kind == "tokens" else f"{self.amount:g} s"

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "amount": int(self.amount) if self.kind == "tokens" else self.amount,
                "text": self.words()}



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


def _val_curves(run: Path) -> tuple[list[tuple[float, float]], list[tuple[int, float]]]:
    """Validation loss against training seconds, and against training tokens seen."""
    recs = [r for r in read_jsonl(run / "metrics.jsonl") if "val_loss" in r]
    return ([(r["time"], r["val_loss"]) for r in recs],
            [(r["tokens"], r["val_loss"]) for r in recs if "tokens" in r])


@torch.no_grad()
def generation_speed(model: Any, n_tokens: int = 100) -> float:
    prompt = [model.tokenizer.eot_id] if model.tokenizer is not None else [0]
    cfg = GenerationConfig(max_new_tokens=n_tokens, temperature=1.0, seed=0, ignore_eos=True)
    generate_ids(model, prompt, GenerationConfig(max_new_tokens=5, seed=0, ignore_eos=True))  # warm-up
    t0 = time.perf_counter()
    out = generate_ids(model, prompt, cfg)
    return len(out[0]) / (time.perf_counter() - t0)


REPORT_FILES = ("table.txt", "compare.json", "compare.csv", "compare.png")


def compare(data: str, budget: str | float | Budget, models: list[str], out: str, split: str = "test",
            progress: bool = True, eval_max_tokens: int | None = None, force: bool = False,
            device: str = "auto") -> list[dict[str, Any]]:
    """``budget``: per model, seconds of training (a number, or text such as "5m", "300s") or training
    tokens (text such as "5M", "200k", "20000tok"); see :class:`Budget`. ``force``: replace the report
    files of an earlier comparison in ``out`` (its runs are reused either way); ``device``: where the
    neural models train and are evaluated (``--device``)."""
    budget = Budget.parse(budget)
    specs = [ModelSpec.parse(m) for m in models]  # every spec is checked before any training
    if not specs:
        raise LMForgeError("give at least one model in --models, e.g. ngram:3 lstm:small gpt:tiny")
    out_dir = refuse_file(out)

    td = load_data(data)
    if isinstance(td, ParallelData):
        raise LMForgeError(f"{data} holds parallel (source, target) pairs for seq2seq models; compare needs a text "
                           "corpus prepared for language models (lmforge prepare --corpus ...)")
    n_train = len(td.split("train"))
    for spec in specs:  # an existing run must have been trained with this data's tokenizer and this budget
        _check_existing_run(out_dir / "runs" / spec.name, td, spec, budget, n_train)
    kept = [f for f in REPORT_FILES if (out_dir / f).exists()]
    if kept and not force:  # checked before any training: the report is written at the end
        raise LMForgeError(f"{out_dir} already holds a comparison report ({', '.join(kept)}); pass --force to "
                           "replace it (the runs in OUT/runs are reused), or choose another --out")
    for f in REPORT_FILES:
        if (out_dir / f).is_dir():
            raise LMForgeError(f"{out_dir / f} is a directory; the report file cannot be written there")
    print(f"budget: {budget.words()}")
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
            what = f"on {int(budget.amount):,} tokens" if budget.kind == "tokens" else f"for {budget.amount:g}s"
            print(f"== {spec.name}: training {what}" if spec.family != "ngram" else
                  f"== {spec.name}: counting {_ngram_tokens(budget, n_train):,} training tokens")
            train_info = _train(spec, data, str(run), budget, progress, device)
        model = on_device(load_model(run), device if spec.family != "ngram" else "cpu")
        stride = eval_stride(model)
        res = evaluate(model, td, split=split, max_tokens=eval_max_tokens, stride=stride)
        by_time, by_tokens = _val_curves(run)
        rows.append({
            "model": spec.name, "family": spec.family, "budget": _row_budget(spec, budget, n_train),
            "parameters": model.num_parameters(),
            "train_seconds": round(train_info["train_seconds"], 1), "tokens_seen": train_info["tokens_seen"],
            "test_loss": res["loss"], "test_perplexity": res["perplexity"], "bits_per_byte": res["bits_per_byte"],
            "train_tokens_per_s": train_info["tokens_per_s"], "gen_tokens_per_s": generation_speed(model),
            "split": split, "eval_stride": stride, "val_curve": by_time, "val_curve_tokens": by_tokens,
        })
        print(f"   {spec.name}: {res['bits_per_byte']:.4f} bits/byte on {split}")
    write_reports(rows, out_dir, Path(data).name, budget)
    return rows


def eval_stride(model: LanguageModel) -> int | None:
    """How a model is scored so that each family conditions on all the history it can use: an n-gram on
    its n-1 tokens and a recurrent net on its state carried over the whole split need nothing special; a
    fixed-window model (GPT) slides its window by half its length, so every scored token after the first
    window sees at least ``context_length // 2`` tokens of history (non-overlapping windows would score the
    start of each window from almost nothing). The usual way to score fixed-length models (e.g. Hugging
    Face's "perplexity of fixed-length models" guide)."""
    ctx = model.context_length
    return max(1, ctx // 2) if ctx else None


def _ngram_tokens(budget: Budget, n_train: int) -> int:
    """N-grams count the training split once: all of it, or its first N tokens under a token budget
    (more passes over the same tokens would add nothing to the counts)."""
    return min(int(budget.amount), n_train) if budget.kind == "tokens" else n_train


def _row_budget(spec: ModelSpec, budget: Budget, n_train: int) -> str:
    """What the row was trained with, for the table and CSV."""
    if spec.family != "ngram":
        return budget.short()
    n = _ngram_tokens(budget, n_train)
    return "1 pass" if n == n_train else f"first {n:,} tok"


def _trained_budget(run: Path, spec: ModelSpec, n_train: int) -> Budget | str:
    """The budget an existing run was trained under, as a :class:`Budget` when it is one compare gives
    (for n-grams: the tokens counted), else described in words."""
    if spec.family == "ngram":
        m = run / "metrics.json"
        info = read_json(m, "run metrics") if m.exists() else {}
        n = info.get("train_tokens") if isinstance(info, dict) else None
        if not isinstance(n, int):
            return "unknown (no train_tokens in metrics.json)"
        return Budget("tokens", n)
    state = run / "checkpoint" / "state.json"
    if not state.exists():
        return "unknown (no checkpoint/state.json)"
    cfg = read_state(state.parent).get("config", {})
    if cfg.get("max_tokens") is not None:
        return Budget("tokens", int(cfg["max_tokens"]))
    if cfg.get("max_time") is not None and cfg.get("max_steps") is None:
        return Budget("time", float(cfg["max_time"]))
    return ", ".join(f"{k} {cfg[k]}" for k in ("max_steps", "max_time") if cfg.get(k) is not None) or "unknown"


def _check_existing_run(run: Path, data: TokenData, spec: ModelSpec, budget: Budget, n_train: int) -> None:
    """A run kept from an earlier comparison is reused only if it reads this data's tokens: a model
    whose tokenizer differs would score ids that mean other strings (silently wrong numbers); and only
    if it was trained under this comparison's budget (else the rows would not be comparable)."""
    if not (run / "config.json").exists():
        return

    if not (run / "tokenizer.json").exists():
        raise LMForgeError(f"{run} has no tokenizer.json; delete it so that compare retrains it")
    if read_json(run / "tokenizer.json") != read_json(data.path / "tokenizer.json"):
        tok = load_tokenizer(run)
        raise LMForgeError(f"{run} was trained with another tokenizer ({tok.kind}, vocab {tok.vocab_size}) than "
                           f"{data.path} ({data.meta['tokenizer']['kind']}, vocab {data.vocab_size}); delete the "
                           "run or choose another --out")
    trained = _trained_budget(run, spec, n_train)
    if spec.family == "ngram":
        want = Budget("tokens", _ngram_tokens(budget, n_train))
        same = trained == want
        wanted = f"{want.amount:,} counted tokens"
        had = f"{trained.amount:,} counted tokens" if isinstance(trained, Budget) else trained
    else:
        same = isinstance(trained, Budget) and trained.kind == budget.kind and \
            math.isclose(trained.amount, budget.amount, rel_tol=1e-9)
        wanted = budget.words()
        had = trained.words() if isinstance(trained, Budget) else trained
    if not same:
        raise LMForgeError(f"{run} was trained under another budget ({had}) than this comparison's ({wanted}); "
                           "delete the run so that compare retrains it, or choose another --out")


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


def _train(spec: ModelSpec, data: str, run: str, budget: Budget, progress: bool,
           device: str = "auto") -> dict[str, Any]:
    if spec.family == "ngram":

        t0 = time.perf_counter()
        # small vocabularies (characters) often give counts-of-counts without valid discounts at low
        # orders: fall back there as KenLM's --discount_fallback does
        info = train_ngram(data, run, order=int(spec.arg), smoothing="modified-kneser-ney", discount_fallback=True,
                           max_tokens=int(budget.amount) if budget.kind == "tokens" else None)
        secs = time.perf_counter() - t0
        toks = info["train_tokens"]
        return {"train_seconds": secs, "tokens_seen": toks, "tokens_per_s": toks / max(secs, 1e-9)}

    recipe = dict(NEURAL_RECIPES.get(spec.family, NEURAL_RECIPES["lstm"]))
    limit = {"max_tokens": int(budget.amount)} if budget.kind == "tokens" else {"max_time": budget.amount}
    cfg = TrainConfig(data=data, out=run, model=spec.family, preset=spec.arg, eval_interval=100, eval_iters=10,
                      progress=progress, device=device, **limit, **recipe)
    r = train(cfg)
    return {"train_seconds": r.train_time, "tokens_seen": r.tokens_seen, "tokens_per_s": r.tokens_per_second}


COLUMNS = [("model", "model", "{}"), ("budget", "budget", "{}"), ("parameters", "params", "{:,}"),
           ("train_seconds", "train s", "{:.0f}"), ("tokens_seen", "tokens seen", "{:,}"),
           ("test_loss", "loss/token", "{:.4f}"), ("test_perplexity", "ppl/token", "{:.3f}"),
           ("bits_per_byte", "bits/byte", "{:.4f}"), ("train_tokens_per_s", "train tok/s", "{:,.0f}"),
           ("gen_tokens_per_s", "gen tok/s", "{:,.1f}")]


def format_table(rows: list[dict[str, Any]], budget: Budget | None = None) -> str:
    """The table; with ``budget``, headed by the budget in words and followed by how n-grams spend it."""
    cells = [[h for _, h, _ in COLUMNS]] + [[f.format(r[k]) for k, _, f in COLUMNS] for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(COLUMNS))]
    lines = [f"budget: {budget.words()}"] if budget is not None else []
    for j, c in enumerate(cells):
        lines.append("  ".join(x.ljust(w) if i <= 1 else x.rjust(w) for i, (x, w) in enumerate(zip(c, widths))))
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    if budget is not None and any(r["family"] == "ngram" for r in rows):
        lines.append("n-grams count each training token once (tokens seen): "
                     + ("the first N tokens of the budget (the whole train split when shorter), as more "
                        "passes would add nothing to the counts"
                        if budget.kind == "tokens" else "the whole train split; the time budget does not bind"))
    return "\n".join(lines)


def write_reports(rows: list[dict[str, Any]], out_dir: Path, data_name: str, budget: Budget) -> None:
    table = format_table(rows, budget)
    print("\n" + table)
    atomic_write_text(out_dir / "table.txt", table + "\n")
    atomic_write_json(out_dir / "compare.json", {
        "data": data_name, "budget": budget.to_json(),
        "budget_seconds": budget.amount if budget.kind == "time" else None,
        "budget_tokens": int(budget.amount) if budget.kind == "tokens" else None, "models": rows})

    def write_csv(tmp: str) -> None:
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow([k for k, _, _ in COLUMNS] + ["split"])
            for r in rows:
                w.writerow([r[k] for k, _, _ in COLUMNS] + [r["split"]])

    atomic_write(out_dir / "compare.csv", write_csv)
    from ..viz.plots import plot_comparison

    plot_comparison(rows, out_dir / "compare.png", title=f"{data_name}: {budget.words()}")
    print(f"\nwrote {out_dir}/table.txt, compare.json, compare.csv, compare.png")
