"""LSTM training throughput: the fused ``nn.LSTM`` (lmforge's hot path) vs the hand-written cell.

    python bench/lstm_throughput.py [--seconds 10] [--preset small]

Both run the same model shape (lmforge's ``small`` LSTM preset by default) on Tiny Shakespeare at
character level, batch 32, with truncated BPTT over the preset's window; the reference replaces the
fused kernel by :class:`lmforge.models.rnn.LSTMCellRef` (the LSTM equations, one step at a time).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
import torch.nn as nn
from paths import shared_data  # bench/paths.py (the scripts run from bench/)

from lmforge.data import PrepareConfig, prepare
from lmforge.models.rnn import PRESETS, LSTMCellRef
from lmforge.train import TrainConfig, Trainer
from lmforge.utils import machine_summary

TINY = shared_data("tinyshakespeare.txt")


class StackedRef(nn.Module):
    """A drop-in for nn.LSTM(batch_first=True) built from hand-written cells."""

    def __init__(self, lstm: nn.LSTM) -> None:
        super().__init__()
        self.cells = nn.ModuleList(LSTMCellRef(lstm.input_size if i == 0 else lstm.hidden_size, lstm.hidden_size)
                                   for i in range(lstm.num_layers))

    def forward(self, x: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor]):
        h, c = state
        hs, cs = [], []
        for i, cell in enumerate(self.cells):
            x, (hi, ci) = cell(x, (h[i], c[i]))
            hs.append(hi)
            cs.append(ci)
        return x, (torch.stack(hs), torch.stack(cs))


def measure(tr: Trainer, seconds: float) -> float:
    for _ in range(2):
        tr.train_step()
    k, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds or k < 3:
        tr.train_step()
        k += 1
    dt = (time.perf_counter() - t0) / k
    return tr.cfg.batch_size * tr.block_size / dt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--preset", default="small", choices=list(PRESETS))
    ap.add_argument("--out", default="bench/out/lstm_throughput.json")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp())
    prepare(PrepareConfig(corpus=str(TINY), out=str(tmp / "d"), split="contiguous", val_frac=0.1, test_frac=0),
            progress=False)
    rows = {}
    for label in ("nn.LSTM (fused)", "LSTMCellRef (hand-written)"):
        cfg = TrainConfig(data=str(tmp / "d"), out=str(tmp / label[:7].replace(" ", "").replace(".", "")),
                          model="lstm", preset=args.preset, batch_size=32, max_steps=10 ** 9, progress=False)
        tr = Trainer(cfg)
        if "hand" in label:
            tr.model.rnn = StackedRef(tr.model.rnn)
            tr.optimizer = torch.optim.AdamW(tr.model.parameters(), lr=1e-3)
        rows[label] = measure(tr, args.seconds)
    base = rows["LSTMCellRef (hand-written)"]
    print(machine_summary())
    print(f"LSTM preset {args.preset} ({PRESETS[args.preset]}), batch 32, {torch.get_num_threads()} threads")
    for label, tps in rows.items():
        print(f"  {label:28s} {tps:10,.0f} tokens/s  {tps / base:5.2f}x")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
