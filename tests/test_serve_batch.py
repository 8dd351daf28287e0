"""lmforge batch: OpenAI batch files through the engine (all slots busy), resumable, bad lines reported."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import lmforge
from lmforge.cli import main
from tests.test_serve import gpt_run, template_file  # noqa: F401 - fixtures

pytestmark = pytest.mark.timeout(120)
PROMPTS = ["ROMEO:", "First Citizen:\nBefore we", "All:\nSpeak", "O", "What say you", "MENENIUS:\nWhy"]


def request(cid: str, prompt: str, max_tokens: int = 12, chat: bool = False) -> str:
    if chat:
        return json.dumps({"custom_id": cid, "method": "POST", "url": "/v1/chat/completions",
                           "body": {"messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
                                    "temperature": 0}})
    return json.dumps({"custom_id": cid, "method": "POST", "url": "/v1/completions",
                       "body": {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0}})


def results(path: Path) -> dict[str, dict]:
    out = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        obj = json.loads(line)
        assert obj["custom_id"] not in out
        out[obj["custom_id"]] = obj
    return out


def test_batch_runs_resumes_and_reports_bad_lines(gpt_run: Path, template_file: Path, tmp_path: Path,  # noqa: F811
                                                  capsys: pytest.CaptureFixture) -> None:
    model = lmforge.load(gpt_run)
    inp, out = tmp_path / "requests.jsonl", tmp_path / "results.jsonl"
    lines = [request(f"r{i}", p) for i, p in enumerate(PROMPTS[:4])]
    lines += [request("chat-1", "Who art thou?", chat=True),
              "{not json",
              json.dumps({"custom_id": "bad-url", "method": "POST", "url": "/v1/embeddings", "body": {}}),
              json.dumps({"custom_id": "too-long", "method": "POST", "url": "/v1/completions",
                          "body": {"prompt": "x" * 200}}),
              json.dumps({"custom_id": "bad-field", "method": "POST", "url": "/v1/completions",
                          "body": {"prompt": "a", "temperature": -3}}),
              request("r0", "duplicate id")]
    inp.write_text("\n".join(lines) + "\n", encoding="utf-8")
    args = ["batch", str(gpt_run), "--input", str(inp), "--output", str(out), "--parallel", "3",
            "--template", str(template_file), "--no-progress"]
    assert main(args) == 0
    assert "10 requests done (5 failed)" in capsys.readouterr().err
    res = results(out)
    assert set(res) == {"r0", "r1", "r2", "r3", "chat-1", "line-6", "bad-url", "too-long", "bad-field", "line-10"}
    assert res["line-10"]["error"]["code"] == "duplicate_custom_id"
    for i, p in enumerate(PROMPTS[:4]):
        body = res[f"r{i}"]["response"]["body"]
        assert res[f"r{i}"]["response"]["status_code"] == 200
        assert body["choices"][0]["text"] == lmforge.generate(model, p, max_new_tokens=12, temperature=0,
                                                            return_full_text=False)
    assert res["chat-1"]["response"]["body"]["choices"][0]["message"]["role"] == "assistant"
    assert res["line-6"]["error"]["code"] == "invalid_json"
    assert res["bad-url"]["error"]["code"] == "invalid_url"
    assert res["too-long"]["response"]["status_code"] == 400
    assert "more than this model's context" in res["too-long"]["response"]["body"]["error"]["message"]
    assert res["bad-field"]["response"]["status_code"] == 422
    first = out.read_text(encoding="utf-8")

    # resume: an interrupted write (half a line) is dropped and redone, finished requests are skipped
    extra = [request(f"r{i}", p) for i, p in enumerate(PROMPTS[4:], start=4)]
    inp.write_text("\n".join(lines + extra) + "\n", encoding="utf-8")
    out.write_text(first + '{"id": "batch_req_x", "custom_id": "r4", "respo', encoding="utf-8")
    assert main(args) == 0
    assert "2 requests done (0 failed), 10 already in" in capsys.readouterr().err
    text = out.read_text(encoding="utf-8")
    assert text.startswith(first)
    res = results(out)
    assert res["r5"]["response"]["body"]["choices"][0]["text"] == lmforge.generate(model,
        PROMPTS[5], max_new_tokens=12, temperature=0, return_full_text=False)
    assert len(res) == 12


def test_batch_never_clobbers_an_unrelated_file(gpt_run: Path, tmp_path: Path,  # noqa: F811
                                                capsys: pytest.CaptureFixture) -> None:
    inp, out = tmp_path / "requests.jsonl", tmp_path / "notes.txt"
    inp.write_text(request("a", "O") + "\n", encoding="utf-8")
    out.write_text("my precious notes\n", encoding="utf-8")
    assert main(["batch", str(gpt_run), "--input", str(inp), "--output", str(out), "--no-progress"]) == 2
    assert "would not be overwritten" in capsys.readouterr().err
    assert out.read_text(encoding="utf-8") == "my precious notes\n"
    assert main(["batch", str(gpt_run), "--input", str(tmp_path / "missing.jsonl"), "--output",
                 str(tmp_path / "o.jsonl"), "--no-progress"]) == 2
