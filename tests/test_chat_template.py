"""Chat templates come from model files: they are rendered sandboxed and never run code."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from lmforge import load
from lmforge.apps.chat import ChatSession
from lmforge.cli import main
from lmforge.errors import LMForgeError
from lmforge.tokenizers.chat_template import ChatTemplate

EVIL = "{{ cycler.__init__.__globals__.os.popen('id > PWNED.txt').read() }}{{ messages[0]['content'] }}"


def test_sandbox_refuses_code_execution(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(LMForgeError, match="unsafe operation") as e:
        ChatTemplate(EVIL).render([{"role": "user", "content": "hi"}])
    assert "\n" not in str(e.value)
    assert not (tmp_path / "PWNED.txt").exists()


def test_template_errors_are_one_line() -> None:
    with pytest.raises(LMForgeError, match="syntax error at line 1"):
        ChatTemplate("{% for m in messages %}")
    with pytest.raises(LMForgeError, match="refused the conversation: no system"):
        ChatTemplate("{{ raise_exception('no system') }}").render([])
    msgs = [{"role": "user", "content": "hi"}]
    with pytest.raises(LMForgeError, match="unsafe"):  # the immutable sandbox: no mutation of the inputs
        ChatTemplate("{{ messages.append(1) }}").render(msgs)
    assert msgs == [{"role": "user", "content": "hi"}]


def test_chatml_renders() -> None:
    tpl = ChatTemplate("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                       "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    out = tpl.render([{"role": "user", "content": "hi"}])
    assert out == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_evil_template_from_a_model_directory(trained_run: Path, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch,
                                              capsys: pytest.CaptureFixture) -> None:
    hf_dir = tmp_path / "hf"
    assert main(["export", str(trained_run), "--format", "hf", "--out", str(hf_dir)]) == 0
    conf_path = hf_dir / "tokenizer_config.json"
    conf = json.loads(conf_path.read_text()) if conf_path.exists() else {}
    conf["chat_template"] = EVIL
    conf_path.write_text(json.dumps(conf))
    assert load(hf_dir).chat_template == EVIL  # the Hugging Face path reads tokenizer_config.json's template
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    assert main(["chat", str(hf_dir), "--chat", "hi", "--max-new-tokens", "2"]) == 2
    err = capsys.readouterr().err
    assert "unsafe operation" in err and len(err.strip().splitlines()) == 1
    assert not any(p.name == "PWNED.txt" for p in tmp_path.rglob("*")) and not os.path.exists("PWNED.txt")


def test_session_uses_sandbox(trained_run: Path) -> None:
    with pytest.raises(LMForgeError, match="unsafe"):
        ChatSession(load(trained_run), template=EVIL, max_new_tokens=2).ask("hi")


@pytest.mark.parametrize("template, message", [
    ("{{ 1 / 0 }}", "failed to render"),
    ("{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}", "failed to render"),  # unbounded recursion
    ("{{ ''.__class__.__mro__[1].__subclasses__() }}", "unsafe operation"),
    ("{% for m in messages %}{{ m.content }", "syntax error"),
])
def test_broken_templates_one_line(template: str, message: str) -> None:
    with pytest.raises(LMForgeError, match=message) as e:
        ChatTemplate(template).render([{"role": "user", "content": "hi"}])
    assert "\n" not in str(e.value)
