"""The web page of lmforge serve in a real browser (Playwright driving Debian's Chromium): type a message, see
the reply stream in, stop it mid-stream, regenerate, use the completion view; no request leaves 127.0.0.1."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest
import torch

from lmforge.serve import ServeConfig, Server

CHROMIUM = "/usr/bin/chromium"
LAUNCH_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync"]
SCREENSHOT = Path(__file__).resolve().parents[1] / "docs" / "img" / "serve-chat.png"
TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}assistant:{% endif %}")

sync_api = pytest.importorskip("playwright.sync_api")
pytestmark = [pytest.mark.timeout(180), pytest.mark.skipif(not shutil.which(CHROMIUM) and not Path(CHROMIUM).exists(),
                                                           reason="Debian's chromium is not installed")]


@pytest.fixture(scope="module")
def long_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random tiny GPT with a long context, whose end-of-text logit is pinned at 0 (greedy never ends early),
    so that a reply streams long enough to be stopped."""
    from lmforge.models.gpt import GPT, GPTConfig
    from lmforge.tokenizers import CharTokenizer
    from tests.conftest import sample_text

    tok = CharTokenizer.train([sample_text(20_000)], byte_fallback=False)
    torch.manual_seed(1)
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=2048, n_layer=2, n_head=2, n_embd=48, pos="rope",
                          norm="rmsnorm", tie_embeddings=False))
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)
        model.lm_head.weight[tok.eot_id] = 0.0
    model.tokenizer = tok
    out = tmp_path_factory.mktemp("page") / "tiny"
    model.save_pretrained(out)
    tpl = out.parent / "chat.jinja"
    tpl.write_text(TEMPLATE, encoding="utf-8")
    return out


def test_chat_page_streams_stops_regenerates_and_stays_local(long_run: Path) -> None:
    cfg = ServeConfig(model=str(long_run), port=0, parallel=2, name="tiny",
                      chat_template=TEMPLATE)
    with Server(cfg) as srv, sync_api.sync_playwright() as p:
        engine = srv.app.state.lmforge["service"].engine
        browser = p.chromium.launch(executable_path=CHROMIUM, args=LAUNCH_ARGS)
        try:
            # bypass_csp: the page's policy forbids eval, which wait_for_function uses for its probes
            page = browser.new_page(viewport={"width": 1180, "height": 720}, bypass_csp=True)
            requests: list[str] = []
            page.on("request", lambda r: requests.append(r.url))
            page.goto(srv.url + "/")
            page.wait_for_function("document.getElementById('model').textContent.includes('tiny')", timeout=20_000)
            for field, value in (("temperature", "0"), ("max_tokens", "1800"), ("system", "You are terse.")):
                page.fill(f"#{field}", value)
                page.dispatch_event(f"#{field}", "change")

            # type a message, see the reply stream in, stop it mid-stream
            page.fill("#input", "Good morrow, what news?")
            page.click("#send")
            page.wait_for_function("(() => { const m = document.querySelector('.msg.assistant.streaming');"
                                   " return m && m.textContent.length > 20; })()", timeout=30_000)
            assert page.is_enabled("#stop")
            page.click("#stop")
            page.wait_for_selector(".msg.assistant:not(.streaming)", timeout=10_000)
            reply = page.text_content(".msg.assistant") or ""
            assert reply.endswith("stopped") and 20 < len(reply) < 1800
            time.sleep(0.3)
            assert page.text_content(".msg.assistant") == reply  # nothing arrives after stop
            deadline = time.monotonic() + 5
            while engine.busy_slots and time.monotonic() < deadline:  # the aborted stream freed its slot
                time.sleep(0.02)
            assert engine.busy_slots == 0

            # the conversation is kept in the browser
            stored = json.loads(page.evaluate("localStorage.getItem('lmforge.conversations')"))
            assert stored[0]["messages"][0]["content"] == "Good morrow, what news?"

            # regenerate a shorter reply to the end: tokens/s shown
            page.fill("#max_tokens", "60")
            page.dispatch_event("#max_tokens", "change")
            page.click("#regenerate")
            page.wait_for_function("document.querySelector('.msg.assistant .meta') && document.querySelector("
                                   "'.msg.assistant .meta').textContent.includes('tok/s')", timeout=30_000)
            assert page.locator(".msg.assistant").count() == 1
            assert "60 tokens" in (page.text_content(".msg.assistant .meta") or "")
            assert "tok/s" in (page.text_content("#speed") or "")
            page.fill("#input", "And the king?")
            page.click("#send")
            page.wait_for_function("document.querySelectorAll('.msg.assistant .meta').length == 2", timeout=30_000)
            SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(SCREENSHOT))

            # the plain completion view
            page.click("#tab-complete")
            page.fill("#prompt", "ROMEO:")
            page.click("#complete")
            page.wait_for_function("document.querySelector('#completion .gen').textContent.length >= 60",
                                   timeout=30_000)

            page.reload()  # conversations survive a reload
            page.wait_for_selector("#convs li")
            assert page.locator("#convs li").count() == 1
            assert page.locator(".msg.user").count() == 2
        finally:
            browser.close()
    local = srv.url + "/"
    assert requests and all(u.startswith(local) for u in requests), [u for u in requests if not u.startswith(local)]
