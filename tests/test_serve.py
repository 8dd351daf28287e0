"""lmforge serve: the official openai client against a live server on 127.0.0.1 (a free port, a thread of this
process), on a tiny model trained here; continuous batching checked against one-at-a-time decoding."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch

import lmforge
from lmforge.cli import main
from lmforge.generation.engine import Engine, Finished, SamplingParams
from lmforge.serve import ServeConfig, Server, load_service

openai = pytest.importorskip("openai")

pytestmark = pytest.mark.timeout(120)

TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}assistant:{% endif %}")
PROMPTS = ["ROMEO:", "First Citizen:\nBefore we", "All:\nSpeak", "O", "What say you", "MENENIUS:\nWhy",
           "The gods", "Citizen"]


@pytest.fixture(scope="module")
def gpt_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny GPT run directory: random weights with a wide output layer, so that greedy decoding is varied and
    clear-cut (no near-ties) without spending test time on training; a character vocabulary from real text."""
    from lmforge.models.gpt import GPT, GPTConfig
    from lmforge.tokenizers import CharTokenizer
    from tests.conftest import sample_text

    tok = CharTokenizer.train([sample_text(20_000)], byte_fallback=False)
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=96, n_layer=2, n_head=2, n_embd=48, pos="rope",
                          norm="rmsnorm", tie_embeddings=False))
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)
    model.tokenizer = tok
    out = tmp_path_factory.mktemp("serve") / "gpt"
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def template_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    p = tmp_path_factory.mktemp("tpl") / "chat.jinja"
    p.write_text(TEMPLATE, encoding="utf-8")
    return p


@pytest.fixture(scope="module")
def server(gpt_run: Path, template_file: Path):
    srv = Server(ServeConfig(model=str(gpt_run), port=0, parallel=4, max_queue=64, name="tiny",
                             chat_template=template_file.read_text(), max_body=64 * 1024)).start(wait_ready=60)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server: Server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", timeout=30, max_retries=0)


def stream_text(chunks) -> tuple[str, list, object]:  # noqa: ANN001
    text, reasons, usage = "", [], None
    for ch in chunks:
        if ch.usage is not None:
            usage = ch.usage
        for c in ch.choices:
            piece = c.text if hasattr(c, "text") else (c.delta.content or "")
            text += piece
            if c.finish_reason:
                reasons.append(c.finish_reason)
    return text, reasons, usage


# --- the engine on its own ---------------------------------------------------------------------------
def run_engine(engine: Engine, tok, prompt: str, **kw) -> tuple[str, Finished]:  # noqa: ANN001
    import queue

    q: queue.Queue = queue.Queue()
    engine.submit(tok.encode(prompt), SamplingParams(**kw), q.put)
    text = ""
    while True:
        ev = q.get(timeout=30)
        if isinstance(ev, Finished):
            return text, ev
        text += ev.text


