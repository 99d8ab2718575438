"""The API token: created on first start, readable only by its owner, compared in
constant time.

Every API call carries it as ``Authorization: Bearer TOKEN``; the CLI reads it
from ``HOME/token`` by itself. Webhook endpoints authenticate by their
providers' signatures instead. ``hmac`` and ``secrets`` are imported where they
are used: they load OpenSSL and ``random``, about 10 ms of every CLI command's
start-up, and the CLI only reads the token.
"""

from __future__ import annotations

import os
from pathlib import Path

TOKEN_FILE = "token"


def write_private(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` with mode 0600, atomically."""
    temporary = path.with_name(f".{path.name}.tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as file:
        file.write(text)
    os.chmod(temporary, 0o600)
    temporary.replace(path)


def new_token() -> str:
    import secrets

    return secrets.token_urlsafe(32)


def load_or_create(home: Path) -> str:
    """The home's token, made on first use."""
    path = home / TOKEN_FILE
    try:
        token = path.read_text().strip()
    except FileNotFoundError:
        token = ""
    if not token:
        token = new_token()
        write_private(path, token + "\n")
    return token


def rotate(home: Path) -> str:
    token = new_token()
    write_private(home / TOKEN_FILE, token + "\n")
    return token


def read(home: Path) -> str | None:
    try:
        return (home / TOKEN_FILE).read_text().strip() or None
    except OSError:
        return None


def matches(expected: str, given: str | None) -> bool:
    """Constant-time comparison; a missing token never matches."""
    import hmac

    if not given or not expected:
        return False
    return hmac.compare_digest(expected.encode(), given.encode())


def bearer(header: str | None) -> str | None:
    """The token of an ``Authorization: Bearer TOKEN`` header."""
    if not header:
        return None
    scheme, _, token = header.partition(" ")
    return token.strip() if scheme.lower() == "bearer" else None
