"""The HTTP server: FastAPI routes over a :class:`~lmforge.serve.service.ModelService`.

    GET  /                      the web page (chat, completion or translation, by model)
    GET  /health                503 while the model loads, then 200
    GET  /v1/models             the served model
    POST /v1/completions        text completion (a seq2seq model translates the prompt)
    POST /v1/chat/completions   chat through the model's chat template
    POST /tokenize, /detokenize token ids <-> text
    GET  /metrics               Prometheus

Every error is answered in OpenAI's shape ({"error": {"message", "type", "param", "code"}}); nothing a client
sends can stop the server (handlers turn every exception into a response, the engine thread survives errors).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib import resources
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import LMForgeError
from .metrics import ServerMetrics
from .protocol import APIError, ChatCompletionRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest, error_body
from .service import Job, ModelService, ServeConfig, load_service

KNOWN_PATHS = {"/", "/health", "/v1/models", "/v1/completions", "/v1/chat/completions", "/tokenize", "/detokenize",
               "/metrics"}
DISCONNECT_POLL = 0.25  # seconds between checks that a non-streaming client is still there


def _json_error(status: int, message: str, param: str | None = None, code: str | None = None,
                headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, message, param, code), status_code=status, headers=headers)


class _TooLarge(Exception):
    pass


class Gate:
    """ASGI middleware: refuse bodies over ``limit`` bytes (413) and count requests by endpoint and status."""

    def __init__(self, app: Any, limit: int, metrics: ServerMetrics) -> None:
        self.app, self.limit, self.metrics = app, limit, metrics

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        endpoint = path if path in KNOWN_PATHS else "other"
        status = {"code": 500}
        started = {"yes": False}

        async def counted_send(message: dict) -> None:
            if message["type"] == "http.response.start":
                status["code"], started["yes"] = message["status"], True
            await send(message)

        async def reply(resp: Response) -> None:
            await resp(scope, receive, counted_send)

        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        try:
            if length is not None:
                try:
                    n = int(length)
                except ValueError:
                    await reply(_json_error(400, "the Content-Length header is not a number"))
                    return
                if n > self.limit:
                    await reply(_json_error(413, f"the request body has {n} bytes, more than the {self.limit} "
                                                 "this server accepts (--max-body)", code="request_too_large"))
                    return
            seen = 0

            async def limited_receive() -> dict:
                nonlocal seen
                message = await receive()
                if message["type"] == "http.request":
                    seen += len(message.get("body", b""))
                    if seen > self.limit:
                        raise _TooLarge()
                return message

            try:
                await self.app(scope, limited_receive, counted_send)
            except _TooLarge:
                if not started["yes"]:
                    await reply(_json_error(413, f"the request body is larger than the {self.limit} bytes this "
                                                 "server accepts (--max-body)", code="request_too_large"))
        finally:
            self.metrics.requests.labels(endpoint, str(status["code"])).inc()


def create_app(cfg: ServeConfig, service: ModelService | None = None,
               on_load_error: Any = None) -> FastAPI:
    """The app; it loads ``cfg.model`` on a background thread at start-up (``/health`` says 503 until then)
    unless a ready ``service`` is given. ``on_load_error(message)`` is called if loading fails."""
    metrics = ServerMetrics()
    state: dict[str, Any] = {"service": service, "error": None}

    def ready(svc: ModelService) -> None:
        metrics.bind(lambda: svc.engine.queue_depth, lambda: svc.engine.busy_slots, svc.engine.slots)
        svc.engine.observer = metrics
        state["service"] = svc

    def load() -> None:
        try:
            ready(load_service(cfg, metrics))
        except LMForgeError as e:
            state["error"] = str(e)
        except Exception as e:  # noqa: BLE001 - reported to the operator, not raised in a thread
            state["error"] = f"{type(e).__name__}: {e}"
        if state["error"] and on_load_error is not None:
            on_load_error(state["error"])

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if state["service"] is None:
            threading.Thread(target=load, name="lmforge-load", daemon=True).start()
        else:
            ready(state["service"])
        yield
        if state["service"] is not None:
            state["service"].close()

    app = FastAPI(title="lmforge", version="0.1.0", lifespan=lifespan,
                  description="An OpenAI-compatible server for lmforge models, with continuous batching.")
    app.add_middleware(Gate, limit=cfg.max_body, metrics=metrics)
    app.state.lmforge = state
    app.state.metrics = metrics

    # --- errors in OpenAI's shape ------------------------------------------------------------------
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        headers = {"Retry-After": "1"} if exc.status == 429 else None
        return _json_error(exc.status, exc.message, exc.param, exc.code, headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        errs = exc.errors()
        first = errs[0] if errs else {}
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        param = ".".join(loc) or None
        msg = first.get("msg", "invalid request")
        return _json_error(422, f"{param + ': ' if param else ''}{msg}" + (f" (and {len(errs) - 1} more)"
                                                                           if len(errs) > 1 else ""), param)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return _json_error(exc.status_code, str(exc.detail))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        return _json_error(500, f"internal error: {type(exc).__name__}: {exc}", code="internal_error")

    # --- dependencies ------------------------------------------------------------------------------
    def authorized(request: Request) -> None:
        if not cfg.api_key:
            return
        given = request.headers.get("authorization", "")
        token = given[7:] if given.lower().startswith("bearer ") else ""
        if not hmac.compare_digest(token.encode(), cfg.api_key.encode()):
            raise APIError(401, "invalid or missing API key: send 'Authorization: Bearer KEY'", None,
                           "invalid_api_key")

    def svc() -> ModelService:
        s = state["service"]
        if s is None:
            raise APIError(503, state["error"] or "the model is still loading; retry when GET /health says ok")
        return s

    # --- routes --------------------------------------------------------------------------------------
    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page() -> HTMLResponse:
        html = resources.files("lmforge.serve").joinpath("static/index.html").read_text(encoding="utf-8")
        return HTMLResponse(html, headers={"Content-Security-Policy": "default-src 'self'; style-src 'unsafe-inline'"
                                                                      "; script-src 'unsafe-inline'"})

    @app.get("/health")
    async def health() -> JSONResponse:
        s = state["service"]
        if s is None:
            status = "error" if state["error"] else "loading"
            return JSONResponse({"status": status, "error": state["error"]}, status_code=503)
        return JSONResponse({"status": "ok", "model": s.name, "busy_slots": s.engine.busy_slots,
                             "queue_depth": s.engine.queue_depth})

    @app.get("/v1/models", dependencies=[Depends(authorized)])
    async def models() -> dict[str, Any]:
        s = svc()
        return {"object": "list", "data": [{"id": s.name, "object": "model", "created": int(time.time()),
                                            "owned_by": "lmforge", "max_model_len": s.ctx, "mode": s.mode,
                                            "family": s.model.model_type, "slots": s.engine.slots}]}

    @app.post("/v1/completions", dependencies=[Depends(authorized)])
    async def completions(body: CompletionRequest, request: Request) -> Any:
        s = svc()
        return await _answer(s, s.completion_job(body), request)

    @app.post("/v1/chat/completions", dependencies=[Depends(authorized)])
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Any:
        s = svc()
        return await _answer(s, s.chat_job(body), request)

    @app.post("/tokenize", dependencies=[Depends(authorized)])
    async def tokenize(body: TokenizeRequest) -> dict[str, Any]:
        s = svc()
        s.check_model(body.model)
        if (body.prompt is None) == (body.messages is None):
            raise APIError(400, "give either prompt or messages", "prompt")
        text = body.prompt if body.prompt is not None else s.render_chat(body.messages or [],
                                                                          body.add_generation_prompt)
        ids = s.encode(text)
        return {"tokens": ids, "count": len(ids), "max_model_len": s.ctx}

    @app.post("/detokenize", dependencies=[Depends(authorized)])
    async def detokenize(body: DetokenizeRequest) -> dict[str, Any]:
        s = svc()
        s.check_model(body.model)
        s._check_ids(body.tokens, "tokens")
        return {"prompt": s.tokenizer.decode(body.tokens)}  # type: ignore[union-attr]

    @app.get("/metrics", dependencies=[Depends(authorized)])
    async def prometheus() -> Response:
        return PlainTextResponse(generate_latest(metrics.registry).decode(), media_type=CONTENT_TYPE_LATEST)

    return app


async def _answer(s: ModelService, job: Job, request: Request) -> Any:
    """Run ``job`` on the engine: a JSON answer, or a server-sent event stream."""
    loop = asyncio.get_running_loop()
    events: asyncio.Queue = asyncio.Queue()

    def sink(index: int, event: Any) -> None:  # on the engine thread
        try:
            loop.call_soon_threadsafe(events.put_nowait, (index, event))
        except RuntimeError:  # the event loop is gone (shutting down)
            pass

    s.submit(job, sink)
    if not job.request.stream:
        try:
            checked = loop.time()
            while not job.done:
                try:
                    index, event = await asyncio.wait_for(events.get(), DISCONNECT_POLL)
                    s.feed(job, index, event)
                except asyncio.TimeoutError:
                    pass
                if loop.time() - checked >= DISCONNECT_POLL:  # (tokens may arrive faster than the poll)
                    checked = loop.time()
                    if await request.is_disconnected():
                        return Response(status_code=499)
            return s.response(job)
        finally:
            job.cancel()  # a client that went away frees its slots (no-op for finished sequences)

    async def stream() -> AsyncIterator[str]:
        sent_first: set[int] = set()
        try:
            while not job.done:
                index, event = await events.get()
                s.feed(job, index, event)
                try:
                    chunk = s.chunk(job, index, event, index not in sent_first)
                except APIError as e:
                    yield f"data: {json.dumps(e.body())}\n\n"
                    break
                if chunk is not None:
                    sent_first.add(index)
                    yield f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"
            else:
                if job.request.stream_options and job.request.stream_options.include_usage:
                    yield f"data: {json.dumps(s.usage_chunk(job))}\n\n"
            yield "data: [DONE]\n\n"
        finally:
            job.cancel()  # the client disconnected (the generator is closed) or we are done

    return StreamingResponse(stream(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


__all__ = ["create_app"]
