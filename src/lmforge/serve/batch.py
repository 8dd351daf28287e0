"""``lmforge batch``: OpenAI batch files through the continuous-batching engine.

Input: one request per line, ``{"custom_id", "method": "POST", "url": "/v1/completions" | "/v1/chat/completions",
"body": {...}}`` (OpenAI's batch input format). Output: one line per request, in the order they finish,
``{"id", "custom_id", "response": {"status_code", "request_id", "body"}, "error"}`` (OpenAI's batch output
format): a request the server would refuse gets its 4xx response, a line that is not a request at all gets
``error`` = {"code", "message"}; the other lines go on.

A producer thread keeps the engine's queue full (every slot busy) while the main thread writes results as they
come. Each result line is written whole and flushed, so an interrupted job resumes: requests whose
``custom_id`` is already in the output are skipped (an unfinished last line, cut by the interruption, is
dropped). An existing output that is not a results file is never touched.
"""

from __future__ import annotations

import json
import queue
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from tqdm import tqdm

from ..errors import LMForgeError
from .protocol import APIError, ChatCompletionRequest, CompletionRequest
from .service import Job, ModelService, ServeConfig, load_service

URLS = {"/v1/completions": CompletionRequest, "/v1/chat/completions": ChatCompletionRequest}


def read_done(output: Path) -> set[str]:
    """custom_ids already answered in ``output``; refuses a file that is not an lmforge/OpenAI results file."""
    if not output.exists():
        return set()
    if not output.is_file():
        raise LMForgeError(f"--output {output} is not a file")
    raw = output.read_bytes()
    lines = raw.split(b"\n")
    tail_cut = bool(lines) and lines[-1] != b""  # the last line has no newline: a write was interrupted
    done: set[str] = set()
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
            ok = isinstance(obj, dict) and "custom_id" in obj and ("response" in obj or "error" in obj)
        except (json.JSONDecodeError, UnicodeDecodeError):
            ok = False
            if tail_cut and i == len(lines) - 1:  # our own unfinished line: drop it and redo that request
                with output.open("r+b") as f:
                    f.truncate(len(raw) - len(line))
                break
        if not ok:
            raise LMForgeError(f"--output {output} exists and line {i + 1} is not a batch result; it would not be "
                               "overwritten: choose another output file")
        done.add(str(obj["custom_id"]))
    return done


def _error_line(custom_id: Any, code: str, message: str) -> dict[str, Any]:
    return {"id": "batch_req_" + uuid.uuid4().hex, "custom_id": custom_id, "response": None,
            "error": {"code": code, "message": message}}


def _response_line(custom_id: str, status: int, body: dict[str, Any]) -> dict[str, Any]:
    return {"id": "batch_req_" + uuid.uuid4().hex, "custom_id": custom_id,
            "response": {"status_code": status, "request_id": uuid.uuid4().hex, "body": body}, "error": None}


def parse_line(service: ModelService, text: str, number: int, seen: set[str]) -> tuple[Any, Job | dict]:
    """(custom_id, a Job to run) or (custom_id, the result line of a request that cannot run)."""
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        return f"line-{number}", _error_line(f"line-{number}", "invalid_json", f"line {number}: {e}")
    if not isinstance(obj, dict) or not isinstance(obj.get("custom_id"), str) or not obj["custom_id"]:
        cid = obj.get("custom_id") if isinstance(obj, dict) else None
        return cid or f"line-{number}", _error_line(cid or f"line-{number}", "invalid_request",
                                                    f"line {number}: expected an object with a custom_id string")
    cid = obj["custom_id"]
    if cid in seen:  # reported under the line's number: a results file has each custom_id once
        return cid, _error_line(f"line-{number}", "duplicate_custom_id",
                                f"line {number}: custom_id {cid!r} was used before")
    seen.add(cid)
    url, method = obj.get("url"), str(obj.get("method", "POST")).upper()
    if url not in URLS or method != "POST":
        return cid, _error_line(cid, "invalid_url", f"line {number}: url must be POST {' or '.join(URLS)}, "
                                                    f"not {method} {url}")
    body = obj.get("body")
    try:
        req = URLS[url].model_validate({**(body if isinstance(body, dict) else {}), "stream": False})
        if not isinstance(body, dict):
            raise APIError(400, "body must be a JSON object", "body")
        job = service.completion_job(req) if url == "/v1/completions" else service.chat_job(req)  # type: ignore
    except ValidationError as e:
        err = e.errors()[0]
        param = ".".join(str(x) for x in err.get("loc", ()))
        return cid, _response_line(cid, 422, APIError(422, f"{param}: {err.get('msg')}", param).body())
    except APIError as e:
        return cid, _response_line(cid, e.status, e.body())
    return cid, job


