"""Plots: loss curves (and, later, comparison charts and attention maps)."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: write PNG files, never open a window
import matplotlib.pyplot as plt  # noqa: E402


def read_metrics(path: str | Path) -> list[dict]:
    out = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def plot_loss_curve(metrics: str | Path, png: str | Path, title: str = "loss") -> Path:
    """Training and validation loss against steps (bottom axis) with wall-clock time noted."""
    recs = read_metrics(metrics)
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
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    png = Path(png)
    tmp = png.with_suffix(".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(png)
    return png
