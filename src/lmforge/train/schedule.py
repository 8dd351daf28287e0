"""Learning-rate schedules: linear warmup, then cosine decay or constant-then-linear cooldown.

Progress is a number in [0, 1]: the share of the step budget, of the time budget when training is
limited by wall-clock time, or of the token budget when it is limited by tokens seen (the largest
share when several are given), so the decay always ends when the budget does.
"""

from __future__ import annotations

import math


def learning_rate(step: int, progress: float, lr: float, min_lr: float, warmup_steps: int,
                  schedule: str, cooldown_frac: float = 0.2) -> float:
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    p = min(max(progress, 0.0), 1.0)
    if schedule == "cosine":
        return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * p))
    if schedule == "linear":
        if p < 1 - cooldown_frac:
            return lr
        q = (p - (1 - cooldown_frac)) / max(cooldown_frac, 1e-9)
        return lr + (min_lr - lr) * q
    return lr