def run_batch(cfg: ServeConfig, input_path: str | Path, output_path: str | Path, progress: bool = True,
              service: ModelService | None = None) -> dict[str, Any]:
    inp, out = Path(input_path), Path(output_path)
    if not inp.is_file():
        raise LMForgeError(f"--input {inp} is not a file")
    if out.exists() and out.resolve() == inp.resolve():
        raise LMForgeError("--output must not be the input file")
    try:
        lines = inp.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise LMForgeError(f"--input {inp} is not UTF-8 text ({e})") from None
    done_before = read_done(out)
    own_service = service is None
    service = service or load_service(cfg)
    stats = {"done": 0, "failed": 0, "skipped": 0, "completion_tokens": 0, "seconds": 0.0}
    todo: list[tuple[int, str]] = []
    for number, text in enumerate(lines, 1):
        if not text.strip():
            continue
        try:
            cid = json.loads(text).get("custom_id")
        except (json.JSONDecodeError, AttributeError):
            cid = f"line-{number}"
        if isinstance(cid, str) and cid in done_before:
            stats["skipped"] += 1
            continue
        todo.append((number, text))
    events: queue.Queue = queue.Queue()
    t0 = time.perf_counter()
    bar = tqdm(total=len(todo), desc="batch", unit="req", disable=not progress, file=sys.stderr, dynamic_ncols=True)
    try:
        with out.open("a", encoding="utf-8") as f:
            def write(line: dict[str, Any], failed: bool) -> None:
                f.write(json.dumps(line, ensure_ascii=False) + "\n")
                f.flush()
                stats["done"] += 1
                stats["failed"] += int(failed)
                bar.update(1)

            pending: dict[int, tuple[str, Job]] = {}
            lock = threading.Lock()
            produced = threading.Event()

            def produce() -> None:  # keeps the engine's queue full; blocks while it is
                seen: set[str] = set(done_before)
                try:
                    for number, text in todo:
                        cid, item = parse_line(service, text, number, seen)
                        if isinstance(item, dict):
                            events.put(("line", item))
                            continue
                        with lock:
                            pending[number] = (cid, item)
                        try:
                            service.submit(item, lambda i, ev, n=number: events.put(("event", n, i, ev)), block=True)
                        except APIError as e:
                            with lock:
                                pending.pop(number, None)
                            events.put(("line", _response_line(cid, e.status, e.body())))
                finally:
                    produced.set()
                    events.put(("wake",))

            producer = threading.Thread(target=produce, name="lmforge-batch", daemon=True)
            producer.start()
            while True:
                with lock:
                    idle = not pending
                if idle and produced.is_set() and events.empty():
                    break
                item = events.get()
                if item[0] == "line":
                    write(item[1], True)
                elif item[0] == "event":
                    _, number, index, ev = item
                    with lock:
                        cid, job = pending[number]
                    service.feed(job, index, ev)
                    if job.done:
                        with lock:
                            pending.pop(number)
                        try:
                            body = service.response(job)
                            stats["completion_tokens"] += body["usage"]["completion_tokens"]
                            write(_response_line(cid, 200, body), False)
                        except APIError as e:
                            write(_response_line(cid, e.status, e.body()), True)
            producer.join()
    finally:
        bar.close()
        if own_service:
            service.close()
    stats["seconds"] = time.perf_counter() - t0
    return stats


__all__ = ["run_batch", "read_done"]
