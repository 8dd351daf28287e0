"""Plots: loss curves and the comparison chart (PNG, written atomically)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

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
    """Left: bits per byte by model (lower is better). Right: validation loss over wall-clock time."""
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.2), dpi=110, gridspec_kw={"width_ratios": [1, 1.3]})
    names = [r["model"] for r in rows]
    vals = [r["bits_per_byte"] for r in rows]
    colors = {"ngram": "#8c8c8c", "lstm": "#4c72b0", "gru": "#55a868", "rnn": "#c44e52", "gpt": "#dd8452"}
    bars = a.bar(names, vals, color=[colors.get(r["family"], "#777") for r in rows])
    for bar, v in zip(bars, vals):
        a.text(bar.get_x() + bar.get_width() / 2, v, f"{v:.3f}", ha="center", va="bottom", fontsize=8)
    a.set_ylabel("bits per byte (test)")
    a.set_title("compression (lower is better)", fontsize=10)
    a.tick_params(axis="x", rotation=30)
    for r in rows:
        curve = r.get("val_curve") or []
        if curve:
            b.plot(*zip(*curve), "o-", ms=2, label=r["model"], color=colors.get(r["family"]))
    b.set_xlabel("training time (s)")
    b.set_ylabel("validation loss (nats/token)")
    b.set_title("validation curves", fontsize=10)
    b.grid(alpha=0.3)
    if any(r.get("val_curve") for r in rows):
        b.legend(fontsize=8)
    fig.suptitle(title, fontsize=11)
    return _save(fig, png)
