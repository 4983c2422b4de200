"""Text from a run folder made safe for a terminal: control characters are shown, not obeyed.

A run folder is data anyone can write: a layer named ``"\\x1b]0;owned\\x07\\x1b[2J"`` would set
the terminal's title and clear the screen if printed raw. :func:`printable` replaces every
control character (Unicode category Cc: C0, DEL, C1) and every bidirectional override or
isolate (which can make text read in another order than it is stored) with a visible escape
in Python's notation (``\\x1b``, ``\\u202e``); all other text, including non-ASCII names, is
kept as written.
"""

from __future__ import annotations

import unicodedata

#: Bidirectional embedding, override and isolate controls (Unicode category Cf).
BIDI_CONTROLS = frozenset("\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


def _escape(ch: str) -> str:
    code = ord(ch)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def printable(text: object) -> str:
    """``str(text)`` with control and bidi characters written as escapes (see module doc)."""
    s = str(text)
    if s.isprintable() and not BIDI_CONTROLS.intersection(s):
        return s  # the common case: nothing to escape
    return "".join(
        _escape(ch)
        if unicodedata.category(ch) == "Cc" or ch in BIDI_CONTROLS
        else ch
        for ch in s
    )
