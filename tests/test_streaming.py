"""Streaming (issue #18): TextStream shows no special-token text, no partial stop string, no half character,
and streamed text == non-streamed text, on a tiny Llama whose chat template and end-of-turn token are SmolLM2's."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lmforge import load
from lmforge.apps.chat import ChatSession, open_session, repl
from lmforge.cli import main
from lmforge.errors import LMForgeError
from lmforge.generation import GenerationConfig, TextStream, generate_ids, generate_text
from lmforge.tokenizers import CharTokenizer

transformers = pytest.importorskip("transformers")

SMOLLM2_TEMPLATE = (  # SmolLM2-135M-Instruct's template, as its GGUF and tokenizer_config.json carry it
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\n"
    "You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TEXT = ("The capital of France is Paris. The sea is wide and deep. User: hello there, how are you? "
        "Café au lait, naïve, 日本語, emoji 😀 and more text about ships.\n") * 30


def tiny_smollm2(directory: Path, never_end: bool = False) -> Path:
    """A random 2-layer LlamaForCausalLM + byte-level BPE with SmolLM2's special tokens and template, saved as a
    Hugging Face directory. ``never_end``: the special tokens' output rows are zeroed, so greedy decoding never
    picks them (a reply that runs until stopped)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([TEXT], trainers.BpeTrainer(vocab_size=320, special_tokens=SPECIALS,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=tok.get_vocab_size(), hidden_size=48, intermediate_size=80, num_hidden_layers=2,
        num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=False))
    if never_end:
        with torch.no_grad():
            hf.lm_head.weight[[tok.token_to_id(s) for s in SPECIALS]] = 0.0
    hf.save_pretrained(directory, safe_serialization=True)
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps(
        {"eos_token": "<|im_end|>", "bos_token": "<|im_start|>", "chat_template": SMOLLM2_TEMPLATE}))
    return directory


@pytest.fixture(scope="module")
def smol_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_smollm2(tmp_path_factory.mktemp("tiny-smollm2"))


@pytest.fixture(scope="module")
def scripted(smol_dir: Path):  # noqa: ANN201
    """The tiny model with its output rows edited so that greedy decoding of the first chat prompt says
    <|im_start|> mid-reply and ends with <|im_end|>, as a chat model does."""
    model = load(smol_dir)
    tok = model.tokenizer
    start, end = tok.hf.token_to_id("<|im_start|>"), tok.eot_id
    prompt = tok.encode(ChatSession(model).template.render([{"role": "user", "content": "Hi"}]))
    greedy = GenerationConfig(max_new_tokens=12, temperature=0, ignore_eos=True)
    with torch.no_grad():
        w = model.lm_head.weight
        w[start] = 1.5 * w[generate_ids(model, prompt, greedy)[0][2]]
        w[end] = 1.5 * w[generate_ids(model, prompt, greedy)[0][7]]
    ids = generate_ids(model, prompt, greedy)[0]
    assert start in ids and end in ids and ids.index(start) < ids.index(end), ids
    return model


def test_special_ids(smol_dir: Path) -> None:
    tok = load(smol_dir).tokenizer
    assert tok.eot_id == tok.hf.token_to_id("<|im_end|>")
    assert tok.special_ids == frozenset(tok.hf.token_to_id(s) for s in SPECIALS)
    assert CharTokenizer("ab").special_ids == frozenset({0})


def test_chat_stream_equals_reply_and_history(scripted) -> None:  # noqa: ANN001
    chunks: list[str] = []
    s = ChatSession(scripted, max_new_tokens=40, temperature=0)
    reply = s.ask("Hi", on_text=chunks.append)
    assert chunks and "".join(chunks) == reply
    assert not any("<|" in c or "|>" in c for c in chunks)
    assert s.messages[-1] == {"role": "assistant", "content": reply}
    # the non-streamed paths agree exactly, and the next prompt carries the reply as shown, then the end of turn
    assert ChatSession(scripted, max_new_tokens=40, temperature=0).ask("Hi") == reply
    raw = generate_text(scripted, s.template.render(s.messages[:-1]), max_new_tokens=40, temperature=0,
                        return_full_text=False)
    assert raw.strip() == reply and "<|" not in raw
    s.messages.append({"role": "user", "content": "More"})
    assert f"{reply}<|im_end|>\n<|im_start|>user\nMore" in s.prompt()


def test_generate_text_stream_equals_return(scripted) -> None:  # noqa: ANN001
    prompt = ChatSession(scripted).template.render([{"role": "user", "content": "Hi"}])
    out = io.StringIO()
    streamed = generate_text(scripted, prompt, max_new_tokens=40, temperature=0, return_full_text=False,
                             stream=out)
    assert out.getvalue() == streamed == generate_text(scripted, prompt, max_new_tokens=40, temperature=0,
                                                       return_full_text=False)
    assert "<|" not in streamed


