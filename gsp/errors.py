"""The project's one error base class.

A :class:`GspError` is a user-facing error: its message is one line naming the file, setting or
row that is wrong and what is allowed, so the CLI prints it as it is (``error: …``, exit
``exit_code``) instead of a traceback. Every module's user-facing errors derive
from it; most also derive from ``ValueError``/``RuntimeError``/``FileNotFoundError`` as they
did before, so callers that catch those keep working.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class GspError(Exception):
    """A user-facing error whose message is one line naming the file/setting/row."""

    #: The CLI's exit status for it: 2, the user gave something wrong (a subclass may differ).
    exit_code: int = 2


def did_you_mean(name: str, choices: Iterable) -> str:
    """' (did you mean 'x'?)' for the closest valid name, or '' when none is close."""
    close = difflib.get_close_matches(str(name), [str(c) for c in choices], n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""
