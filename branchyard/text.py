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


# Query parameters whose value is a credential (GitLab's private_token, an OAuth
# access_token, a signed URL's signature).
_SECRET_PARAMETER = re.compile(
    r"access_token|private_token|token|password|passwd|secret|api_?key|key|sig|signature",
    re.IGNORECASE,
)


def redacted_url(url: str) -> str:
    """A repo URL as it may be shown: credentials replaced by ``***``.

    The password of its userinfo (``https://user:TOKEN@host/x.git``), a user name
    that is alone in an http(s) URL's userinfo (``https://TOKEN@host/x.git``: a
    token given as the user), and the value of a query parameter that carries a
    secret (``?access_token=TOKEN``). A path or an ssh URL's user (``git@host``) is
    no secret and stays."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    authority, slash, path = rest.partition("/")
    userinfo, at, host = authority.rpartition("@")
    if at:
        user, colon, _ = userinfo.partition(":")
        if colon:
            authority = f"{user}:***@{host}"
        elif scheme.lower() in ("http", "https"):
            authority = f"***@{host}"
    path, question, query = path.partition("?")
    if question:
        query = "&".join(_redacted_parameter(pair) for pair in query.split("&"))
    return f"{scheme}{sep}{authority}{slash}{path}{question}{query}"


def _redacted_parameter(pair: str) -> str:
    name, equals, _ = pair.partition("=")
    return f"{name}=***" if equals and _SECRET_PARAMETER.fullmatch(name) else pair