def test_engine_batched_greedy_equals_generate(gpt_run: Path) -> None:
    """8 sequences of different lengths, joining and leaving while 3 slots decode: token for token what
    generate() gives each one alone (fp32)."""
    model = lmforge.load(gpt_run)
    refs = {p: lmforge.generate(model, p, max_new_tokens=12 + 3 * i, temperature=0, repetition_penalty=1.3,
                              return_full_text=False) for i, p in enumerate(PROMPTS)}
    engine = Engine(lmforge.load(gpt_run), slots=3, max_queue=16).start()
    try:
        out: dict[str, str] = {}

        def one(i: int, p: str) -> None:
            out[p] = run_engine(engine, model.tokenizer, p, max_tokens=12 + 3 * i, temperature=0,
                                repetition_penalty=1.3)[0]

        threads = [threading.Thread(target=one, args=(i, p)) for i, p in enumerate(PROMPTS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert out == refs
        assert engine.steps < sum(12 + 3 * i for i in range(len(PROMPTS)))  # rows really shared steps
    finally:
        engine.stop()


def test_slot_cache_matches_single_sequence_cache(gpt_run: Path) -> None:
    """Slots prefilled apart and together (right-padded), then decoded in one batch at different positions:
    the logits of a full forward pass of each sequence."""
    model = lmforge.load(gpt_run)
    torch.manual_seed(0)
    seqs = [torch.randint(0, model.vocab_size, (n,)) for n in (9, 4, 15)]
    ref = [model(s[None])[0][0] for s in seqs]
    cache = model.init_slots(4, 32)
    starts = (3, 2, 5)  # prompt lengths
    got: list[list[torch.Tensor]] = [[] for _ in seqs]
    with torch.no_grad():
        cache.select(slice(1, 2))  # slot 1 alone
        got[1].append(model(seqs[1][None, :2], cache=cache)[0][0])
        padded = torch.zeros(2, 5, dtype=torch.long)  # slots 0 and 2 together, right-padded
        padded[0, :3], padded[1] = seqs[0][:3], seqs[2][:5]
        cache.select(torch.tensor([0, 2]), torch.tensor([3, 5]))
        logits = model(padded, cache=cache)[0]
        got[0].append(logits[0, :3])
        got[2].append(logits[1])
        assert cache.lengths.tolist()[:3] == [3, 2, 5]
        for t in range(15):  # then one batched step at a time, each row at its own position
            cache.select(slice(0, 3))
            step = [int(s[starts[i] + t]) if starts[i] + t < len(s) else 0 for i, s in enumerate(seqs)]
            logits = model(torch.tensor(step)[:, None], cache=cache)[0]
            for i, s in enumerate(seqs):
                if starts[i] + t < len(s):
                    got[i].append(logits[i])
    for i in range(len(seqs)):
        torch.testing.assert_close(torch.cat([g.reshape(-1, g.shape[-1]) for g in got[i]]), ref[i],
                                   rtol=1e-5, atol=1e-5)
    # last_only with padding: each row's last real position
    cache = model.init_slots(2, 32)
    cache.select(torch.tensor([0, 1]), torch.tensor([3, 5]))
    with torch.no_grad():
        logits, _ = model.forward_logits(padded, cache, last_only=True)
    torch.testing.assert_close(logits[:, 0], torch.stack([ref[0][2], ref[2][4]]), rtol=1e-5, atol=1e-5)


# --- the openai client against a live server -----------------------------------------------------------
def test_completions_streamed_equals_non_streamed_and_usage(client, server: Server) -> None:  # noqa: ANN001
    kw = dict(model="tiny", prompt="ROMEO:", max_tokens=24, temperature=0, logprobs=0)
    r = client.completions.create(**kw)
    c = r.choices[0]
    assert c.finish_reason in ("length", "stop") and c.text
    # usage equals the tokens actually counted: the prompt by /tokenize, the completion token by token
    n_prompt = httpx.post(server.url + "/tokenize", json={"prompt": "ROMEO:"}).json()["count"]
    assert r.usage.prompt_tokens == n_prompt == 6
    assert r.usage.completion_tokens == len(c.logprobs.tokens) == len(c.logprobs.token_logprobs)
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    if c.finish_reason == "length":
        assert r.usage.completion_tokens == 24
    text, reasons, usage = stream_text(client.completions.create(
        **kw, stream=True, stream_options={"include_usage": True}))
    assert text == c.text and reasons == [c.finish_reason]
    assert usage is not None and usage.model_dump() == r.usage.model_dump()


def test_chat_streamed_equals_non_streamed(client) -> None:  # noqa: ANN001
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Who art thou?"}]
    r = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=30, temperature=0)
    m = r.choices[0].message
    assert m.role == "assistant" and m.content and r.object == "chat.completion"
    text, reasons, usage = stream_text(client.chat.completions.create(
        model="tiny", messages=msgs, max_tokens=30, temperature=0, stream=True,
        stream_options={"include_usage": True}))
    assert text == m.content and reasons == [r.choices[0].finish_reason]
    assert usage.model_dump() == r.usage.model_dump()
    rendered = httpx.post(str(client.base_url).replace("/v1/", "/tokenize"), json={"messages": msgs}).json()
    assert r.usage.prompt_tokens == rendered["count"]


def test_temperature_zero_equals_lmforge_generate(client, gpt_run: Path, capsys: pytest.CaptureFixture) -> None:  # noqa: ANN001
    assert main(["generate", str(gpt_run), "--prompt", "ROMEO:", "--max-new-tokens", "40", "--temperature", "0"]) == 0
    cli_text = capsys.readouterr().out
    r = client.completions.create(model="tiny", prompt="ROMEO:", max_tokens=40, temperature=0)
    assert cli_text == "ROMEO:" + r.choices[0].text + "\n"


def test_seed_reproduces_and_n(client) -> None:  # noqa: ANN001
    kw = dict(model="tiny", prompt="O", max_tokens=30, temperature=1.0, top_p=0.95)
    a = client.completions.create(**kw, seed=7).choices[0].text
    b = client.completions.create(**kw, seed=7).choices[0].text
    c = client.completions.create(**kw, seed=8).choices[0].text
    assert a == b and a != c
    two = client.completions.create(**kw, seed=7, n=2)
    assert [ch.index for ch in two.choices] == [0, 1]
    assert two.choices[0].text == a and two.choices[1].text == c  # choice j uses seed + j
    assert two.usage.completion_tokens == 60 or two.usage.completion_tokens <= 60
    chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], n=2,
                                          max_tokens=10, seed=1)
    assert len(chat.choices) == 2