def test_cli_paths_agree(smol_dir: Path, capsys: pytest.CaptureFixture) -> None:
    common = ["--max-new-tokens", "24"]
    assert main(["chat", str(smol_dir), "--chat", "Hi", *common]) == 0
    one_shot = capsys.readouterr().out
    assert main(["generate", str(smol_dir), "--chat", "Hi", "--stream", "--temperature", "0", *common]) == 0
    assert capsys.readouterr().out == one_shot
    assert main(["generate", str(smol_dir), "--chat", "Hi", "--temperature", "0", *common]) == 0
    assert capsys.readouterr().out == one_shot
    assert main(["generate", str(smol_dir), "--prompt", "The sea", "--stream", "--temperature", "0",
                 "--stop", "e", *common]) == 0
    streamed = capsys.readouterr().out
    assert main(["generate", str(smol_dir), "--prompt", "The sea", "--temperature", "0", "--stop", "e",
                 *common]) == 0
    assert capsys.readouterr().out == streamed and "<|" not in streamed


def test_repl_shows_what_history_keeps(smol_dir: Path) -> None:
    s = ChatSession(load(smol_dir), max_new_tokens=16, temperature=0)
    out = io.StringIO()
    repl(s, io.StringIO("/help\n/system Be brief.\nfirst line \\\nsecond line\n/stats\nHi\n/bogus\n/exit\n"), out)
    text = out.getvalue()
    assert "/save FILE" in text and "(system prompt set)" in text and "(stats on)" in text
    assert "tokens/s)" in text and "unknown command /bogus" in text and "<|" not in text
    assert [m["role"] for m in s.messages] == ["system", "user", "assistant", "user", "assistant"]
    assert s.messages[1]["content"] == "first line \nsecond line"
    for m in s.messages[2::2]:
        assert f"> {m['content']}\n" in text or f"... {m['content']}\n" in text


def test_stop_string_split_across_tokens_is_never_partly_shown(smol_dir: Path) -> None:
    tok = load(smol_dir).tokenizer
    text = "The sea is wide. User: hello there"
    ids = tok.encode(text)
    pieces = [tok.decode([i]) for i in ids]
    assert not any("User:" in p for p in pieces)  # the stop string spans several tokens
    stream = TextStream(tok, (), ["User:"])
    shown = [stream.push(i) for i in ids]
    shown.append(stream.finish())
    assert "".join(shown) == stream.text == "The sea is wide. "
    assert stream.stopped and not any("U" in p for p in shown)
    # a stop string that was never completed: its beginning at the very end is not shown either
    s2 = TextStream(tok, (), ["User: bye"])
    pieces = [s2.push(i) for i in ids[:ids.index(tok.encode(" hello")[0])]] + [s2.finish()]
    assert "".join(pieces) == s2.text == "The sea is wide. " and not any("U" in p for p in pieces)


def test_utf8_is_held_until_complete() -> None:
    tok = CharTokenizer("ab")  # é and 😀 are byte-fallback tokens, one byte each
    ids = tok.encode("aé😀b")
    stream = TextStream(tok)
    shown = [stream.push(i) for i in ids]
    assert [p for p in shown if p] == ["a", "é", "😀", "b"] and "\ufffd" not in "".join(shown)
    assert stream.finish() == "" and stream.text == "aé😀b"


def test_word_tokenizer_keeps_the_space_after_the_prompt() -> None:
    from lmforge.tokenizers.word import WordTokenizer

    tok = WordTokenizer(["the", "sea", "is", "wide"])
    prompt, reply = tok.encode("the sea"), tok.encode("is wide")
    stream = TextStream(tok, prompt)
    assert "".join(stream.push(i) for i in reply) + stream.finish() == " is wide"
    stream = TextStream(tok, tok.encode("the sea\n"))
    assert "".join(stream.push(i) for i in reply) == "is wide"


@settings(max_examples=150, deadline=None)
@given(ids=st.lists(st.integers(0, 3 + 256), max_size=30), stops=st.lists(st.sampled_from(["ab", "b\n", "ba",
       "aaa", "é"]), max_size=2), prompt=st.lists(st.integers(1, 3), max_size=3))
def test_stream_matches_full_decode(ids: list[int], stops: list[str], prompt: list[int]) -> None:
    """Any ids, with bytes that make half characters: the pieces shown concatenate to the full decode of the
    ids (special ones skipped, ended at the first end token) cut at the first stop string, minus a trailing
    partial stop string; every prefix of the pieces is a prefix of that."""
    tok = CharTokenizer("ab\n")
    stream = TextStream(tok, prompt, stops)
    shown = ""
    for i in ids:
        shown += stream.push(i)
        assert stream.text == shown
    shown += stream.finish()
    body = ids[:ids.index(0)] if 0 in ids else ids
    full = tok.decode(body)
    cuts = [full.find(s) for s in stops if s in full]
    if cuts:
        full = full[:min(cuts)]
    else:
        keep = max((k for s in stops for k in range(1, len(s)) if full.endswith(s[:k])), default=0)
        full = full[:len(full) - keep]
    assert shown == stream.text == full


