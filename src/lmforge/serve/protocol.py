"""OpenAI's request shapes (pydantic) and its error shape, for ``/v1/completions`` and ``/v1/chat/completions``.

Fields follow OpenAI's API reference; ``top_k``, ``repetition_penalty``, ``beam`` (seq2seq) and
``ignore_eos`` are extras (the ``openai`` client sends them with ``extra_body``). Unknown fields are ignored,
as OpenAI-compatible servers do.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

MAX_N = 16
MAX_TOP_LOGPROBS = 20


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class SamplingFields(BaseModel):
    """The fields both endpoints share."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = Field(None, description="the served model's id (GET /v1/models)")
    max_tokens: Annotated[int, Field(ge=1)] | None = Field(None, description="most tokens to generate")
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = Field(None, description="max_tokens' newer name")
    temperature: float = Field(1.0, ge=0.0, le=100.0, description="0 = greedy")
    top_p: float | None = Field(None, gt=0.0, le=1.0, description="nucleus sampling mass")
    stop: str | list[str] | None = Field(None, description="stop at this string (or any of these, at most 8)")
    seed: int | None = Field(None, ge=0, le=2**63 - 1, description="seed of the sampler (reproducible sampling)")
    n: int = Field(1, ge=1, le=MAX_N, description="completions per prompt")
    stream: bool = Field(False, description="server-sent events, ending with data: [DONE]")
    stream_options: StreamOptions | None = None
    # extras
    top_k: int | None = Field(None, ge=1, description="keep the k most likely tokens (extra)")
    repetition_penalty: float = Field(1.0, ge=0.01, le=100.0, description="CTRL's repetition penalty (extra)")
    ignore_eos: bool = Field(False, description="do not stop at the end-of-text token (extra)")
    beam: int = Field(1, ge=1, le=16, description="seq2seq models: beam size (extra)")
    user: str | None = None

    def stop_list(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return [s for s in stops if s]

    def limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[int] = Field("", description="text (or token ids) to continue; a seq2seq "
                                                                 "model translates it")
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS,
                                 description="report log-probabilities of the chosen and this many top tokens")
    echo: bool = False
    suffix: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):  # content parts: keep the text ones
            return "".join(str(p.get("text", "")) for p in self.content if p.get("type") == "text")
        return self.content or ""


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(..., min_length=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)


class TokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_generation_prompt: bool = True


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    tokens: list[int]


class APIError(Exception):
    """An error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "invalid_request_error",
             413: "invalid_request_error", 422: "invalid_request_error", 429: "rate_limit_error",
             500: "server_error", 503: "server_error"}

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict[str, Any]:
        return error_body(self.status, self.message, self.param, self.code)


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": APIError.TYPES.get(status, "invalid_request_error"),
                      "param": param, "code": code}}