def test_stop_strings(client) -> None:  # noqa: ANN001
    kw = dict(model="tiny", prompt="ROMEO:", max_tokens=40, temperature=0, extra_body={"repetition_penalty": 1.3})
    base = client.completions.create(**kw).choices[0].text
    stop = next(ch for ch in base[3:] if not ch.isspace())  # a character that occurs after the start
    cut = base[:base.index(stop)]
    r = client.completions.create(**kw, stop=[stop, "zzz"])
    assert r.choices[0].text == cut and r.choices[0].finish_reason == "stop"
    text, reasons, _ = stream_text(client.completions.create(**kw, stop=stop, stream=True))
    assert text == cut and reasons == ["stop"]
    two = base[len(cut):len(cut) + 2]  # a stop string spanning two tokens
    r = client.completions.create(**kw, stop=two)
    assert r.choices[0].text == base[:base.index(two)] and r.choices[0].finish_reason == "stop"


def test_logprobs_equal_eval_scores(client, gpt_run: Path) -> None:  # noqa: ANN001
    r = client.completions.create(model="tiny", prompt="ROMEO:", max_tokens=16, temperature=0.9, seed=3, logprobs=3)
    lp = r.choices[0].logprobs
    model = lmforge.load(gpt_run)
    tok = model.tokenizer
    ids = tok.encode("ROMEO:") + tok.encode(r.choices[0].text)
    assert len(ids) == 6 + len(lp.token_logprobs)
    x, y = torch.tensor([ids[:-1]]), torch.tensor([ids[1:]])
    with torch.no_grad():
        scores, _ = model.score(x, y)  # what lmforge eval sums, token by token
    assert lp.token_logprobs == pytest.approx(scores[0, 5:].tolist(), abs=1e-4)
    for token, top, tok_lp in zip(lp.tokens, lp.top_logprobs, lp.token_logprobs):
        assert len(top) <= 3 and max(top.values()) >= tok_lp - 1e-6 and top.get(token, tok_lp) == tok_lp
    chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=5,
                                          logprobs=True, top_logprobs=2)
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens and all(len(t.top_logprobs) == 2 for t in content)


def test_eight_concurrent_greedy_requests_equal_one_at_a_time(client) -> None:  # noqa: ANN001
    def ask(i: int) -> str:  # half of them with a repetition penalty (still greedy) for livelier text
        return client.completions.create(model="tiny", prompt=PROMPTS[i], max_tokens=10 + 4 * i, temperature=0,
                                         extra_body={"repetition_penalty": 1.3 if i % 2 else 1.0}).choices[0].text

    alone = [ask(i) for i in range(8)]
    together: list[str | None] = [None] * 8

    def worker(i: int) -> None:
        together[i] = ask(i)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert together == alone


def metric(server: Server, name: str) -> float:
    for line in httpx.get(server.url + "/metrics", timeout=10).text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no metric {name}")


