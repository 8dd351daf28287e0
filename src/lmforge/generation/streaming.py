"""Incremental detokenization of ONE generated sequence (minimal version; the `chat` branch brings the full one).

Decoding token by token must give exactly the text of decoding the whole sequence at once, cut at the first
stop string. Three things make that harder than ``decode([id])``: a token can end inside a UTF-8 character
(held back until complete), a stop string can span tokens (text that could still become a stop string is held
back), and word-level tokenizers join tokens with spaces (the text is decoded with the prompt, then the
prompt's own text is dropped).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


class TextStream:
    """Incremental detokenizer for ONE sequence: feed generated token ids one at a time, get the text that is
    safe to show now. Never yields special-token text, never a partial stop string, holds back incomplete UTF-8;
    `text` after `finish()` equals the non-streamed decode cut at the first stop string."""

    def __init__(self, tokenizer: Any, prompt_ids: Sequence[int] = (), stop: Sequence[str] = ()) -> None:
        self.tokenizer = tokenizer
        self.prompt_ids = list(prompt_ids)
        self.stop = [s for s in stop if s]
        self._head = tokenizer.decode(self.prompt_ids) if self.prompt_ids else ""
        self._special = {tokenizer.eot_id}
        self.ids: list[int] = []
        self._text = ""       # text decoded so far (complete characters, cut at a stop string)
        self._shown = 0       # how much of it was returned
        self._stopped = False

    def _decoded(self) -> str:
        if self.prompt_ids:  # decode with the prompt, then drop it: word tokenizers put a space between
            return self.tokenizer.decode(self.prompt_ids + self.ids)[len(self._head):]
        return self.tokenizer.decode(self.ids)

    def push(self, token_id: int) -> str:
        if self._stopped:
            return ""
        if token_id in self._special:
            self._stopped = True
            return ""
        self.ids.append(int(token_id))
        text = self._decoded()
        if text.endswith("\ufffd"):  # an incomplete UTF-8 character: wait for its other bytes
            return ""
        cut = min((i for i in (text.find(s) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            self._text, self._stopped = text[:cut], True
            return self._take(len(self._text))
        self._text = text
        # hold back a tail that could still grow into a stop string
        hold = max((k for s in self.stop for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
        return self._take(len(text) - hold)

    def _take(self, upto: int) -> str:
        out = self._text[self._shown:upto] if upto > self._shown else ""
        self._shown = max(self._shown, upto)
        return out

    def finish(self) -> str:
        if not self._stopped:
            text = self._decoded()
            self._text = text[:-1] if text.endswith("\ufffd") else text
        return self._take(len(self._text))

    @property
    def text(self) -> str:
        return self._text

    @property
    def stopped(self) -> bool:
        return self._stopped


__all__ = ["TextStream"]
