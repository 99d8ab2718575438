"""Text from outside (webhook payloads, git, processes) made safe to keep and to show.

Such text ends up in the store and on terminals (``branchyard events``), so it is
bounded in length and freed of control characters: an ESC in a URL must not set
a terminal's title or clear its screen. A control character is not dropped but
shown as its escape (``\\x1b``), so the text still says what was sent.
"""

from __future__ import annotations

import re

FIELD_LIMIT = 512  # characters kept of one field of untrusted input
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
# Terminal escapes a program writes to colour or move its output: CSI (``ESC [ ... m``),
# OSC (``ESC ] ... BEL``, a title or a link), and the short ones (``ESC ( B``, ``ESC 7``).
_ANSI = re.compile(r"\x1b(?:\[[0-?]*[ -/]*[@-~]|\][^\x07\x1b]*(?:\x07|\x1b\\)|[ -/]*[0-~])")


def printable(text: str) -> str:
    """``text`` with every control character (C0, DEL, C1) written as ``\\xNN``."""
    return _CONTROL.sub(lambda match: f"\\x{ord(match.group()):02x}", text)


def without_escapes(text: str) -> str:
    """A program's output without its terminal escapes (colours), as a page shows it."""
    return _ANSI.sub("", text)


def clip(text: str, limit: int = FIELD_LIMIT) -> str:
    """``text`` cut to ``limit`` characters, saying how many more there were."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... ({len(text) - limit} more characters)"


def shown(text: str, limit: int = FIELD_LIMIT) -> str:
    """Untrusted ``text`` as it may be stored and shown: printable, then clipped."""
    return clip(printable(text), limit)
