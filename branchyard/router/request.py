"""One proxied request as the client side hands it to a backend connection, and the parser stop."""

from __future__ import annotations

from branchyard.router.limits import _Key


class _Stop(Exception):
    """Raised in a parser callback to stop parsing the rest of the data fed."""


# -- one request -------------------------------------------------------------------


class _Request:
    """One request of a client connection, from its head to the end of its response."""

    __slots__ = (
        "answered",
        "body",
        "chunked",
        "complete",
        "head",
        "head_only",
        "host",
        "idempotent",
        "keep_alive",
        "pending",
        "retried",
        "reused",
        "route",
    )

    def __init__(
        self,
        head: bytes,
        host: bytes | str,
        idempotent: bool,
        head_only: bool,
        keep_alive: bool,
        chunked: bool,
    ) -> None:
        self.head = head  # as sent to the backend (kept for a retry)
        self.host = host  # the Host header, or (str) what is wrong with it
        self.idempotent = idempotent
        self.head_only = head_only  # a HEAD request: the response has no body
        self.keep_alive = keep_alive  # the client connection may carry another request
        self.chunked = chunked
        self.body = chunked  # has (had) body bytes to send
        self.pending = [head]  # bytes for the backend not written yet
        self.complete = False  # the whole request was read from the client
        self.answered = False  # a byte of the response was written to the client
        self.reused = False  # sent on a pooled connection
        self.retried = False
        self.route: _Key = ("", "")  # (namespace, service), for messages
