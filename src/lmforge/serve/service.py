"""The model behind the endpoints: turns OpenAI requests into engine sequences and engine events into OpenAI
responses and stream chunks. Shared by the HTTP server (``app.py``) and batch jobs (``batch.py``), so a
batch line and an HTTP request with the same body get the same answer.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from ..errors import LMForgeError
from ..generation import MIN_TEMPERATURE
from ..generation.engine import Engine, EngineObserver, Finished, PromptTooLong, QueueFull, SamplingParams, Sequence
from ..generation.fast import prepare_for_decoding
from ..hub import load_model
from ..hub.peft import apply_adapter
from ..models.base import LanguageModel
from ..options import Options, option, validate
from ..tokenizers.chat_template import ChatTemplate
from .protocol import APIError, ChatCompletionRequest, CompletionRequest, SamplingFields


@dataclass
class ServeConfig(Options):
    """``lmforge serve`` / ``lmforge batch`` options (declared once: their help, bounds and flags)."""

    model: str = option("", cli=False, help="run directory, Hugging Face directory, .gguf file, or smollm2")
    adapter: str | None = option(None, metavar="RUN", default_text="none",
                                 help="a LoRA adapter (a run of lmforge finetune --method lora, or a PEFT adapter "
                                      "directory) merged into the model's weights before serving")
    host: str = option("127.0.0.1", help="address to bind; any other than loopback without --api-key warns")
    port: int = option(8000, ge=0, le=65535, help="port to listen on (0 = any free port)")
    parallel: int = option(4, ge=1, le=256, help="decoding slots: sequences decoded together in one batched "
                                                 "forward pass")
    max_queue: int = option(64, ge=0, help="requests allowed to wait for a slot; one more gets HTTP 429")
    ctx: int | None = option(None, ge=2, default_text="the model's context, at most 4096",
                             help="context length per sequence (the slot cache holds parallel x ctx positions)")
    dtype: Literal["auto", "fp32", "bf16", "int8", "int4"] = option(
        "fp32", help="decoding layout of a Transformer's weights: bf16 halves, int8 quarters, int4 (group-wise "
                     "scales) eighths the bytes read per token; a GGUF file loads straight into int8/int4; auto: "
                     "fp32 or bf16, whichever a short probe measures faster here")
    api_key: str | None = option(None, default_text="the LMFORGE_API_KEY environment variable",
                                 help="require 'Authorization: Bearer KEY' on every endpoint but / and /health")
    name: str | None = option(None, default_text="the model's directory or file name",
                              help="the model id clients send")
    chat_template: str | None = option(None, cli=False, help="Jinja chat template text, replacing the model's own")
    chat_stop: list[str] = option(default_factory=list, cli=False,
                                  help="stop strings added to every chat request (a built-in template's end of turn)")
    max_body: int = option(1 << 20, ge=1024, help="largest request body in bytes (HTTP 413 beyond)")
    threads: int | None = option(None, ge=1, default_text="torch's", help="torch threads of the engine")

    def validate(self) -> None:
        validate(self)


DEFAULT_MAX_CTX = 4096  # the slot cache holds parallel * ctx positions: cap the default for 32k-context models


def model_id(cfg: ServeConfig) -> str:
    if cfg.name:
        return cfg.name
    p = Path(cfg.model)
    return p.stem if p.suffix.lower() == ".gguf" else (p.name or str(cfg.model))


def load_service(cfg: ServeConfig, observer: EngineObserver | None = None) -> ModelService:
    """Load the model, lay its weights out for decoding, start the engine thread."""
    cfg.validate()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if cfg.adapter is not None:  # merged into the fp32 weights, then laid out for decoding like any model
        model = apply_adapter(load_model(cfg.model), cfg.adapter)
    else:
        model = load_model(cfg.model, decode_dtype=cfg.dtype)
    if model.batches_slots or model.is_seq2seq:  # the Transformers (GPT, seq2seq)
        prepare_for_decoding(model, cfg.dtype)
    elif cfg.dtype not in ("fp32", "auto"):  # auto: fp32 for the families without decoding layouts
        raise LMForgeError(f"--dtype {cfg.dtype} applies to Transformer models; this is a {model.model_type} model")
    ctx = cfg.ctx
    if ctx is None and model.context_length and model.context_length > DEFAULT_MAX_CTX:
        ctx = DEFAULT_MAX_CTX
    engine = Engine(model, slots=cfg.parallel, max_queue=cfg.max_queue, ctx=ctx, observer=observer).start()
    return ModelService(model, model_id(cfg), engine, cfg.chat_template, cfg.chat_stop)


@dataclass
class Choice:
    """What one sequence produced so far (text pieces, per-token log-probabilities, how it ended)."""

    index: int
    text: str = ""
    tokens: list[tuple[int, float | None, list[tuple[int, float]]]] = field(default_factory=list)
    finished: Finished | None = None


@dataclass
class Job:
    """One request: its sequences (prompt x n), how to answer, and what came back."""

    kind: str                                      # "completion" | "chat"
    request: SamplingFields
    prompts: list[list[int]]                       # token ids per distinct prompt
    texts: list[str]                               # the prompts' text (seq2seq sources)
    params: SamplingParams
    n: int
    id: str = ""
    created: int = 0
    choices: list[Choice] = field(default_factory=list)
    sequences: list[Sequence] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.id = ("chatcmpl-" if self.kind == "chat" else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())
        self.choices = [Choice(i) for i in range(len(self.prompts) * self.n)]

    @property
    def done(self) -> bool:
        return all(c.finished is not None for c in self.choices)

    def cancel(self) -> None:
        for s in self.sequences:
            s.cancel()


class ModelService:
    def __init__(self, model: LanguageModel, name: str, engine: Engine, chat_template: str | None = None,
                 chat_stop: list[str] | None = None) -> None:
        self.model, self.name, self.engine = model, name, engine
        self.chat_stop = list(chat_stop or [])  # a built-in template's end-of-turn strings
        self.tokenizer = model.tokenizer
        assert self.tokenizer is not None
        self.is_seq2seq = model.is_seq2seq
        text = chat_template or model.chat_template if not self.is_seq2seq else None  # type: ignore[attr-defined]
        self.template = ChatTemplate(text, "the model's chat template") if text else None

    @property
    def ctx(self) -> int | None:
        return self.engine.ctx

    @property
    def mode(self) -> str:
        """What the web page offers: chat (a chat template), translate (seq2seq) or complete."""
        return "translate" if self.is_seq2seq else ("chat" if self.template is not None else "complete")

    def close(self) -> None:
        self.engine.stop()

    # --- requests -> jobs ------------------------------------------------------------------------
    def check_model(self, name: str | None) -> None:
        if name and name != self.name:
            raise APIError(404, f"the model {name!r} does not exist; this server serves {self.name!r}",
                           "model", "model_not_found")

    def _params(self, req: SamplingFields, logprobs: bool, top_logprobs: int) -> SamplingParams:
        stops = req.stop_list()
        if len(stops) > 8:
            raise APIError(400, "give at most 8 stop strings", "stop")
        # a temperature this close to 0 would overflow z / T: it means greedy (as vLLM reads it)
        temperature = req.temperature if req.temperature >= MIN_TEMPERATURE else 0.0
        p = SamplingParams(max_tokens=req.limit(), temperature=temperature, top_p=req.top_p, top_k=req.top_k,
                           repetition_penalty=req.repetition_penalty, stop=stops, seed=req.seed, logprobs=logprobs,
                           top_logprobs=top_logprobs, ignore_eos=req.ignore_eos, beam=req.beam)
        try:
            p.generation_config()
        except LMForgeError as e:
            raise APIError(400, str(e).replace("--", "").replace("-", "_")) from None
        return p

    def encode(self, text: str, param: str = "prompt") -> list[int]:
        try:
            return self.tokenizer.encode(text)  # type: ignore[union-attr]
        except (ValueError, LMForgeError) as e:  # e.g. a character tokenizer without byte fallback
            raise APIError(400, f"the text cannot be tokenized by this model's tokenizer: {e}", param) from None

    def _check_ids(self, ids: list[int], param: str) -> None:
        V = self.model.vocab_size
        bad = next((i for i in ids if not 0 <= i < V), None)
        if bad is not None:
            raise APIError(400, f"token id {bad} is outside the vocabulary (0..{V - 1})", param)

    def _check_length(self, ids: list[int], param: str) -> None:
        try:
            self.engine.check_prompt(ids)
        except PromptTooLong as e:
            raise APIError(400, str(e), param, "context_length_exceeded") from None

    def completion_job(self, req: CompletionRequest) -> Job:
        self.check_model(req.model)
        if req.echo or req.suffix:
            raise APIError(400, "echo and suffix are not supported", "echo" if req.echo else "suffix")
        prompt = req.prompt
        if isinstance(prompt, list) and prompt and all(isinstance(x, int) for x in prompt):
            if self.is_seq2seq:
                raise APIError(400, "a seq2seq model translates text: give prompt as a string", "prompt")
            ids_list = [list(prompt)]  # type: ignore[arg-type]
            self._check_ids(ids_list[0], "prompt")
            texts = [self.tokenizer.decode(ids_list[0])]  # type: ignore[union-attr]
        else:
            texts = [prompt] if isinstance(prompt, str) else [str(p) for p in prompt]
            if not texts:
                raise APIError(400, "prompt is an empty list", "prompt")
            if len(texts) * req.n > 64:
                raise APIError(400, "at most 64 completions per request (prompts x n)", "n")
            if self.is_seq2seq and not all(t.strip() for t in texts):
                raise APIError(400, "give a source text to translate", "prompt")
            ids_list = [self.encode(t) for t in texts]
        for ids in ids_list:
            self._check_length(ids, "prompt")
        if self.is_seq2seq and (req.logprobs is not None):
            raise APIError(400, "logprobs are not available for seq2seq models", "logprobs")
        params = self._params(req, req.logprobs is not None, req.logprobs or 0)
        return Job("completion", req, ids_list, texts, params, req.n)

    def render_chat(self, messages: list[Any], add_generation_prompt: bool = True) -> str:
        if self.template is None:
            what = "a seq2seq model: use /v1/completions to translate" if self.is_seq2seq else (
                "this model has no chat template: use /v1/completions, or start the server with "
                "--template chatml|simple|FILE")
            raise APIError(400, f"chat is not available: {what}", "messages", "no_chat_template")
        try:
            return self.template.render([{"role": m.role, "content": m.text()} for m in messages],
                                        add_generation_prompt=add_generation_prompt)
        except LMForgeError as e:
            raise APIError(400, str(e), "messages") from None

    def chat_job(self, req: ChatCompletionRequest) -> Job:
        self.check_model(req.model)
        prompt = self.render_chat(req.messages)
        ids = self.encode(prompt, "messages")
        self._check_length(ids, "messages")
        top = req.top_logprobs or 0
        if top and not req.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", "top_logprobs")
        params = self._params(req, req.logprobs, top)
        params.stop = params.stop + [s for s in self.chat_stop if s not in params.stop]
        return Job("chat", req, [ids], [prompt], params, req.n)

    def submit(self, job: Job, sink: Callable[[int, Any], None], block: bool = False) -> None:
        """Queue every sequence of ``job``; events reach ``sink(choice_index, event)`` on the engine thread."""
        try:
            for p, (ids, text) in enumerate(zip(job.prompts, job.texts)):
                for j in range(job.n):
                    i = p * job.n + j
                    params = job.params
                    if params.seed is not None and j:  # n samples from one seed: seed, seed + 1, ...
                        params = SamplingParams(**{**params.__dict__, "seed": params.seed + j})
                    job.sequences.append(self.engine.submit(ids, params, lambda ev, i=i: sink(i, ev),
                                                            text_prompt=text, block=block))
        except QueueFull as e:
            job.cancel()
            raise APIError(429, str(e), None, "queue_full") from None
        except PromptTooLong as e:
            job.cancel()
            raise APIError(400, str(e), "prompt", "context_length_exceeded") from None

    # --- events -> responses ---------------------------------------------------------------------
    def feed(self, job: Job, index: int, event: Any) -> None:
        c = job.choices[index]
        if isinstance(event, Finished):
            c.finished = event
        else:
            c.text += event.text
            if event.token_id >= 0 and event.logprob is not None:
                c.tokens.append((event.token_id, event.logprob, event.top_logprobs))

    def usage(self, job: Job) -> dict[str, int]:
        prompt = sum(len(p) for p in job.prompts)
        completion = sum(c.finished.completion_tokens for c in job.choices if c.finished)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def _token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id])  # type: ignore[union-attr]

    def _logprobs(self, job: Job, tokens: list[tuple[int, float | None, list[tuple[int, float]]]],
                  offset: int = 0) -> dict[str, Any] | None:
        if not job.params.logprobs:
            return None
        if job.kind == "chat":
            def entry(t: int, lp: float) -> dict[str, Any]:
                s = self._token_text(t)
                return {"token": s, "logprob": lp, "bytes": list(s.encode("utf-8"))}
            return {"content": [{**entry(t, lp or 0.0), "top_logprobs": [entry(a, b) for a, b in top]}
                                for t, lp, top in tokens]}
        texts = [self._token_text(t) for t, _, _ in tokens]
        offsets, pos = [], offset
        for s in texts:
            offsets.append(pos)
            pos += len(s)
        return {"tokens": texts, "token_logprobs": [lp for _, lp, _ in tokens],
                "top_logprobs": [{self._token_text(a): b for a, b in top} for _, _, top in tokens]
                if job.params.top_logprobs else None, "text_offset": offsets}

    def response(self, job: Job) -> dict[str, Any]:
        """The non-streamed answer (once ``job.done``)."""
        errors = [c.finished.error for c in job.choices if c.finished and c.finished.reason == "error"]
        if errors:
            raise APIError(500, f"decoding failed: {errors[0]}", None, "engine_error")
        choices = []
        for c in job.choices:
            assert c.finished is not None
            reason = c.finished.reason
            if job.kind == "chat":
                choices.append({"index": c.index, "message": {"role": "assistant", "content": c.text},
                                "logprobs": self._logprobs(job, c.tokens), "finish_reason": reason})
            else:
                choices.append({"index": c.index, "text": c.text, "logprobs": self._logprobs(job, c.tokens),
                                "finish_reason": reason})
        return {"id": job.id, "object": "chat.completion" if job.kind == "chat" else "text_completion",
                "created": job.created, "model": self.name, "choices": choices, "usage": self.usage(job),
                "system_fingerprint": None}

    def chunk(self, job: Job, index: int, event: Any, first: bool) -> dict[str, Any] | None:
        """The stream chunk for one engine event (None when there is nothing to send)."""
        c = job.choices[index]
        if isinstance(event, Finished):
            if event.reason == "error":
                raise APIError(500, f"decoding failed: {event.error}", None, "engine_error")
            delta_text, reason, toks = "", event.reason, []
        else:
            delta_text, reason = event.text, None
            toks = [(event.token_id, event.logprob, event.top_logprobs)] \
                if event.token_id >= 0 and event.logprob is not None else []
            if not delta_text and not toks and not first:
                return None
        if job.kind == "chat":
            delta: dict[str, Any] = {} if reason is not None else {"content": delta_text}
            if first:
                delta["role"] = "assistant"
            choice: dict[str, Any] = {"index": index, "delta": delta,
                                      "logprobs": self._logprobs(job, toks) if toks else None,
                                      "finish_reason": reason}
            obj = "chat.completion.chunk"
        else:
            offset = len(c.text) - len(delta_text)
            choice = {"index": index, "text": delta_text,
                      "logprobs": self._logprobs(job, toks, offset) if toks else None, "finish_reason": reason}
            obj = "text_completion"
        out = {"id": job.id, "object": obj, "created": job.created, "model": self.name, "choices": [choice],
               "system_fingerprint": None}
        if job.request.stream_options and job.request.stream_options.include_usage:
            out["usage"] = None
        return out

    def usage_chunk(self, job: Job) -> dict[str, Any]:
        return {"id": job.id, "object": "chat.completion.chunk" if job.kind == "chat" else "text_completion",
                "created": job.created, "model": self.name, "choices": [], "usage": self.usage(job),
                "system_fingerprint": None}


__all__ = ["ServeConfig", "ModelService", "Job", "load_service", "model_id"]
