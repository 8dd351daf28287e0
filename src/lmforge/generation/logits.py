"""Logits processing and token choice, shared by plain, compiled and speculative decoding.

Every shape here is fixed by (B, V), so the same code runs eagerly and inside a compiled decode step:

* repetition penalty (CTRL / Hugging Face): logits of tokens already present (``seen``, a (B, V) mask)
  are divided by r if positive, multiplied by r if negative;
* temperature T: logits / T;  top-k (Fan et al. 2018): keep the k largest;
* top-p (nucleus, Holtzman et al. 2019): keep the smallest set whose probability mass reaches p;
* sampling by an exponential race: with E_i ~ Exp(1) drawn independently, argmax_i p_i / E_i = i with
  probability p_i, so a sample is one argmax over pre-drawn noise (no data-dependent shapes).
"""

from __future__ import annotations

import torch


def warp_logits(logits: torch.Tensor, seen: torch.Tensor | None, temperature: float, top_k: int | None,
                top_p: float | None, repetition_penalty: float) -> torch.Tensor:
    """(B, V) logits -> processed fp32 logits (greedy: penalty only; the argmax is the greedy token)."""
    logits = logits.float()
    if repetition_penalty != 1.0 and seen is not None:
        pen = torch.where(logits > 0, logits / repetition_penalty, logits * repetition_penalty)
        logits = torch.where(seen, pen, logits)
    if temperature == 0:
        return logits
    logits = logits / temperature
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = torch.softmax(sorted_logits, dim=-1)
        # drop a token when the mass strictly before it already reaches p (the top token always stays)
        drop = (probs.cumsum(-1) - probs) >= top_p
        kept = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(1, order, kept)
    return logits


def race(probs: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Sample from each row of ``probs`` (B, V) given Exp(1) noise of the same shape."""
    return (probs / noise).argmax(-1)


def exp_noise(shape: tuple[int, ...], generator: torch.Generator | None,
              device: torch.device | str = "cpu") -> torch.Tensor:
    return torch.empty(shape, device=device).exponential_(generator=generator)


def pick_tokens(logits: torch.Tensor, seen: torch.Tensor | None, noise: torch.Tensor | None,
                temperature: float, top_k: int | None, top_p: float | None,
                repetition_penalty: float) -> torch.Tensor:
    """Next tokens (B,) from (B, V) logits: argmax when ``temperature`` is 0, else a sample (``noise``)."""
    logits = warp_logits(logits, seen, temperature, top_k, top_p, repetition_penalty)
    if temperature == 0:
        return logits.argmax(-1)
    assert noise is not None
    return race(torch.softmax(logits, dim=-1), noise)