def test_disconnect_frees_the_slot(server: Server) -> None:
    engine = server.app.state.lmforge["service"].engine
    body = {"model": "tiny", "prompt": "ROMEO:", "max_tokens": 90, "temperature": 1.0, "ignore_eos": True,
            "stream": True}
    cancelled_before = metric(server, 'lmforge_sequences_total{reason="cancelled"}') \
        if "cancelled" in httpx.get(server.url + "/metrics").text else 0.0
    engine_steps = []
    with httpx.Client(timeout=10) as h:
        with h.stream("POST", server.url + "/v1/completions", json=body) as resp:
            lines = resp.iter_lines()
            got = [next(lines) for _ in range(3)]  # a few events, then hang up
            assert got[0].startswith("data: ")
            assert engine.busy_slots == 1
            engine_steps.append(engine.steps)
    deadline = time.monotonic() + 5
    while engine.busy_slots and time.monotonic() < deadline:
        time.sleep(0.01)
    assert engine.busy_slots == 0
    assert metric(server, "lmforge_busy_slots") == 0
    assert metric(server, 'lmforge_sequences_total{reason="cancelled"}') == cancelled_before + 1


def test_non_streaming_disconnect_frees_the_slot(gpt_run: Path) -> None:
    """A client that gives up on a non-streamed answer: the server notices (it polls) and frees the slot."""
    svc = load_service(ServeConfig(model=str(gpt_run), parallel=1, name="tiny"))
    gate = threading.Event()
    real_step = svc.engine._step

    def slow_step() -> None:  # a slow model: one token per 50 ms until the test is done
        gate.wait(0.05)
        real_step()

    svc.engine._step = slow_step  # type: ignore[method-assign]
    with Server(ServeConfig(model=str(gpt_run), port=0, name="tiny"), service=svc) as srv:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(srv.url + "/v1/completions", timeout=0.5,
                       json={"prompt": "O", "max_tokens": 90, "ignore_eos": True})
        deadline = time.monotonic() + 5
        while svc.engine.busy_slots and time.monotonic() < deadline:
            time.sleep(0.02)
        assert svc.engine.busy_slots == 0
        text = httpx.get(srv.url + "/metrics").text
        assert [line for line in text.splitlines() if line.startswith("lmforge_sequences_total")] == [
            'lmforge_sequences_total{reason="cancelled"} 1.0']
        gate.set()


def test_metrics_endpoint(client, server: Server) -> None:  # noqa: ANN001
    client.completions.create(model="tiny", prompt="O", max_tokens=5, temperature=0)
    text = httpx.get(server.url + "/metrics").text
    for name in ("lmforge_requests_total", "lmforge_prompt_tokens_total", "lmforge_generation_tokens_total",
                 "lmforge_queue_depth", "lmforge_busy_slots", "lmforge_time_to_first_token_seconds_bucket",
                 "lmforge_time_per_output_token_seconds_bucket"):
        assert name in text, name
    assert metric(server, "lmforge_generation_tokens_total") >= 5
    assert 'endpoint="/v1/completions",status="200"' in text


def test_health_models_tokenize_detokenize(server: Server) -> None:
    h = httpx.get(server.url + "/health").json()
    assert h["status"] == "ok"
    m = httpx.get(server.url + "/v1/models").json()["data"][0]
    assert m["id"] == "tiny" and m["max_model_len"] == 96 and m["mode"] == "chat"
    ids = httpx.post(server.url + "/tokenize", json={"prompt": "hello"}).json()["tokens"]
    assert httpx.post(server.url + "/detokenize", json={"tokens": ids}).json()["prompt"] == "hello"
    page = httpx.get(server.url + "/")
    assert page.status_code == 200 and "<html" in page.text.lower()
    assert "http://" not in page.text and "https://" not in page.text  # self-contained: no external request


def error_of(resp: httpx.Response) -> dict:
    body = resp.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]


