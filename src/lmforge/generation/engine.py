"""Continuous batching: many generation requests decoded together, joining and leaving between steps.

One engine thread owns the model. Requests wait in a bounded queue; the engine keeps ``slots`` sequences
active, each in its own row of a :class:`~lmforge.models.layers.SlotKVCache` at its own length. Every step:

1. cancelled sequences (a client that went away) leave their slot;
2. waiting requests are prefilled into free slots (one forward over their prompts, right-padded, each into
   its slot's row only) and sample their first token;
3. ONE batched forward decodes one token for every active slot: the input is each row's last token, the
   positions and the causal mask are per row, so a slot 3 tokens into its answer and one 200 tokens in share
   the same matrix products;
4. finished sequences (end-of-text, a stop string, ``max_tokens``) free their slot at once.

Decoding a token for B rows reads the weights once instead of B times, which is why aggregate tokens/s grows
with the number of concurrent requests on a memory-bound CPU. In fp32, greedy outputs are those of decoding
each request alone (the tests check it token for token).

Families without a KV cache (n-grams, RNNs) and encoder-decoders are served one request at a time through the
same thread (:meth:`Engine._run_alone`), with the same sampling and the same events.

Results come back through a ``sink`` callback, called on the engine thread with :class:`TokenEvent` and
finally one :class:`Finished`; a server hands them to its event loop, a batch job to a queue.
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from ..errors import LMForgeError
from ..models.base import LanguageModel
from . import GenerationConfig, choose, process_logits
from .seq2seq import translate
from .streaming import TextStream


class QueueFull(LMForgeError):
    """The engine's waiting queue is full (HTTP 429)."""


class PromptTooLong(LMForgeError):
    """The prompt does not fit the context (HTTP 400)."""


@dataclass
class SamplingParams:
    """How one sequence is decoded (OpenAI's request fields, plus ``top_k``, ``repetition_penalty``, ``beam``)."""

    max_tokens: int | None = None     # None: up to the context (or 256 for models without one)
    temperature: float = 1.0          # 0 = greedy
    top_p: float | None = None
    top_k: int | None = None
    repetition_penalty: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    logprobs: bool = False            # report each chosen token's log-probability
    top_logprobs: int = 0             # ... and the k most likely tokens at each step
    ignore_eos: bool = False
    beam: int = 1                     # seq2seq: beam size

    def generation_config(self) -> GenerationConfig:
        cfg = GenerationConfig(max_new_tokens=self.max_tokens or 0, temperature=self.temperature,
                               top_k=self.top_k, top_p=self.top_p, repetition_penalty=self.repetition_penalty,
                               stop=list(self.stop), seed=self.seed, ignore_eos=self.ignore_eos)
        cfg.validate()
        return cfg


@dataclass
class TokenEvent:
    token_id: int
    text: str                                  # newly visible text ('' while held back)
    logprob: float | None = None               # ln p(token | context) under the model (before sampling knobs)
    top_logprobs: list[tuple[int, float]] = field(default_factory=list)


@dataclass
class Finished:
    reason: str                                # stop | length | cancelled | error
    text: str                                  # the whole completion (equals the concatenated TokenEvent texts)
    prompt_tokens: int
    completion_tokens: int
    error: str | None = None


Sink = Callable[[Any], None]
NO_CONTEXT_DEFAULT_TOKENS = 256  # max_tokens when neither the request nor the model's context bounds it
PREFILL_TOKENS = 2048  # most (padded) prompt tokens prefilled in one forward; a longer prompt goes alone


class Sequence:
    """One request inside the engine. ``cancel()`` may be called from any thread; the slot is freed at the
    start of the next step."""

    def __init__(self, prompt_ids: list[int], params: SamplingParams, sink: Sink, max_new: int,
                 stream: TextStream, text_prompt: str | None = None) -> None:
        self.prompt_ids, self.params, self.sink, self.max_new = prompt_ids, params, sink, max_new
        self.stream = stream
        self.text_prompt = text_prompt  # seq2seq: the source text
        self.cfg = params.generation_config()
        self.generator = torch.Generator().manual_seed(params.seed) if params.seed is not None else None
        self.generated: list[int] = []
        self.cancelled = False
        self.done = False
        self.slot = -1
        self.submitted = time.perf_counter()
        self.last_token_at = 0.0

    def cancel(self) -> None:
        self.cancelled = True


