"""Greedy and batched beam search over the common model protocol.

Both start from a model *state* that already conditions the model (an encoded source for a
seq2seq model, a prefilled KV cache for a decoder-only one) and a first input token per row, and
only call ``model.forward_logits`` (one new token per row per step, reusing the KV cache) and
``model.state_select`` (to reorder cached rows when beams are re-ranked).

Beam search keeps the ``num_beams`` best partial hypotheses of every input by total
log-probability. A hypothesis that emits ``eos`` is moved to the finished list with the score
``sum log p / length ** length_penalty`` (length_penalty > 0 favours longer outputs, as in
Hugging Face's ``generate``). With ``early_stopping`` an input is done once it has ``num_beams``
finished hypotheses; otherwise once no running beam can still beat the worst finished one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ..models.base import LanguageModel


@dataclass
class Hypothesis:
    tokens: list[int]        # generated tokens, without the final eos
    score: float             # length-normalised log-probability
    logprob: float           # total log-probability (incl. eos when finished)


@torch.no_grad()
def greedy_search(model: LanguageModel, state: Any, start_ids: torch.Tensor, eos_id: int,
                  max_new_tokens: int) -> list[Hypothesis]:
    """Pick the most likely token at every step; ``start_ids`` (B,) is each row's first input."""
    B = start_ids.shape[0]
    nxt = start_ids
    out = torch.full((B, max_new_tokens), eos_id, dtype=torch.long, device=start_ids.device)
    logprob = torch.zeros(B, dtype=torch.float64)
    finished = torch.zeros(B, dtype=torch.bool, device=start_ids.device)
    lengths = torch.full((B,), max_new_tokens, dtype=torch.long)
    for t in range(max_new_tokens):
        logits, state = model.forward_logits(nxt[:, None], state)
        logp = F.log_softmax(logits[:, -1].float(), dim=-1)
        best, nxt = logp.max(dim=-1)
        nxt = torch.where(finished, torch.full_like(nxt, eos_id), nxt)
        logprob += torch.where(finished, torch.zeros_like(best), best).double().cpu()
        out[:, t] = nxt
        newly = (nxt == eos_id) & ~finished
        lengths[newly.cpu()] = t
        finished |= newly
        if bool(finished.all()):
            break
    # the score is normalised by the output length, eos included when it was reached (as in beam search)
    return [Hypothesis(out[b, :int(lengths[b])].tolist(), float(logprob[b]) / (int(lengths[b]) + int(finished[b])),
                       float(logprob[b])) for b in range(B)]


@torch.no_grad()
def beam_search(model: LanguageModel, state: Any, start_ids: torch.Tensor, eos_id: int, max_new_tokens: int,
                num_beams: int = 4, length_penalty: float = 1.0, early_stopping: bool = True,
                num_return_sequences: int = 1) -> list[list[Hypothesis]]:
    """Batched beam search; ``state`` holds B rows and is expanded to B * num_beams inside.

    Returns, per input, the ``num_return_sequences`` best hypotheses (an n-best list), best first.
    """
    B, K = start_ids.shape[0], num_beams
    if not 1 <= num_return_sequences <= K:
        raise ValueError(f"num_return_sequences must be between 1 and num_beams ({K})")
    device = start_ids.device
    state = model.state_select(state, torch.arange(B, device=device).repeat_interleave(K))
    # Only beam 0 of each input is live at the start (the K copies are identical).
    beam_scores = torch.zeros(B, K, dtype=torch.float32, device=device)
    beam_scores[:, 1:] = float("-inf")
    seqs = torch.zeros(B * K, 0, dtype=torch.long, device=device)
    nxt = start_ids.repeat_interleave(K)
    finished: list[list[Hypothesis]] = [[] for _ in range(B)]
    done = [False] * B

    def norm(logprob: float, length: int) -> float:
        return logprob / (max(length, 1) ** length_penalty)

    for t in range(max_new_tokens):
        logits, state = model.forward_logits(nxt[:, None], state)
        logp = F.log_softmax(logits[:, -1].float(), dim=-1)           # (B*K, V)
        V = logp.shape[-1]
        cand = (beam_scores.view(-1, 1) + logp).view(B, K * V)
        # 2K candidates: enough that K of them are not eos even if K end here.
        top_scores, top_idx = cand.topk(2 * K, dim=-1)
        top_beam, top_tok = top_idx // V, top_idx % V
        ts, tb, tt = top_scores.tolist(), top_beam.tolist(), top_tok.tolist()
        new_scores = torch.full((B, K), float("-inf"), device=device)
        new_src = torch.zeros(B, K, dtype=torch.long)
        new_tok = torch.full((B, K), eos_id, dtype=torch.long)
        for b in range(B):
            if done[b]:
                new_src[b] = b * K  # keep a dummy row (its score is -inf)
                continue
            filled = 0
            for r in range(2 * K):
                score, beam, tok = ts[b][r], tb[b][r], tt[b][r]
                if score == float("-inf"):
                    break
                row = b * K + beam
                if tok == eos_id:
                    if r < K:  # only hypotheses that rank among the top K may finish
                        finished[b].append(Hypothesis(seqs[row].tolist(),
                                                      norm(score, t + 1), score))
                    continue
                new_scores[b, filled], new_src[b, filled], new_tok[b, filled] = score, row, tok
                filled += 1
                if filled == K:
                    break
            # Is this input done?
            if len(finished[b]) >= K:
                if early_stopping:
                    done[b] = True
                else:
                    worst = sorted(h.score for h in finished[b])[-K]
                    best_running = float(new_scores[b, 0])
                    # the best a running beam could still reach (log-probs only fall as it grows)
                    bound = best_running / ((t + 1) ** length_penalty) if length_penalty > 0 else \
                        best_running / (max_new_tokens ** length_penalty)
                    done[b] = bound <= worst
            if filled == 0:
                done[b] = True
        if all(done):
            break
        flat_src = new_src.view(-1).to(device)
        seqs = torch.cat([seqs.index_select(0, flat_src), new_tok.view(-1, 1).to(device)], dim=1)
        state = model.state_select(state, flat_src)
        beam_scores = new_scores
        nxt = new_tok.view(-1).to(device)
    # Inputs still running at the length limit: their live beams count as hypotheses.
    seq_list = seqs.tolist()
    for b in range(B):
        if done[b] and len(finished[b]) >= num_return_sequences:
            continue
        for k in range(K):
            s = float(beam_scores[b, k])
            if s != float("-inf"):
                row = seq_list[b * K + k]
                finished[b].append(Hypothesis(row, norm(s, len(row)), s))
    return [sorted(h, key=lambda h: -h.score)[:num_return_sequences] for h in finished]
