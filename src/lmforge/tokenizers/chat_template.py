"""Chat templates: Jinja programs that turn a list of {"role", "content"} messages into a prompt.

A template comes from a model file (a GGUF's metadata, a Hugging Face ``tokenizer_config.json``) or from the
user, so it is untrusted code. It is rendered in Jinja's ``ImmutableSandboxedEnvironment`` (as transformers
does): no attribute starting with ``_``, no access to Python internals (``cycler.__init__.__globals__.os``),
no mutation of the objects passed in. Anything a template does wrong (a syntax error, an unsafe access, a
``raise_exception`` call) becomes a one-line :class:`LMForgeError`.
"""

from __future__ import annotations

from typing import Any

from ..errors import LMForgeError


def _raise_exception(message: str) -> None:
    raise LMForgeError(f"the chat template refused the conversation: {message}")


class ChatTemplate:
    """A compiled, sandboxed chat template. ``source`` names where it came from, for error messages."""

    def __init__(self, text: str, source: str = "the chat template") -> None:
        import jinja2
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        if not isinstance(text, str) or not text.strip():
            raise LMForgeError(f"{source} is empty or not text")
        self.text, self.source = text, source
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=["jinja2.ext.loopcontrols"])
        env.globals["raise_exception"] = _raise_exception
        try:
            self._template = env.from_string(text)
        except jinja2.TemplateSyntaxError as e:
            raise LMForgeError(f"{source} has a syntax error at line {e.lineno}: {e.message}") from None

    def render(self, messages: list[dict[str, str]], add_generation_prompt: bool = True,
               **extra: Any) -> str:
        import jinja2
        from jinja2.sandbox import SecurityError

        kwargs = {"bos_token": "", "eos_token": "", **extra}
        try:
            return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt, **kwargs)
        except LMForgeError:
            raise
        except SecurityError as e:
            raise LMForgeError(f"{self.source} tried an unsafe operation and was stopped ({e})") from None
        except (jinja2.TemplateError, TypeError, ValueError, KeyError, AttributeError, IndexError, ArithmeticError,
                RecursionError) as e:
            raise LMForgeError(f"{self.source} failed to render ({type(e).__name__}: {e})") from None