def test_errors_in_openai_shape(client, server: Server) -> None:  # noqa: ANN001
    url = server.url
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="tiny", prompt="x" * 100, max_tokens=5)
    assert "100 tokens, 5 more than" in str(e.value) and "shorten it by 5 tokens" in str(e.value)
    r = httpx.post(url + "/v1/completions", json={"prompt": "a", "temperature": -1})
    assert r.status_code == 422 and error_of(r)["param"] == "temperature"
    r = httpx.post(url + "/v1/completions", json={"prompt": "a", "n": "many"})
    assert r.status_code == 422 and error_of(r)["param"] == "n"
    r = httpx.post(url + "/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 422 and error_of(r)["type"] == "invalid_request_error"
    r = httpx.post(url + "/v1/completions", json={"prompt": "a", "model": "gpt-4"})
    assert r.status_code == 404 and error_of(r)["code"] == "model_not_found"
    r = httpx.post(url + "/v1/completions", json={"prompt": "a" * 70_000})
    assert r.status_code == 413 and "65536" in error_of(r)["message"]
    r = httpx.post(url + "/detokenize", json={"tokens": [10**9]})
    assert r.status_code == 400 and "outside the vocabulary" in error_of(r)["message"]
    r = httpx.post(url + "/v1/completions", json={"prompt": "a", "temperature": 1e-300, "max_tokens": 3})
    assert r.status_code == 200  # (the fuzzer found this one: z / T overflowed; now it is greedy)
    r = httpx.get(url + "/v1/nothing")
    assert r.status_code == 404 and error_of(r)
    assert httpx.get(url + "/health").status_code == 200  # still alive


def test_chat_without_template_is_a_clear_400(gpt_run: Path) -> None:
    with Server(ServeConfig(model=str(gpt_run), port=0, parallel=1)) as srv:
        c = openai.OpenAI(base_url=srv.url + "/v1", api_key="x", timeout=20, max_retries=0)
        with pytest.raises(openai.BadRequestError) as e:
            c.chat.completions.create(model=srv.app.state.lmforge["service"].name,
                                      messages=[{"role": "user", "content": "hi"}])
        assert "no chat template" in str(e.value)
        assert httpx.get(srv.url + "/v1/models").json()["data"][0]["mode"] == "complete"


def test_api_key_and_queue_full(gpt_run: Path) -> None:
    svc = load_service(ServeConfig(model=str(gpt_run), parallel=1, max_queue=1, name="tiny"))
    svc.engine.stop()  # hold the engine so that the queue fills deterministically
    cfg = ServeConfig(model=str(gpt_run), port=0, api_key="s3cret", name="tiny")
    srv = Server(cfg, service=svc).start()
    try:
        bad = openai.OpenAI(base_url=srv.url + "/v1", api_key="wrong", timeout=20, max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            bad.completions.create(model="tiny", prompt="a", max_tokens=2)
        assert httpx.get(srv.url + "/v1/models").status_code == 401
        assert httpx.get(srv.url + "/health").status_code == 200  # health needs no key
        good = openai.OpenAI(base_url=srv.url + "/v1", api_key="s3cret", timeout=20, max_retries=0)
        svc.engine.submit([1, 2], SamplingParams(max_tokens=2), lambda ev: None)  # fills the one queue place
        with pytest.raises(openai.RateLimitError) as e:
            good.completions.create(model="tiny", prompt="a", max_tokens=2)
        assert "queue is full" in str(e.value)
        svc.engine.start()  # drains: requests are served again
        assert good.completions.create(model="tiny", prompt="a", max_tokens=2).choices[0].text is not None
    finally:
        srv.stop()


def test_health_is_503_while_loading(gpt_run: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import lmforge.serve.app as app_module

    gate = threading.Event()
    real = app_module.load_service

    def slow_load(*a, **kw):  # noqa: ANN002, ANN003, ANN202
        gate.wait(20)
        return real(*a, **kw)

    monkeypatch.setattr(app_module, "load_service", slow_load)
    srv = Server(ServeConfig(model=str(gpt_run), port=0)).start(wait_ready=None)
    try:
        deadline = time.monotonic() + 10
        while not srv.uvicorn.started and time.monotonic() < deadline:
            time.sleep(0.01)
        r = httpx.get(srv.url + "/health")
        assert r.status_code == 503 and r.json()["status"] == "loading"
        assert httpx.post(srv.url + "/v1/completions", json={"prompt": "a"}).status_code == 503
        gate.set()
        while httpx.get(srv.url + "/health").status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert httpx.get(srv.url + "/health").status_code == 200
    finally:
        gate.set()
        srv.stop()


def test_non_loopback_without_key_warns(gpt_run: Path) -> None:
    with pytest.warns(UserWarning, match="without an API key"):
        srv = Server(ServeConfig(model=str(gpt_run), host="0.0.0.0", port=0))
    srv.sock.close()


def test_fuzz_openapi_schema_finds_no_5xx(server: Server) -> None:
    """schemathesis generates requests from the server's own OpenAPI schema: none may get a 5xx."""
    schemathesis = pytest.importorskip("schemathesis")
    from hypothesis import HealthCheck, settings

    schema = schemathesis.openapi.from_url(server.url + "/openapi.json")
    failures: list[str] = []
    count = 0
    for op in schema.get_all_operations():
        operation = op.ok()
        strategy = operation.as_strategy()

        @settings(max_examples=15, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck), derandomize=True)
        def check(case) -> None:  # noqa: ANN001
            nonlocal count
            count += 1
            resp = case.call(base_url=server.url, timeout=30)
            if resp.status_code >= 500:
                failures.append(f"{case.method} {case.path} {case.body!r} -> {resp.status_code} {resp.text[:200]}")

        from hypothesis import given

        given(strategy)(check)()
    assert count >= 40 and not failures, failures[:3]
    assert httpx.get(server.url + "/health").status_code == 200


# --- every family answers completions ---------------------------------------------------------------------
@pytest.mark.slow
def test_ngram_lstm_and_seq2seq_answer_completions(char_data: Path, tmp_path: Path) -> None:
    from lmforge.data.parallel import prepare_parallel

    runs = {}
    assert main(["train", "--model", "ngram", "--data", str(char_data), "--out", str(tmp_path / "ng"),
                 "--order", "3"]) == 0
    runs["ngram"] = tmp_path / "ng"
    assert main(["train", "--model", "lstm", "--preset", "tiny", "--data", str(char_data), "--out",
                 str(tmp_path / "lstm"), "--max-steps", "5", "--no-progress", "--eval-interval", "5",
                 "--eval-iters", "1"]) == 0
    runs["lstm"] = tmp_path / "lstm"
    tsv = tmp_path / "pairs.tsv"
    tsv.write_text("".join(f"{w} {v}\t{v} {w}\n" for w in ("a", "b", "c", "d", "e") for v in ("x", "y", "z")) * 20)
    prepare_parallel(str(tsv), tmp_path / "par", tokenizer="char", val_frac=0.1, test_frac=0.1, progress=False)
    assert main(["train", "--model", "seq2seq", "--preset", "tiny", "--data", str(tmp_path / "par"), "--out",
                 str(tmp_path / "s2s"), "--max-steps", "4", "--batch-size", "8", "--eval-interval", "4",
                 "--eval-iters", "1", "--n-embd", "32", "--max-target-length", "24", "--no-progress"]) == 0
    runs["seq2seq"] = tmp_path / "s2s"
    for family, run in runs.items():
        with Server(ServeConfig(model=str(run), port=0, name=family)) as srv:
            c = openai.OpenAI(base_url=srv.url + "/v1", api_key="x", timeout=30, max_retries=0)
            prompt = "a x" if family == "seq2seq" else "ROMEO:"
            extra = {"beam": 2} if family == "seq2seq" else {}
            r = c.completions.create(model=family, prompt=prompt, max_tokens=8, temperature=0, extra_body=extra)
            assert r.choices[0].finish_reason in ("stop", "length") and r.usage.prompt_tokens > 0, family
            text, reasons, _ = stream_text(c.completions.create(model=family, prompt=prompt, max_tokens=8,
                                                                temperature=0, stream=True, extra_body=extra))
            assert text == r.choices[0].text, family
            mode = httpx.get(srv.url + "/v1/models").json()["data"][0]["mode"]
            assert mode == ("translate" if family == "seq2seq" else "complete")
            if family == "seq2seq":
                assert text == lmforge.translate(run, prompt, beam=2, max_new_tokens=8)
                r = httpx.post(srv.url + "/v1/chat/completions",
                               json={"messages": [{"role": "user", "content": "a x"}]})
                assert r.status_code == 400 and "seq2seq" in error_of(r)["message"]
            else:
                ref = lmforge.generate(run, prompt, max_new_tokens=8, temperature=0, return_full_text=False)
                assert text == ref, family


def test_sse_wire_format(server: Server) -> None:
    with httpx.stream("POST", server.url + "/v1/chat/completions", timeout=20,
                      json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "stream": True}) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    first = json.loads(events[0][6:])
    assert first["object"] == "chat.completion.chunk" and first["choices"][0]["delta"]["role"] == "assistant"


def test_cli_options_and_errors(gpt_run: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    from lmforge.cli import build_parser, serve_config_from_args

    parser = build_parser()
    for command in ("serve", "batch"):
        sub = parser._subparsers._group_actions[0].choices[command]  # type: ignore[union-attr]
        assert all(a.help for a in sub._actions), [a.dest for a in sub._actions if not a.help]
    monkeypatch.setenv("LMFORGE_API_KEY", "from-env")
    cfg = serve_config_from_args(parser.parse_args(["serve", str(gpt_run), "--parallel", "2", "--dtype", "int8"]))
    assert cfg.api_key == "from-env" and cfg.host == "127.0.0.1" and cfg.parallel == 2 and cfg.dtype == "int8"
    assert serve_config_from_args(parser.parse_args(["serve", "m", "--api-key", "k"])).api_key == "k"
    builtin = serve_config_from_args(parser.parse_args(["serve", "m", "--template", "chatml"]))
    assert "<|im_start|>" in builtin.chat_template and "<|im_end|>" in builtin.chat_stop
    # a model that cannot be loaded: one line, exit code 2 (the server stops by itself)
    assert main(["serve", str(gpt_run.parent / "missing"), "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert "lmforge: error:" in err and "does not exist" in err and "Traceback" not in err
    assert main(["serve", str(gpt_run), "--port", "0", "--parallel", "0"]) == 2


def test_int8_and_bf16_engines_decode(gpt_run: Path) -> None:
    """The engine decodes with lmforge.generation.fast's layouts (--dtype): greedy under batching equals
    one-at-a-time decoding of the same prepared model."""
    from lmforge.generation.fast import prepare_for_decoding

    for dtype in ("bf16", "int8", "int4"):
        model = prepare_for_decoding(lmforge.load(gpt_run), dtype)
        refs = [lmforge.generate(model, p, max_new_tokens=10, temperature=0, return_full_text=False)
                for p in PROMPTS[:3]]
        svc = load_service(ServeConfig(model=str(gpt_run), parallel=3, dtype=dtype))
        assert svc.model.decode_dtype == dtype
        try:
            outs: list[str] = [""] * 3

            def one(i: int, engine: Engine, tok, outs: list[str]) -> None:  # noqa: ANN001
                outs[i] = run_engine(engine, tok, PROMPTS[i], max_tokens=10, temperature=0)[0]

            threads = [threading.Thread(target=one, args=(i, svc.engine, model.tokenizer, outs)) for i in range(3)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(60)
            assert all(outs), dtype
            # rounding differs with the batch shape in bf16/int8/int4, so only the first tokens must agree
            assert [o[:3] for o in outs] == [r[:3] for r in refs], dtype
        finally:
            svc.close()


def test_serve_a_lora_adapter(tmp_path: Path) -> None:
    """--adapter: a LoRA run of lmforge finetune is merged into its base and answers like lmforge.load(base,
    adapter=run) does."""
    from lmforge.hub.export import export_hf

    from .test_finetune import chat_tokenizer, ft_options, tiny_model

    base = export_hf(tiny_model(chat_tokenizer()), tmp_path / "base")
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Say {i}.", "completion": f" {i} {i}"}) + "\n" for i in range(30)),
                    encoding="utf-8")
    run = tmp_path / "lora"
    lmforge.finetune(base, data, run, **ft_options(max_steps=3, lr=5e-2))
    ref = lmforge.generate(lmforge.load(base, adapter=run), "Say 7.", max_new_tokens=8, temperature=0,
                           return_full_text=False)
    assert ref != lmforge.generate(lmforge.load(base), "Say 7.", max_new_tokens=8, temperature=0,
                                   return_full_text=False)  # the adapter changes the answer
    with Server(ServeConfig(model=str(base), adapter=str(run), port=0, parallel=1)) as srv:
        r = httpx.post(srv.url + "/v1/completions", json={"model": srv.app.state.lmforge["service"].name,
                                                          "prompt": "Say 7.", "max_tokens": 8, "temperature": 0},
                       timeout=60)
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == ref