class EngineObserver:
    """Hooks for metrics (the server implements them with Prometheus); the defaults do nothing."""

    def first_token(self, seconds: float) -> None: ...
    def next_token(self, seconds: float) -> None: ...
    def finished(self, seq: Sequence, reason: str) -> None: ...


class Engine:
    """The continuous-batching decoding engine. ``start()`` runs it on its own thread; ``submit`` queues work.

    ``slots``: sequences decoded together; ``max_queue``: requests allowed to wait (more raise
    :class:`QueueFull`); ``ctx``: the context length per sequence (default and at most the model's).
    """

    def __init__(self, model: LanguageModel, slots: int = 4, max_queue: int = 64, ctx: int | None = None,
                 observer: EngineObserver | None = None) -> None:
        if model.tokenizer is None:
            raise LMForgeError("this model has no tokenizer; serve a run directory that has tokenizer.json")
        if slots < 1 or max_queue < 0:
            raise LMForgeError("--parallel must be >= 1 and --max-queue >= 0")
        self.model, self.tokenizer = model, model.tokenizer
        self.observer = observer or EngineObserver()
        self.is_seq2seq = model.is_seq2seq
        self.batched = model.batches_slots  # the families with a slot KV cache (GPT)
        model_ctx = model.context_length if not self.is_seq2seq else None
        if ctx is not None and ctx < 2:
            raise LMForgeError("--ctx must be at least 2 tokens")
        self.ctx = min(ctx, model_ctx) if (ctx and model_ctx) else (ctx or model_ctx)
        self.slots = slots if self.batched else 1
        self.max_queue = max_queue
        if isinstance(model, torch.nn.Module):
            model.eval()
        self.device = next(model.parameters()).device if isinstance(model, torch.nn.Module) else torch.device("cpu")
        self.cache = model.init_slots(self.slots, self.ctx or 0) if self.batched else None
        self._waiting: collections.deque[Sequence] = collections.deque()
        self._active: list[Sequence | None] = [None] * self.slots
        self._cv = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.steps = 0

    # --- the public side (any thread) ----------------------------------------------------------
    def start(self) -> Engine:
        if self._thread is None:
            self._stopping = False
            self._thread = threading.Thread(target=self._loop, name="lmforge-engine", daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    @property
    def queue_depth(self) -> int:
        return len(self._waiting)

    @property
    def busy_slots(self) -> int:
        return sum(s is not None for s in self._active)

    def check_prompt(self, prompt_ids: list[int]) -> None:
        """Raise :class:`PromptTooLong` when the prompt leaves no room for one generated token."""
        if self.ctx and not self.is_seq2seq and len(prompt_ids) > self.ctx - 1:
            excess = len(prompt_ids) - (self.ctx - 1)
            raise PromptTooLong(f"the prompt has {len(prompt_ids)} tokens, {excess} more than this model's context "
                                f"of {self.ctx} allows ({self.ctx - 1} prompt tokens plus one to generate); "
                                f"shorten it by {excess} tokens")

    def submit(self, prompt_ids: list[int], params: SamplingParams, sink: Sink, text_prompt: str | None = None,
               block: bool = False) -> Sequence:
        """Queue one sequence; its events go to ``sink`` (on the engine thread). With ``block`` wait for room
        in the queue instead of raising :class:`QueueFull`."""
        prompt = list(prompt_ids) or [self.tokenizer.eot_id]  # an empty prompt starts a document
        self.check_prompt(prompt)
        room = (self.ctx - len(prompt)) if (self.ctx and not self.is_seq2seq) else None
        want = params.max_tokens if params.max_tokens is not None else (room or NO_CONTEXT_DEFAULT_TOKENS)
        max_new = min(want, room) if room is not None else want
        stream = TextStream(self.tokenizer, prompt if prompt_ids else (), params.stop,
                            end_ids=() if params.ignore_eos else None)
        seq = Sequence(prompt, params, sink, max_new, stream, text_prompt)
        with self._cv:
            while len(self._waiting) >= self.max_queue and self.busy_slots + len(self._waiting) >= self.slots:
                if not block:
                    raise QueueFull(f"the queue is full ({self.max_queue} requests waiting, {self.slots} decoding); "
                                    "retry later")
                self._cv.wait(0.1)
            self._waiting.append(seq)
            self._cv.notify_all()
        return seq

    # --- the engine thread ---------------------------------------------------------------------
    def _loop(self) -> None:
        torch.set_grad_enabled(False)
        while True:
            with self._cv:
                while not self._stopping and not self._waiting and not self.busy_slots:
                    self._cv.wait()
                if self._stopping:
                    break
            try:
                self._reap_cancelled()
                if self.batched:
                    self._admit()
                    if self.busy_slots:
                        self._step()
                else:
                    self._run_alone()
            except Exception as e:  # a bug must not kill the server: fail the sequences in flight, go on
                for seq in [s for s in self._active if s is not None]:
                    self._finish(seq, "error", error=f"{type(e).__name__}: {e}")
        for seq in [s for s in self._active if s is not None] + list(self._waiting):
            self._finish(seq, "cancelled")

    def _pop_waiting(self) -> Sequence | None:
        with self._cv:
            while self._waiting:
                seq = self._waiting.popleft()
                self._cv.notify_all()  # room in the queue for a blocked submitter
                if not seq.cancelled:
                    return seq
                self._finish(seq, "cancelled")
        return None

    def _reap_cancelled(self) -> None:
        for seq in self._active:
            if seq is not None and seq.cancelled:
                self._finish(seq, "cancelled")

    def _admit(self) -> None:
        """Prefill waiting requests into free slots (lowest first, so the active rows stay a short prefix), all
        in one forward: prompts right-padded to the longest (up to PREFILL_TOKENS padded tokens at once)."""
        assert self.cache is not None
        new: list[Sequence] = []
        for slot in range(self.slots):
            if self._active[slot] is not None:
                continue
            with self._cv:
                head = self._waiting[0] if self._waiting else None
            longest = max([len(s.prompt_ids) for s in new] + [len(head.prompt_ids) if head else 0])
            if head is None or (new and longest * (len(new) + 1) > PREFILL_TOKENS):
                break
            seq = self._pop_waiting()
            if seq is None:
                break
            seq.slot, self._active[slot] = slot, seq
            new.append(seq)
        if not new:
            return
        T = max(len(s.prompt_ids) for s in new)
        ids = torch.zeros(len(new), T, dtype=torch.long)
        for b, seq in enumerate(new):
            ids[b, :len(seq.prompt_ids)] = torch.tensor(seq.prompt_ids)
        rows = torch.tensor([s.slot for s in new])
        self.cache.lengths[rows] = 0
        self.cache.select(rows, torch.tensor([len(s.prompt_ids) for s in new]))
        try:
            logits, _ = self.model.forward_logits(ids.to(self.device), self.cache, last_only=True)
        except Exception as e:
            for seq in new:
                self._finish(seq, "error", error=f"{type(e).__name__}: {e}")
            return
        for b, seq in enumerate(new):
            self._accept(seq, logits[b, -1])

    def _step(self) -> None:
        """One token for every active slot, in one forward pass over the rows 0 .. highest active slot."""
        assert self.cache is not None
        n = max(i for i, s in enumerate(self._active) if s is not None) + 1
        inp = torch.zeros(n, 1, dtype=torch.long)
        for i in range(n):
            seq = self._active[i]
            if seq is not None:
                inp[i, 0] = seq.generated[-1]
        self.cache.select(slice(0, n))
        logits, _ = self.model.forward_logits(inp.to(self.device), self.cache)
        for i in range(n):  # free rows got a dummy token: rewind them so they never fill up
            if self._active[i] is None:
                self.cache.lengths[i] = 0
        self.steps += 1
        for i in range(n):
            seq = self._active[i]
            if seq is not None:
                self._accept(seq, logits[i, -1])

    def _run_alone(self) -> None:
        """Families without a slot cache: decode one sequence to the end (checking cancellation every token)."""
        seq = self._pop_waiting()
        if seq is None:
            return
        self._active[0] = seq
        if self.is_seq2seq:
            self._translate(seq)
            return
        model = self.model
        ids = torch.tensor([seq.prompt_ids], dtype=torch.long, device=self.device)
        total = len(seq.prompt_ids) + seq.max_new
        state = model.init_state(1, total)
        logits, state = model.forward_logits(ids, state, last_only=True)
        while not self._accept(seq, logits[0, -1]):
            if seq.cancelled:
                self._finish(seq, "cancelled")
                return
            nxt = torch.tensor([[seq.generated[-1]]], device=self.device)
            if state is not None:
                logits, state = model.forward_logits(nxt, state)
            else:  # no incremental state: re-feed the sequence
                full = torch.tensor([seq.prompt_ids + seq.generated], device=self.device)
                logits, _ = model.forward_logits(full, None, last_only=True)

    def _translate(self, seq: Sequence) -> None:
        """An encoder-decoder answers with its translation (or summary) of the prompt, in one event."""
        text = translate(self.model, [seq.text_prompt or ""], beam=max(1, seq.params.beam),
                         max_new_tokens=seq.params.max_tokens)[0]
        ids = self.tokenizer.encode(text)
        seq.generated = ids
        self.observer.first_token(time.perf_counter() - seq.submitted)
        seq.sink(TokenEvent(-1, text))  # the whole answer at once
        self._finish(seq, "stop", text=text)

    # --- sampling, events, bookkeeping -----------------------------------------------------------
    def _accept(self, seq: Sequence, logits: torch.Tensor) -> bool:
        """Sample the next token of ``seq`` from its (V,) logits, emit it; True when the sequence finished."""
        cfg, p = seq.cfg, seq.params
        row = logits[None].float()
        hist = torch.tensor([seq.prompt_ids + seq.generated], dtype=torch.long, device=row.device) \
            if cfg.repetition_penalty != 1.0 else None
        tok = int(choose(process_logits(row, hist, cfg), cfg, seq.generator)[0])  # type: ignore[arg-type]
        logprob, top = None, []
        if p.logprobs or p.top_logprobs:
            logp = F.log_softmax(row[0], dim=-1)
            logprob = float(logp[tok])
            if p.top_logprobs:
                vals, idx = logp.topk(min(p.top_logprobs, logp.numel()))
                top = list(zip(idx.tolist(), vals.tolist()))
        now = time.perf_counter()
        if not seq.generated:
            self.observer.first_token(now - seq.submitted)
        else:
            self.observer.next_token(now - seq.last_token_at)
        seq.last_token_at = now
        eos = self.tokenizer.eot_id if not p.ignore_eos else None
        if tok == eos:
            self._finish(seq, "stop")
            return True
        seq.generated.append(tok)
        text = seq.stream.push(tok)  # special tokens (and with ignore_eos the end token) show no text
        seq.sink(TokenEvent(tok, text, logprob, top))
        if seq.stream.stopped:
            self._finish(seq, "stop")
        elif len(seq.generated) >= seq.max_new:
            self._finish(seq, "length")
        return seq.done

    def _finish(self, seq: Sequence, reason: str, error: str | None = None, text: str | None = None) -> None:
        if seq.done:
            return
        seq.done = True
        if text is None:
            tail = seq.stream.finish() if reason in ("stop", "length") else ""
            if tail:
                seq.sink(TokenEvent(-1, tail))  # text held back until now (no token of its own)
            text = seq.stream.text
        if 0 <= seq.slot < self.slots and self._active[seq.slot] is seq:
            self._active[seq.slot] = None
        elif not self.batched and self._active[0] is seq:
            self._active[0] = None
        self.observer.finished(seq, reason)
        seq.sink(Finished(reason, text, len(seq.prompt_ids), len(seq.generated), error))


__all__ = ["Engine", "EngineObserver", "SamplingParams", "TokenEvent", "Finished", "QueueFull", "PromptTooLong",
           "Sequence"]
