"""Decoding written once for every model family (through the LanguageModel protocol).

At each step the model gives next-token logits z; decoding turns them into a token:

* greedy:          argmax z                    (``temperature=0``)
* temperature:     sample from softmax(z / T)
* top-k:           keep the k largest logits   (Fan et al. 2018)
* top-p (nucleus): keep the smallest set whose probability mass reaches p (Holtzman et al. 2019)
* repetition penalty: logits of tokens already present are divided by r (if positive) or
  multiplied by r (if negative), as in CTRL and Hugging Face.

With ``use_cache`` the model's state (a Transformer's KV cache) is carried, so each step feeds one
token; without it the whole (context-cropped) sequence is re-fed, and the two agree exactly.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from typing import Any, Literal, TextIO

import torch

from ..errors import LMForgeError
from ..models.base import LanguageModel
from ..options import INT64_MAX, Options, label, option
from .fast import StaticDecoder, should_compile
from .logits import exp_noise, race, warp_logits
from .streaming import TextStream

# Below this a softmax of logits / T overflows to inf/nan in fp32; use 0 (greedy) for "no randomness".
MIN_TEMPERATURE = 1e-3


@dataclass
class GenerationConfig(Options):
    max_new_tokens: int = option(100, ge=0, le=1 << 24, help="tokens to generate at most")
    temperature: float = option(1.0, ge=0, le=100, help=f"sampling temperature: 0 = greedy, else at least "
                                f"{MIN_TEMPERATURE:g}")
    top_k: int | None = option(None, ge=1, le=1 << 24, help="sample among the k most likely tokens only",
                               default_text="all")
    top_p: float | None = option(None, gt=0, le=1, help="nucleus sampling: the smallest set of mass p",
                                 default_text="1 (all)")
    repetition_penalty: float = option(1.0, gt=0, le=100, help="divide the logits of tokens already present by r")
    stop: list[str] = option(default_factory=list, metavar="TEXT", help="stop at this string (repeatable)")
    eos_token_id: int | None = option(None, ge=0, cli=False, help="end token; default: the tokenizer's end-of-text")
    ignore_eos: bool = option(False, help="do not stop at the end-of-text token")
    seed: int | None = option(None, ge=0, le=INT64_MAX, help="random seed of the sampler", default_text="random")
    num_return_sequences: int = option(1, ge=1, le=4096, help="samples per prompt")
    use_cache: bool = option(True, flag="cache", help="carry the KV cache / state (--no-cache re-runs the whole "
                             "context at every step)")
    compile: Literal["auto", "on", "off"] = option(
        "auto", help="torch.compile the fixed-shape decode step (generation/fast.py): auto only for long "
        "generations (compiling takes minutes on a small CPU), on, or off")
    speculative: str | LanguageModel | None = option(
        None, metavar="prompt-lookup|RUN", help="speculative decoding, exact (generation/speculative.py): draft "
        "with prompt lookup (an n-gram over the prompt and the output so far) or with a smaller model RUN sharing "
        "the tokenizer (a GPT, or an n-gram trained on your corpus); the acceptance rate goes to stderr",
        default_text="off")
    draft_tokens: int = option(4, ge=1, le=64, help="tokens drafted per target forward pass (speculative "
                               "decoding)")

    def __post_init__(self) -> None:
        super().__post_init__()
        if 0 < self.temperature < MIN_TEMPERATURE:
            f = next(f for f in fields(self) if f.name == "temperature")
            raise LMForgeError(f"{label(f)} must be 0 (greedy) or >= {MIN_TEMPERATURE:g} (got {self.temperature:g})")
        if self.speculative is not None and self.num_return_sequences != 1:
            raise LMForgeError("speculative decoding decodes one sequence at a time; use --num-return-sequences 1")

    def validate(self) -> None:
        """Checked on construction; kept for callers that re-check a config they changed."""
        self.__post_init__()


def seen_mask(seqs: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """(B, V) mask of the tokens present in each row of ``seqs`` (for the repetition penalty)."""
    return torch.zeros(seqs.shape[0], vocab_size, dtype=torch.bool, device=seqs.device).scatter_(1, seqs, True)


def process_logits(logits: torch.Tensor, seqs: torch.Tensor, cfg: GenerationConfig) -> torch.Tensor:
    """Apply repetition penalty, temperature, top-k and top-p to (B, V) logits."""
    seen = seen_mask(seqs, logits.shape[-1]) if cfg.repetition_penalty != 1.0 else None
    return warp_logits(logits, seen, cfg.temperature, cfg.top_k, cfg.top_p, cfg.repetition_penalty)


def choose(logits: torch.Tensor, cfg: GenerationConfig, generator: torch.Generator | None) -> torch.Tensor:
    """The greedy token, or a sample of softmax(logits) (the exponential race of generation/logits.py,
    the same draw as a compiled decode step makes)."""
    if cfg.temperature == 0:
        return logits.argmax(-1)
    return race(torch.softmax(logits, dim=-1), exp_noise(tuple(logits.shape), generator, logits.device))


@torch.no_grad()
def generate_ids(model: LanguageModel, prompt_ids: list[int], cfg: GenerationConfig,
                 on_token: Callable[[torch.Tensor], bool | None] | None = None) -> list[list[int]]:
    """Generate ``cfg.num_return_sequences`` continuations of one prompt; returns the new ids only.

    ``on_token(ids_so_far)`` is called after each step with the (B, t) tensor of new tokens (used
    for streaming and stop strings); returning True stops generation.
    """
    cfg.validate()
    if isinstance(model, torch.nn.Module):
        model.eval()
    ctx = model.context_length
    prompt = list(prompt_ids)
    if not prompt:
        eot = model.tokenizer.eot_id if model.tokenizer is not None else None
        if eot is None:
            raise LMForgeError("empty prompt and the model has no end-of-text token to start from")
        prompt = [eot]
    if ctx and len(prompt) > ctx - 1:
        warnings.warn(f"prompt of {len(prompt)} tokens is longer than the context ({ctx}); keeping the last "
                      f"{ctx - 1}", stacklevel=2)
        prompt = prompt[-(ctx - 1):]
    B = cfg.num_return_sequences
    device = next(model.parameters()).device if isinstance(model, torch.nn.Module) else torch.device("cpu")
    seqs = torch.tensor([prompt] * B, dtype=torch.long, device=device)
    generator = torch.Generator(device=device).manual_seed(cfg.seed) if cfg.seed is not None else None
    eos = cfg.eos_token_id
    if eos is None and not cfg.ignore_eos and model.tokenizer is not None:
        eos = model.tokenizer.eot_id
    if cfg.ignore_eos:
        eos = None
    total = len(prompt) + cfg.max_new_tokens
    if cfg.speculative is not None and ctx and total + cfg.draft_tokens + 1 > ctx:
        warnings.warn(f"speculative decoding keeps the whole sequence in the context ({ctx} tokens); "
                      f"this generation needs {total + cfg.draft_tokens + 1}: decoding without it", stacklevel=2)
    elif cfg.speculative is not None and cfg.max_new_tokens > 0:
        from .speculative import speculative_generate

        out = speculative_generate(model, prompt, cfg, on_token, generator=generator)
        return [out]
    static = None
    if cfg.use_cache and not (ctx and total > ctx) and should_compile(model, B * cfg.max_new_tokens, cfg.compile):
        static = StaticDecoder(model, B, total, cfg, compile=True, generator=generator)
        nxt = static.prefill(seqs)
    else:
        state = model.init_state(B, min(total, ctx) if ctx else total) if cfg.use_cache else None
        logits, state = model.forward_logits(seqs, state, last_only=True)  # the prompt's last position only
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    lengths = torch.full((B,), cfg.max_new_tokens, dtype=torch.long)
    for t in range(cfg.max_new_tokens):
        if static is None:
            nxt = choose(process_logits(logits[:, -1, :], seqs, cfg), cfg, generator)
        seqs = torch.cat([seqs, nxt[:, None]], dim=1)
        if eos is not None:
            newly = (nxt == eos) & ~finished
            lengths[newly.cpu()] = t  # exclude the end-of-text token itself
            finished |= nxt == eos
        if on_token is not None and on_token(seqs[:, len(prompt):]):
            lengths = torch.minimum(lengths, torch.full_like(lengths, t + 1))
            break
        if bool(finished.all()) or t == cfg.max_new_tokens - 1:
            break
        if static is not None:  # a fixed-shape (compiled) step: forward, processing and choice in one
            nxt = static.step(nxt)
        elif state is not None and not (ctx and seqs.size(1) > ctx):
            logits, state = model.forward_logits(nxt[:, None], state)
        elif state is not None:  # the cache is full: rebuild it from the last `ctx` tokens
            state = model.init_state(B, ctx)
            logits, state = model.forward_logits(seqs[:, -ctx:], state)
        else:
            logits, _ = model.forward_logits(seqs[:, -ctx:] if ctx else seqs, None)
    new = seqs[:, len(prompt):].tolist()
    return [row[: int(n)] for row, n in zip(new, lengths.tolist())]


def open_streams(tokenizer: Any, prompt_ids: Sequence[int], cfg: GenerationConfig) -> list[TextStream]:
    """One TextStream per returned sequence, ending where ``generate_ids`` ends (its end-of-text id)."""
    end: tuple[int, ...] | None = () if cfg.ignore_eos else (
        None if cfg.eos_token_id is None else (cfg.eos_token_id,))
    return [TextStream(tokenizer, prompt_ids, cfg.stop, end_ids=end) for _ in range(cfg.num_return_sequences)]


def run_streams(model: LanguageModel, prompt_ids: list[int], cfg: GenerationConfig, streams: list[TextStream],
                on_text: Callable[[str], Any] | None = None) -> None:
    """Generate into ``streams`` (from :func:`open_streams`), calling ``on_text`` with each newly visible piece
    of sequence 0. Generation stops once every stream has stopped. On an exception (Ctrl-C) the streams keep
    what was shown so far."""
    def on_token(new: torch.Tensor) -> bool:
        for s, t in zip(streams, new[:, -1].tolist()):
            piece = s.push(t)
            if piece and on_text is not None and s is streams[0]:
                on_text(piece)
        return all(s.stopped for s in streams)

    generate_ids(model, prompt_ids, cfg, on_token)
    for s in streams:
        piece = s.finish()
        if piece and on_text is not None and s is streams[0]:
            on_text(piece)


def _writer(out: TextIO) -> Callable[[str], None]:
    def write(piece: str) -> None:
        out.write(piece)
        out.flush()
    return write


def generate_text(model: LanguageModel, prompt: str | list[str], max_new_tokens: int = 100,
                  return_full_text: bool = True, stream: bool | TextIO = False,
                  **kwargs: Any) -> str | list[str]:
    """Hugging Face-style text generation: ``lmforge.generate(model, "ROMEO:", max_new_tokens=50, top_k=50)``.

    Returns one string per prompt (a list when ``num_return_sequences > 1`` or prompts is a list). With
    ``stream`` (True = stdout, or a text file) the first sequence is written as it is produced: the same text
    as returned, since both come from one :class:`TextStream`.
    """
    if model.tokenizer is None:
        raise LMForgeError("this model has no tokenizer; pass token ids to generate_ids instead")
    cfg = GenerationConfig(max_new_tokens=max_new_tokens, **kwargs)
    cfg.validate()
    tok = model.tokenizer
    on_text = None if not stream else _writer(sys.stdout if stream is True else stream)
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    results: list[str] = []
    for p in prompts:
        prompt_ids = tok.encode(p)
        streams = open_streams(tok, prompt_ids, cfg)
        run_streams(model, prompt_ids, cfg, streams, on_text)
        results.extend(p + s.text if return_full_text else s.text for s in streams)
    if isinstance(prompt, str) and cfg.num_return_sequences == 1:
        return results[0]
    return results


__all__ = ["GenerationConfig", "generate_ids", "generate_text", "open_streams", "process_logits", "run_streams",
           "TextStream"]
