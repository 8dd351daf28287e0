"""Plots: loss curves and the comparison chart (PNG, written atomically)."""

from __future__ import annotations

from pathlib import Path

import matplotlib
import matplotlib.ticker

from ..utils import read_jsonl

matplotlib.use("Agg")  # headless: write PNG files, never open a window
import matplotlib.pyplot as plt  # noqa: E402


def _save(fig: plt.Figure, png: str | Path) -> Path:
    """Write the figure atomically (a half-written PNG never replaces a good one)."""
    fig.tight_layout()
    png = Path(png)
    tmp = png.with_suffix(".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(png)
    return png





def plot_loss_curve(metrics: str | Path, png: str | Path, title: str = "loss") -> Path:
    """Training and validation loss against steps (bottom axis) with wall-clock time noted."""
    recs = read_jsonl(metrics)
    tr = [(r["step"], r["loss"]) for r in recs if "loss" in r]
    va = [(r["step"], r["val_loss"]) for r in recs if "val_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    if tr:
        ax.plot(*zip(*tr), label="train", lw=1.0, alpha=0.8)
    if va:
        ax.plot(*zip(*va), "o-", label="val", lw=1.6, ms=3)
        best = min(v for _, v in va)
        ax.axhline(best, color="gray", ls=":", lw=0.8)
        ax.text(0.99, 0.97, f"best val {best:.4f}", transform=ax.transAxes, ha="right", va="top", fontsize=9)
    if va and tr:  # zoom on the interesting part: the first steps' loss would flatten everything else
        ax.set_ylim(min(min(v for _, v in tr), min(v for _, v in va)) * 0.95, max(v for _, v in va) * 1.3)
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, png)


def plot_comparison(rows: list[dict], png: str | Path, title: str = "") -> Path:
    """Left: bits per byte by model (lower is better). Middle and right, on one y axis: validation loss of
    every neural model against wall-clock training time and against training tokens seen, with each
    n-gram's loss on the scored split as a labelled horizontal reference line."""
    fig = plt.figure(figsize=(16, 4.6), dpi=110)
    grid = fig.add_gridspec(1, 3, width_ratios=[1, 1.25, 1.25])
    a = fig.add_subplot(grid[0])
    by_time = fig.add_subplot(grid[1])
    by_tokens = fig.add_subplot(grid[2], sharey=by_time)
    names = [r["model"] for r in rows]
    vals = [r["bits_per_byte"] for r in rows]
    colors = {"ngram": "#8c8c8c", "lstm": "#4c72b0", "gru": "#55a868", "rnn": "#c44e52", "gpt": "#dd8452"}
    bars = a.bar(names, vals, color=[colors.get(r["family"], "#777") for r in rows])
    for bar, v in zip(bars, vals):
        a.text(bar.get_x() + bar.get_width() / 2, v, f"{v:.3f}", ha="center", va="bottom", fontsize=8)
    split = rows[0]["split"] if rows else "test"
    a.set_ylabel(f"bits per byte ({split})")
    a.set_title("compression (lower is better)", fontsize=10)
    a.tick_params(axis="x", rotation=30)
    ngrams = [r for r in rows if r["family"] == "ngram"]
    styles = ["--", ":", "-.", (0, (5, 1, 1, 1))]
    for ax, key, xlabel in ((by_time, "val_curve", "training time (s)"),
                            (by_tokens, "val_curve_tokens", "training tokens seen")):
        for r in rows:
            curve = r.get(key) or []
            if r["family"] != "ngram" and curve:
                ax.plot(*zip(*curve), "o-", ms=2, label=r["model"], color=colors.get(r["family"]))
        for i, r in enumerate(ngrams):  # counted, not trained: a level, not a curve
            ax.axhline(r["test_loss"], color="#555", ls=styles[i % len(styles)], lw=1.0,
                       label=f"{r['model']} ({r['split']} loss)")
            ax.text(0.99, r["test_loss"], f"{r['model']} {r['test_loss']:.3f}", transform=ax.get_yaxis_transform(),
                    ha="right", va="bottom", fontsize=7, color="#333")
        ax.set_xlabel(xlabel)
        ax.set_xlim(left=0)  # both panels from the start of training
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8, loc="best")
    by_tokens.xaxis.set_major_formatter(matplotlib.ticker.EngFormatter(sep=""))
    by_time.set_ylabel("validation loss (nats/token)")
    by_time.set_title("validation loss over wall-clock time", fontsize=10)
    by_tokens.set_title("validation loss over training tokens (same y axis)", fontsize=10)
    by_tokens.tick_params(labelleft=True)
    fig.suptitle(title, fontsize=11)
    return _save(fig, png)
