"""Speculative decoding: a cheap draft proposes K tokens, the target model checks them in one forward pass.

Leviathan et al. 2023 ("Fast Inference from Transformers via Speculative Decoding") and Chen et al.
2023 ("Accelerating LLM Decoding with Speculative Sampling"). Each round:

1. the drafter proposes d_1..d_K, drawn from its distributions q_1..q_K (a point mass for a
   deterministic drafter such as prompt lookup);
2. the target reads [last token, d_1..d_K] in ONE forward pass (its KV cache holds everything before),
   giving its (processed: penalty, temperature, top-k, top-p) distributions p_1..p_{K+1};
3. d_j is accepted with probability min(1, p_j(d_j) / q_j(d_j)), left to right; at the first rejection
   the token is resampled from the residual norm(max(0, p_j - q_j)) and the round ends; if all K are
   accepted, one more token is drawn from p_{K+1}. The target's cache is rewound past the rejected drafts.

Every emitted token is then distributed exactly as the target alone would sample it (the theorem of
both papers; tests/test_speculative.py checks it with a chi-square test). With temperature 0 a draft is
accepted iff it equals the target's argmax, so the output is plain greedy decoding's, token for token.
Bit for bit, too: the prompt is read in one pass as plain decoding reads it, the matmul kernels compute
each row independently of the others, and a verify pass (at most ``models.layers.EXACT_CHUNK`` rows)
attends row by row with the one-token step's call -- a single fused masked attention call rounds
differently in the last bits of bf16, which flipped near-ties of SmolLM2 (docs/hub.md). A round costs
one target forward of K+1 tokens -- about the price of one token when decoding is bound by reading the
weights -- and yields between 1 and K+1 tokens.

Drafters:

* :class:`PromptLookup` (Saxena 2023, "prompt lookup decoding"): an n-gram index over the prompt and the
  output so far. The longest suffix of the sequence (n = 8 down to 1 tokens) that occurred before is
  found, and the tokens that followed its latest earlier occurrence are proposed -- as many as the match
  length (``growth`` x n: a long match is a copied span that usually goes on, a one-token match is a
  guess; every verify row costs ~10-25% of a step on SmolLM2's int8/int4 kernels, and growth 1
  measured 1.23-1.47x against 1.14-1.34x for growth 2, docs/hub.md), at most ``draft_tokens``. After a fully accepted
  round the next lookup finds the same span again, longer, and drafts on from where it stopped. Free to
  run, and very effective when the output copies the input (editing or summarising code or text given in
  the prompt).
* :class:`ModelDrafter`: any lmforge model sharing the target's tokenizer -- a small GPT, or an n-gram
  model trained on the user's corpus (``lmforge ngram``), sampled with the same processing.

Verify passes are cut to whole blocks of the target's matmul kernels (``models.quant.kernel_rows``:
PyTorch's int8/int4 CPU kernels multiply 4 rows at a time, so 4 rows cost ~1.2x one row and the 5th row
~1.6x: a draft of 5 tokens (6 rows) is cut to 3 (4 rows), one of 8 to 7; lmforge's int8 and int4 kernels take 8
rows at a time, 8 rows costing ~2-2.3x one). A round without a draft is a plain one-token step.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import LMForgeError
from ..models.quant import kernel_rows
from .logits import warp_logits


@dataclass
class SpecStats:
    rounds: int = 0
    drafted: int = 0
    accepted: int = 0
    emitted: int = 0  # by the verify passes (the first token comes from the prompt's pass)
    prefill_s: float = 0.0  # wall time of the prompt's forward
    draft_s: float = 0.0    # proposing drafts
    verify_s: float = 0.0   # the target's passes over [last token, drafts]
    other_s: float = 0.0    # acceptance, cache rewind, bookkeeping, callbacks

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def tokens_per_round(self) -> float:
        return self.emitted / self.rounds if self.rounds else 0.0

    def summary(self) -> str:
        return (f"speculative decoding: {self.accepted}/{self.drafted} drafted tokens accepted "
                f"({100 * self.acceptance_rate:.1f}%), {self.tokens_per_round:.2f} tokens per target pass")

    def timing(self) -> str:
        """Where the time went (wall seconds)."""
        return (f"prefill {self.prefill_s:.2f} s, verify passes {self.verify_s:.2f} s ({self.rounds}), drafting "
                f"{self.draft_s * 1000:.1f} ms, acceptance and bookkeeping {self.other_s * 1000:.1f} ms")


#: statistics of the most recent speculative generation in this process (the CLI prints them)
last_stats = SpecStats()


class Drafter:
    """Proposes draft tokens. ``propose`` returns the drafts and, unless the drafter is deterministic,
    their proposal distributions q (n, V) (probabilities, already processed like the target's)."""

    deterministic: bool = True

    def start(self, prompt: list[int], max_length: int) -> None:
        """A new sequence begins."""

    def propose(self, tokens: list[int], k: int, cfg: Any,
                generator: torch.Generator | None) -> tuple[list[int], torch.Tensor | None]:
        raise NotImplementedError

    def commit(self, n_accepted: int, n_drafted: int) -> None:
        """``n_accepted`` of the ``n_drafted`` last proposals were kept."""


class PromptLookup(Drafter):
    """Prompt-lookup decoding: find the longest suffix (``max_ngram`` down to ``min_ngram`` tokens) that occurred
    before and propose what followed its latest earlier occurrence, up to ``growth`` x the match length."""

    def __init__(self, max_ngram: int = 8, min_ngram: int = 1, growth: int = 1) -> None:
        if not 1 <= min_ngram <= max_ngram or growth < 1:
            raise LMForgeError("prompt lookup needs 1 <= min_ngram <= max_ngram and growth >= 1")
        self.max_ngram, self.min_ngram, self.growth = max_ngram, min_ngram, growth
        self.index: dict[tuple[int, ...], int] = {}
        self.indexed = 0

    def start(self, prompt: list[int], max_length: int) -> None:
        self.index, self.indexed = {}, 0

    def _extend(self, tokens: list[int]) -> None:
        # register each n-gram once the token after it exists: key -> end index of its latest occurrence
        for i in range(max(self.indexed, 1), len(tokens)):
            end = i - 1
            for n in range(self.min_ngram, self.max_ngram + 1):
                if end - n + 1 >= 0:
                    self.index[tuple(tokens[end - n + 1:end + 1])] = end
        self.indexed = len(tokens)

    def match(self, tokens: list[int]) -> tuple[int, int | None]:
        """(n, end): the longest suffix of ``tokens`` seen before, n tokens ending at index ``end`` (latest
        earlier occurrence); (0, None) when not even ``min_ngram`` tokens match."""
        self._extend(tokens)
        for n in range(min(self.max_ngram, len(tokens)), self.min_ngram - 1, -1):
            end = self.index.get(tuple(tokens[-n:]))
            if end is not None:
                return n, end
        return 0, None

    def propose(self, tokens: list[int], k: int, cfg: Any,
                generator: torch.Generator | None) -> tuple[list[int], torch.Tensor | None]:
        n, end = self.match(tokens)
        if end is None:
            return [], None
        return tokens[end + 1:end + 1 + min(k, self.growth * n)], None


class ModelDrafter(Drafter):
    """A draft language model with the target's tokenizer, sampled with the target's processing."""

    deterministic = False

    def __init__(self, model: Any) -> None:
        self.model = model
        self.state: Any = None
        self.fed = 0  # tokens consumed by ``state``

    def start(self, prompt: list[int], max_length: int) -> None:
        self.max_length = max_length
        self.state = self.model.init_state(1, max_length) if self.model.rewindable_state else None
        self.fed = 0

    def _logits(self, tokens: list[int], new: list[int]) -> torch.Tensor:
        m = self.model
        if m.rewindable_state:  # incremental: feed only what the cache has not seen
            logits, self.state = m.forward_logits(torch.tensor([new]), self.state, last_only=True)
        else:  # no rewindable state (n-gram, RNN): re-read the context
            ctx = m.context_length
            logits, _ = m.forward_logits(torch.tensor([tokens[-ctx:] if ctx else tokens]), None, last_only=True)
        return logits[0, -1]

    def propose(self, tokens: list[int], k: int, cfg: Any,
                generator: torch.Generator | None) -> tuple[list[int], torch.Tensor | None]:
        drafts: list[int] = []
        qs = []
        seq = list(tokens)
        new = tokens[self.fed:]
        for _ in range(k):
            z = self._logits(seq, new)
            seen = None
            if cfg.repetition_penalty != 1.0:
                seen = torch.zeros(1, z.shape[-1], dtype=torch.bool)
                seen[0, torch.tensor(seq)] = True
            w = warp_logits(z[None], seen, cfg.temperature, cfg.top_k, cfg.top_p, cfg.repetition_penalty)[0]
            if cfg.temperature == 0:
                d = int(w.argmax())
                q = torch.zeros_like(w)
                q[d] = 1.0
            else:
                q = torch.softmax(w, dim=-1)
                d = int(torch.multinomial(q, 1, generator=generator))
            drafts.append(d)
            qs.append(q)
            seq.append(d)
            new = [d]
        # the state has read tokens + drafts[:-1]
        self.fed = len(tokens) + k - 1
        self._n_tokens = len(tokens)
        return drafts, torch.stack(qs) if qs else None

    def commit(self, n_accepted: int, n_drafted: int) -> None:
        if n_drafted == 0:
            return
        keep = min(n_accepted, n_drafted - 1)  # drafts the state has read and that were kept
        if self.model.rewindable_state:
            self.state = self.model.state_rewind(self.state, (n_drafted - 1) - keep)
        self.fed = self._n_tokens + keep


def make_drafter(spec: Any, target: Any) -> Drafter:
    """``"prompt-lookup"``, a Drafter, or a LanguageModel (checked to share the target's tokenizer)."""
    if isinstance(spec, Drafter):
        return spec
    if spec == "prompt-lookup":
        return PromptLookup()
    if isinstance(spec, str):
        raise LMForgeError(f"unknown speculative draft {spec!r}; give prompt-lookup or a model")
    if spec.vocab_size > target.vocab_size:
        raise LMForgeError(f"the draft model's vocabulary ({spec.vocab_size}) is larger than the target's "
                           f"({target.vocab_size}); the draft must use the target's tokenizer")
    a, b = spec.tokenizer, target.tokenizer
    if a is not None and b is not None:
        probe = "The quick brown fox, 123 -- ROMEO: def f(x):\n\treturn x"
        if a.encode(probe) != b.encode(probe):
            raise LMForgeError("the draft model's tokenizer differs from the target's; train the draft on data "
                               "prepared with the same tokenizer")
    return ModelDrafter(spec)


def verify_rows(drafts: int, block: int) -> int:
    """How many of ``drafts`` tokens to verify so that the pass (drafts + 1 rows) fills whole kernel blocks."""
    rows = drafts + 1
    return drafts if rows <= block else rows // block * block - 1


def _probs(z: torch.Tensor, seqs: list[int], cfg: Any) -> torch.Tensor:
    """The target's processed next-token distribution (B=1) after ``seqs``."""
    seen = None
    if cfg.repetition_penalty != 1.0:
        seen = torch.zeros(1, z.shape[-1], dtype=torch.bool)
        seen[0, torch.tensor(seqs)] = True
    w = warp_logits(z[None], seen, cfg.temperature, cfg.top_k, cfg.top_p, cfg.repetition_penalty)[0]
    return w if cfg.temperature == 0 else torch.softmax(w, dim=-1)


def accept_drafts(p: torch.Tensor, drafts: list[int], q: torch.Tensor | None, greedy: bool,
                  generator: torch.Generator | None) -> tuple[int, int]:
    """The acceptance rule. ``p`` (n+1, V): the target's distributions (processed logits when greedy) at
    each draft position and one past; ``q`` (n, V): the proposal distributions (None: point masses).
    Returns (number of drafts accepted, the token emitted after them)."""
    if greedy:  # accepted while the draft is the target's argmax
        best = p.argmax(-1).tolist()
        j = 0
        while j < len(drafts) and drafts[j] == best[j]:
            j += 1
        return j, best[j]
    for j, d in enumerate(drafts):
        qd = 1.0 if q is None else float(q[j, d])
        pd = float(p[j, d])
        r = float(torch.rand(1, generator=generator))
        if r * qd < pd:  # accept with probability min(1, p/q)
            continue
        if q is None:
            resid = p[j].clone()
            resid[d] = 0.0
        else:
            resid = (p[j] - q[j]).clamp(min=0)
        if float(resid.sum()) <= 0:  # p == q: rejection had probability 0; numerically, fall back to p
            resid = p[j]
        return j, int(torch.multinomial(resid / resid.sum(), 1, generator=generator))
    return len(drafts), int(torch.multinomial(p[len(drafts)], 1, generator=generator))


@torch.no_grad()
def speculative_generate(model: Any, prompt: list[int], cfg: Any,
                         on_token: Callable[[torch.Tensor], bool | None] | None = None,
                         generator: torch.Generator | None = None) -> list[int]:
    """New tokens for one prompt, decoded speculatively with ``cfg.speculative`` as the draft."""
    global last_stats
    if not model.rewindable_state:
        raise LMForgeError(f"speculative decoding needs a target whose cache can be rewound (a Transformer); "
                           f"this is a {model.model_type} model")
    drafter = make_drafter(cfg.speculative, model)
    K = cfg.draft_tokens
    ctx = model.context_length
    total = len(prompt) + cfg.max_new_tokens + K + 1
    if ctx and total > ctx:
        raise LMForgeError(f"speculative decoding keeps the whole sequence in the context: prompt + "
                           f"--max-new-tokens + --draft-tokens ({total}) exceeds the model's {ctx}")
    eos = cfg.eos_token_id
    if eos is None and not cfg.ignore_eos and model.tokenizer is not None:
        eos = model.tokenizer.eot_id
    if cfg.ignore_eos:
        eos = None
    stats = SpecStats()
    block = kernel_rows(model.decode_dtype)
    greedy = cfg.temperature == 0
    plain_argmax = greedy and cfg.repetition_penalty == 1.0  # the logits are the processed scores
    tokens = list(prompt)
    out: list[int] = []

    def emit(new: list[int]) -> bool:
        """Commit tokens as plain decoding would; True: stop (end of text, the callback, the budget)."""
        for tok in new:
            if eos is not None and tok == eos:
                return True
            tokens.append(tok)
            out.append(tok)
            if on_token is not None and on_token(torch.tensor([out])):
                return True
            if len(out) >= cfg.max_new_tokens:
                return True
        return False

    # the prompt in one pass, as plain decoding reads it (the same rows give the same cache, bit for bit),
    # and the first token from its last position; from then on the target's cache holds every committed
    # token but the last, which each round feeds together with the drafts
    t0 = time.perf_counter()
    state = model.init_state(1, total)
    logits, state = model.forward_logits(torch.tensor([prompt]), state, last_only=True)
    p0 = _probs(logits[0, -1].float(), tokens, cfg)
    first = int(p0.argmax()) if greedy else int(torch.multinomial(p0, 1, generator=generator))
    stats.prefill_s = time.perf_counter() - t0
    drafter.start(prompt, total)
    stop = emit([first])
    while not stop:
        t0 = time.perf_counter()
        k = verify_rows(min(K, cfg.max_new_tokens - len(out) - 1), block)
        drafts, q = drafter.propose(tokens, k, cfg, generator) if k > 0 else ([], None)
        drafts = drafts[:verify_rows(min(k, len(drafts)), block)]
        if q is not None:
            q = q[:len(drafts)]
        t1 = time.perf_counter()
        logits, state = model.forward_logits(torch.tensor([[tokens[-1]] + drafts]), state)
        t2 = time.perf_counter()
        z = logits[0].float()
        p = z if plain_argmax else torch.stack([_probs(z[j], tokens + drafts[:j], cfg)
                                                 for j in range(len(drafts) + 1)])
        n_acc, extra = accept_drafts(p, drafts, q, greedy, generator)
        model.state_rewind(state, len(drafts) - n_acc)
        drafter.commit(n_acc, len(drafts))
        stats.rounds += 1
        stats.drafted += len(drafts)
        stats.accepted += n_acc
        before = len(out)
        stop = emit(drafts[:n_acc] + [extra])
        stats.emitted += len(out) - before
        stats.draft_s += t1 - t0
        stats.verify_s += t2 - t1
        stats.other_s += time.perf_counter() - t2
    last_stats = stats
    return out
