"""Incremental detokenization: the text of a sequence that is safe to show while it is being generated.

Decoding one token at a time and concatenating is wrong three ways: a byte-level token may hold half a UTF-8
character, some decoders depend on the previous token (word tokenizers put a space between words,
SentencePiece drops the first word's leading space), and a stop string may arrive split over several tokens.
So, as in text-generation-inference, each step decodes a short window of ids, ``ids[prefix:]``, and shows what
it adds over ``ids[prefix:read]`` (the part already shown), unless that ends in an incomplete character
(U+FFFD). Text that could still become a stop string is held back; special tokens (end of turn, end of text,
``<|im_start|>``...) are never decoded for display at all.

Both ``generate_text`` and every streamed path (``chat``, ``generate --stream``, the server) go through
:class:`TextStream`, so streamed and non-streamed replies cannot differ.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import Any

_PROMPT_CONTEXT = 4  # prompt tokens decoded with the reply: enough for a word tokenizer's space, a SentencePiece prefix


class TextStream:
    """Incremental detokenizer for ONE sequence: feed generated token ids one at a time, get the text that is
    safe to show now. Never yields special-token text, never yields a partial stop string, holds back
    incomplete UTF-8; `text` after `finish()` equals the non-streamed decode of the same ids cut at the first
    stop string (what generate_text returns).

    ``end_ids`` (keyword only): ids that end the sequence (``stopped`` becomes True, later pushes are ignored);
    default the tokenizer's end-of-text token, ``()`` to run past it (``ignore_eos``).
    """

    def __init__(self, tokenizer: Any, prompt_ids: Sequence[int] = (), stop: Sequence[str] = (), *,
                 end_ids: Collection[int] | None = None) -> None:
        self.tokenizer = tokenizer
        self.special = tokenizer.special_ids
        self.end_ids = frozenset({tokenizer.eot_id} if end_ids is None else end_ids)
        self.stop = [s for s in stop if s]
        # The window: the prompt's last tokens (the decoder's left context only), then the visible reply ids.
        self._ids = [int(i) for i in prompt_ids][-_PROMPT_CONTEXT:]
        self._prefix = 0                  # window start
        self._read = len(self._ids)       # ids[prefix:read] has been turned into text already
        self._held = ""                   # decoded text not shown yet: it may start a stop string
        self._text = ""
        self._stopped = False
        self._finished = False
        self.n_tokens = 0                 # ids pushed before the sequence ended (special ones included)

    @property
    def text(self) -> str:
        """All visible text so far."""
        return self._text

    @property
    def stopped(self) -> bool:
        """A stop string (or a special end token) was reached; later pushes yield nothing."""
        return self._stopped

    def push(self, token_id: int) -> str:
        """Add one generated id; return the newly visible text ('' when held back)."""
        if self._stopped:
            return ""
        self.n_tokens += 1
        token_id = int(token_id)
        if token_id in self.end_ids:
            self._stopped = True
            return ""
        if token_id in self.special:
            return ""
        self._ids.append(token_id)
        shown = self.tokenizer.decode(self._ids[self._prefix:self._read])
        full = self.tokenizer.decode(self._ids[self._prefix:])
        if len(full) <= len(shown) or full.endswith("\ufffd"):
            return ""  # an incomplete character (or nothing yet): wait for the next token
        self._prefix, self._read = self._read, len(self._ids)
        return self._release(full[len(shown):])

    def finish(self) -> str:
        """The sequence is over: flush what was held back (an incomplete character decodes as U+FFFD, as in
        the full decode), minus any partial stop string at the very end. Later calls return ''."""
        if self._finished:
            return ""
        self._finished = True
        rest = self.tokenizer.decode(self._ids[self._prefix:])[len(self.tokenizer.decode(
            self._ids[self._prefix:self._read])):]
        self._prefix = self._read = len(self._ids)
        out = self._release(rest)
        self._held = ""   # what remains is a proper prefix of a stop string: never shown
        self._stopped = True
        return out

    def _release(self, new: str) -> str:
        """Show ``held + new`` up to the first stop string, keeping back a tail that may begin one."""
        buf = self._held + new
        cut = min((i for i in (buf.find(s) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            out, self._held, self._stopped = buf[:cut], "", True
        else:
            keep = max((k for s in self.stop for k in range(min(len(s) - 1, len(buf)), 0, -1)
                        if buf.endswith(s[:k])), default=0)
            out, self._held = buf[:len(buf) - keep], buf[len(buf) - keep:]
        self._text += out
        return out


__all__ = ["TextStream"]