def test_no_template(trained_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    model = load(trained_run)
    s = ChatSession(model, max_new_tokens=5, temperature=0)
    assert not s.chat
    s.ask("ROMEO:")
    assert s.prompt() == "ROMEO:"
    assert main(["generate", str(trained_run), "--chat", "hi"]) == 2
    err = capsys.readouterr().err
    assert "no chat template" in err and f"lmforge generate {trained_run} --prompt TEXT" in err
    assert main(["chat", str(trained_run), "--chat", "ROMEO:", "--max-new-tokens", "5"]) == 0
    assert "no chat template" in capsys.readouterr().err
    chatml = open_session(model, "chatml", max_new_tokens=5)
    assert chatml.chat and chatml.prompt().endswith("<|im_start|>assistant\n") and "<|im_end|>" in chatml.gen["stop"]
    (tmp_path / "t.jinja").write_text("{% for m in messages %}[{{ m['content'] }}]{% endfor %}>")
    custom = open_session(model, str(tmp_path / "t.jinja"))
    custom.messages.append({"role": "user", "content": "x"})
    assert custom.prompt() == "[x]>"
    (tmp_path / "evil.jinja").write_text("{{ cycler.__init__.__globals__.os }}")
    with pytest.raises(LMForgeError, match="unsafe"):
        open_session(model, str(tmp_path / "evil.jinja")).prompt()
    with pytest.raises(LMForgeError, match="not a built-in template"):
        open_session(model, "nope")


def _read_until(fd: int, buf: bytearray, pattern: bytes, timeout: float = 60.0, at_least: int = 0) -> str:
    """Read the terminal into ``buf`` until ``pattern`` appears after what was already there (and at least
    ``at_least`` bytes came)."""
    import os
    import select
    import time

    start, deadline = len(buf), time.monotonic() + timeout
    while pattern not in buf[start:] or len(buf) - start < at_least:
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"no {pattern!r} on the terminal within {timeout}s; got {bytes(buf[start:])!r}")
        if select.select([fd], [], [], left)[0]:
            try:
                buf += os.read(fd, 4096)
            except OSError:  # the other side closed
                raise AssertionError(f"terminal closed before {pattern!r}; got {bytes(buf[start:])!r}") from None
    return buf[start:].decode("utf-8", "replace").replace("\r\n", "\n")


@pytest.mark.slow
def test_repl_in_a_terminal_ctrl_c_and_save(tmp_path: Path) -> None:
    """Drive ``lmforge chat`` through a pseudo-terminal: Ctrl-C stops a reply that would run for 100k tokens and
    leaves the REPL running; /save writes what was shown and refuses to overwrite."""
    import fcntl
    import os
    import subprocess
    import sys
    import termios

    model_dir = tiny_smollm2(tmp_path / "model", never_end=True)
    master, slave = os.openpty()

    def controlling_terminal() -> None:  # so that Ctrl-C on the terminal sends SIGINT to the REPL
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)

    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src"), "TERM": "dumb"}
    proc = subprocess.Popen([sys.executable, "-m", "lmforge.cli", "chat", str(model_dir), "--max-new-tokens",
                             "100000"], stdin=slave, stdout=slave, stderr=slave, cwd=tmp_path, env=env,
                            start_new_session=True, preexec_fn=controlling_terminal)
    os.close(slave)
    buf = bytearray()
    try:
        _read_until(master, buf, b"/exit quits.\r\n> ")
        os.write(master, b"Hi\r")
        _read_until(master, buf, b"Hi\r\n")
        start = len(buf)
        _read_until(master, buf, b"", at_least=40)  # the reply is streaming
        os.write(master, b"\x03")
        _read_until(master, buf, b"(stopped)\r\n> ")
        shown = buf[start:].decode("utf-8", "replace").replace("\r\n", "\n").replace("^C", "")
        assert proc.poll() is None  # still in the REPL
        os.write(master, b"/save conv.json\r")
        assert "(saved 2 messages to conv.json)" in _read_until(master, buf, b"> ")
        messages = json.loads((tmp_path / "conv.json").read_text())
        assert [m["role"] for m in messages] == ["user", "assistant"] and messages[0]["content"] == "Hi"
        assert messages[1]["content"] and shown.startswith(messages[1]["content"] + "\n(stopped)")
        os.write(master, b"/save conv.json\r")
        assert "conv.json exists; not overwritten" in _read_until(master, buf, b"> ")
        os.write(master, b"/exit\r")
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        os.close(master)
