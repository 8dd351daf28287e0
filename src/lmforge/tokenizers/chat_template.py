"""Chat templates: Jinja programs that turn a list of {"role", "content"} messages into a prompt.

A template comes from a model file (a GGUF's metadata, a Hugging Face ``tokenizer_config.json``) or from the
user, so it is untrusted code. It is rendered in Jinja's ``ImmutableSandboxedEnvironment`` (as transformers
does): no attribute starting with ``_``, no access to Python internals (``cycler.__init__.__globals__.os``),
no mutation of the objects passed in. Anything a template does wrong (a syntax error, an unsafe access, a
``raise_exception`` call) becomes a one-line :class:`LMForgeError`.
"""

from __future__ import annotations

from pathlib import Path
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


FALLBACK_TEMPLATE = ("{% for m in messages %}{{ m['role'] | capitalize }}: {{ m['content'] }}\n{% endfor %}"
                     "{% if add_generation_prompt %}Assistant:{% endif %}")

# Built-in templates for --template NAME: (Jinja text, end-of-turn stop strings for models that lack the token).
TEMPLATES = {
    "chatml": ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
               "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}",
               ["<|im_end|>", "<|im_start|>"]),
    "simple": (FALLBACK_TEMPLATE, ["\nUser:"]),
}


def load_template(spec: str) -> tuple[ChatTemplate, list[str]]:
    """``--template NAME|FILE``: a built-in template or a Jinja file, compiled sandboxed."""
    if spec in TEMPLATES and not Path(spec).exists():
        text, stop = TEMPLATES[spec]
        return ChatTemplate(text, f"the built-in {spec!r} template"), list(stop)
    path = Path(spec)
    if not path.is_file():
        raise LMForgeError(f"--template {spec}: no such file and not a built-in template "
                           f"({', '.join(TEMPLATES)}); give a name or a Jinja file")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise LMForgeError(f"--template {spec}: cannot read it ({e})") from None
    return ChatTemplate(text, f"template file {spec}"), []


__all__ = ["ChatTemplate", "FALLBACK_TEMPLATE", "TEMPLATES", "load_template"]
