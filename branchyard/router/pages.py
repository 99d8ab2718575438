"""The answers the router gives itself: short text errors and a 404 page that names nothing."""

from __future__ import annotations

import html
from http import HTTPStatus

from branchyard.router.table import _split_host


def _response(status: int, body: bytes, content_type: str) -> bytes:
    phrase = HTTPStatus(status).phrase
    head = (
        f"HTTP/1.1 {status} {phrase}\r\n"
        f"Content-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\n"
        "Connection: close\r\n"
        "\r\n"
    )
    return head.encode("latin-1") + body


def _text_response(status: int, line: str) -> bytes:
    one_line = " ".join(line.split())
    return _response(status, (one_line + "\n").encode(), "text/plain; charset=utf-8")


def _not_found_page(host: str) -> bytes:
    """A self-contained HTML page saying that no service answers for ``host``.

    It lists nothing: whoever reaches the router may be anyone on the machine, and the
    names of namespaces and services (branch names among them) are for those who hold
    the API token, who find them with ``branchyard ps``."""
    _, port = _split_host(host)
    suffix = f":{port}" if port else ""
    page = (
        '<!doctype html>\n<html><head><meta charset="utf-8">'
        "<title>branchyard: no such service</title>"
        "<style>body{font-family:system-ui,sans-serif;margin:2rem;line-height:1.5}"
        "code{color:#555}</style></head>\n<body>\n"
        f"<h1>No service answers for <code>{html.escape(host)}</code></h1>\n"
        "<p>Services are reached as <code>http://SERVICE.NAMESPACE.localhost"
        f"{html.escape(suffix)}/</code>; <code>branchyard ps</code> lists them "
        "with their URLs.</p>\n</body></html>\n"
    )
    return _response(404, page.encode(), "text/html; charset=utf-8")
