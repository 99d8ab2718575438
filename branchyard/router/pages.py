"""The answers the router gives itself: short text errors and the 404 page listing services."""

from __future__ import annotations

import html
from http import HTTPStatus

from branchyard.naming import dns_label
from branchyard.router.limits import BASELINE, Address
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


def _not_found_page(host: str, entries: list[tuple[str, str, Address | None]]) -> bytes:
    """A self-contained HTML page linking every namespace's services."""
    _, port = _split_host(host)
    suffix = f":{port}" if port else ""
    sections: list[str] = []
    namespaces = sorted({ns for ns, _, _ in entries}, key=lambda ns: (ns != BASELINE, ns))
    for namespace in namespaces:
        items = []
        for ns, service, backend in entries:
            if ns != namespace:
                continue
            url = f"http://{dns_label(service)}.{dns_label(ns)}.localhost{suffix}/"
            note = "" if backend is not None else " <small>(no live revision yet)</small>"
            items.append(
                f'<li><a href="{html.escape(url)}">{html.escape(service)}</a>'
                f" <code>{html.escape(url)}</code>{note}</li>"
            )
        sections.append(f"<h2>{html.escape(namespace)}</h2>\n<ul>\n{''.join(items)}\n</ul>")
    listing = "\n".join(sections) if sections else "<p>No services are routed yet.</p>"
    page = (
        '<!doctype html>\n<html><head><meta charset="utf-8">'
        "<title>branchyard: no such service</title>"
        "<style>body{font-family:system-ui,sans-serif;margin:2rem;line-height:1.5}"
        "code{color:#555}</style></head>\n<body>\n"
        f"<h1>No service at <code>{html.escape(host)}</code></h1>\n"
        "<p>Services are reached as <code>http://SERVICE.NAMESPACE.localhost"
        f"{html.escape(suffix)}/</code>. Known services:</p>\n"
        f"{listing}\n</body></html>\n"
    )
    return _response(404, page.encode(), "text/html; charset=utf-8")
