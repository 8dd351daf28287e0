"""Draws docs/img/architecture.png: lmforge's rooms by level, dependencies pointing down.
Run: .venv/bin/python docs/img/make_architecture.py"""

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import FancyBboxPatch  # noqa: E402

LEVELS = [  # top to bottom: (rooms, what they own)
    [("cli", "argparse, dispatch")],
    [("apps", "demo, compare, chat,\nn-gram tools")],
    [("train", "Trainer, TrainConfig,\ncheckpoints"), ("evaluate", "loss, ppl, bpb;\nBLEU/chrF"),
     ("generation", "sampling, beam,\nseq2seq decoding"), ("hub", "HF, GGUF, ARPA,\nload_model"),
     ("serve", "OpenAI server,\nbatch jobs")],
    [("models", "LanguageModel protocol;\nGPT, RNN, n-gram, seq2seq")],
    [("tokenizers", "char, BPE, word,\nchat templates"), ("data", "corpora, prepare,\nsamplers")],
    [("utils", "atomic writes,\ndurations"), ("options", "option(), validation,\nflags from fields"),
     ("viz", "PNG plots"), ("kernels", "C++ decoding kernels\n(built on first use)")],
]
W, H, GAP_Y = 2.5, 0.9, 1.5
fig, ax = plt.subplots(figsize=(13.5, 9.5))
centers = {}
for row, rooms in enumerate(LEVELS):
    y = -row * GAP_Y
    x0 = -(len(rooms) * (W + 0.35) - 0.35) / 2
    for i, (name, what) in enumerate(rooms):
        x = x0 + i * (W + 0.35)
        ax.add_patch(FancyBboxPatch((x, y), W, H, boxstyle="round,pad=0.04", linewidth=1.5, edgecolor="#1f4e79",
                                    facecolor="#dbe9f6"))
        ax.text(x + W / 2, y + H * 0.7, name, ha="center", va="center", fontsize=12, fontweight="bold")
        ax.text(x + W / 2, y + H * 0.3, what, ha="center", va="center", fontsize=8.5)
        centers[name] = (x + W / 2, y)
    if row < len(LEVELS) - 1:  # one arrow per level: everything above may use everything below
        ax.annotate("", xy=(7.9, y - GAP_Y + H), xytext=(7.9, y), arrowprops=dict(arrowstyle="->", lw=1.5))
ax.text(4.3, -3.8 * GAP_Y, "imports point down only\n(tests/test_layers.py);\nerrors.py: every room",
        fontsize=10, va="center")
ax.set_xlim(-7.2, 8.6)
ax.set_ylim(-len(LEVELS) * GAP_Y + 0.3, H + 0.5)
ax.axis("off")
ax.set_title("lmforge: rooms and the direction of dependencies", fontsize=14)
out = Path(__file__).with_name("architecture.png")
fig.savefig(out, dpi=110, bbox_inches="tight")
print(out)
