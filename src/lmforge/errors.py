"""User-facing errors.

Anything a user can get wrong (a path, a name, a number) raises :class:`LMForgeError` with a
one-line message that says what was wrong, where, and what to do. The CLI prints it as
``lmforge: error: ...`` and exits with code 2; the Python API lets it propagate.
"""

from __future__ import annotations


class LMForgeError(Exception):
    """A clear, one-line error caused by bad input (exit code 2 on the command line)."""

    exit_code = 2

    def __init__(self, message: str) -> None:
        # Keep it to one line: multi-line messages are folded so the CLI prints a single line.
        super().__init__(" ".join(str(message).split()))


def first_line(error: BaseException, limit: int = 120) -> str:
    """The first line of a library's exception message, for a one-line error (its type name when empty)."""
    lines = str(error).strip().splitlines()
    return lines[0][:limit] if lines else type(error).__name__
