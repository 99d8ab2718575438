"""The data plane: an HTTP/1.1 reverse proxy that sends each request to a live revision.

Role
----
``http://SERVICE.NAMESPACE.localhost:PORT/`` reaches the live revision of SERVICE in
NAMESPACE (``*.localhost`` resolves to loopback, so no DNS setup is needed). Service
names that are not DNS-safe are reached by their DNS-safe form: ``other_app`` answers
as ``other-app``. Services also reach each other through *peer listeners*: one stable
loopback port per (namespace, service) that always leads to the namespace's live
revision, or to the baseline's when the namespace has none. Peers get that port in
their ``<PEER>_URL`` once and never need to be told when a new revision goes live.

The engine tells the router where things are through a :class:`RouteTable`, which is
plain in-memory state (no I/O). The :class:`Router` owns the sockets.

Design
------
Routing is **per request**. Every client connection has an ``httptools`` request
parser (the C parser uvicorn uses); when a request head is complete the backend is
picked from its ``Host`` header (on a peer listener: from the listener's (namespace,
service), with the baseline fallback), so a keep-alive client moves to a new revision
at its next request, and a canary's weights apply to each request, not to each
connection. Client connections are not tied to a backend.

Backend connections come from a keep-alive pool per backend address: an idle one is
reused (the most recently used first), else a new one is opened. After the response
the connection goes back to the pool if it can carry another request (HTTP/1.1, no
``Connection: close``, the request fully sent, the response ended by its framing),
and is closed otherwise. Idle pooled connections are closed after
:data:`POOL_IDLE_SECONDS` (shorter than common backend keep-alive timeouts, so the
backend rarely closes one under us), and never more than :data:`POOL_MAX_IDLE` are
kept per backend.

The request head is rebuilt from the parsed pieces: hop-by-hop ``Connection``,
``Keep-Alive`` and ``Proxy-Connection`` are dropped (so a client's ``Connection:
close`` does not cost a backend connection), ``X-Forwarded-For`` (appended to),
``X-Forwarded-Host`` and ``X-Forwarded-Proto: http`` are added. Request bodies go
through the parser and on as they arrive (a chunked body is re-chunked piece by
piece; trailers are kept). Responses are not rebuilt: each piece the backend sends is
fed to a response parser that has no body or header callbacks (so it copies
nothing) only to find where the response ends, and is written to the client as
received. The one exception: when the client connection will close after the
response (the client asked for it, or spoke HTTP/1.0), the response head is held
until complete and gets ``Connection: close``. HEAD, 1xx, 204 and 304 answers have
no body; a response without ``Content-Length`` or chunked framing ends when the
backend closes, and then the client connection closes too.

One request at a time per client connection: the next request is forwarded only
once the previous response is complete. Pipelined requests that arrive early are
parsed and held (and the client is not read further) until their turn.

A ``101 Switching Protocols`` answer (WebSocket and other upgrades) turns the pair
into a splice: from then on bytes go both ways unparsed, half-closes pass through,
and that backend connection is never pooled.

A backend connection that ends before sending any byte of a response is retried
once on a fresh connection if it was a *reused* pooled connection (the backend may
have closed it while idle) and the request is idempotent and has no body. nginx
retries its cached upstream connections the same way. Otherwise the client gets a
502.

Draining
--------
:meth:`Router.drain` is for a backend the table no longer routes to: its idle pooled
connections close at once, requests in flight on it (and upgraded connections) may
finish, and what is left after the grace period is aborted. Connections to a
draining backend are closed instead of pooled when their response is done.
:meth:`Router.in_flight` counts busy (and connecting) connections to a backend.

Flow control and the event loop
-------------------------------
The proxy uses asyncio ``Protocol`` callbacks and httptools callbacks, with no task
or coroutine per request: data arriving on one side is parsed and written to the
other side's transport straight from ``data_received``. Only opening a backend
connection runs a task. Flow control is explicit: when one side's write buffer
passes its high-water mark (``pause_writing``) the router stops reading from the
other side, and resumes when it drains, so a slow reader never makes the router
buffer more than about one high-water mark per direction.

Errors the router answers itself, always with ``Content-Length`` and
``Connection: close``, after which it stops writing and discards what the client
still sends for a short while, so the client reads the answer instead of a reset:

- 400 when the request is not HTTP/1.x, or (main listener) has no, an empty, or
  more than one ``Host`` header;
- 404 for a host that names no known service (including ``localhost:PORT``), with a
  small HTML page linking every namespace's services;
- 431 when a request head is larger than 64 KiB;
- 503 when the service is known but has no live revision (or all weights are 0);
- 502 when the backend cannot be reached, closes the connection without answering,
  or answers something that is not HTTP.

A client connection that has not sent a complete request head within
:data:`HEAD_TIMEOUT_SECONDS` of connecting or of its previous response is closed
(this also ends idle keep-alive connections). Peer listeners work the same way as the
main listener; they only resolve differently, and accept any ``Host``.

Every open connection is tracked, so :meth:`Router.close` (and
:meth:`Router.close_peer_listener` for its own) can abort them and leave no socket
behind.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import html
import itertools
import logging
import random
import socket
import time
from collections import deque
from collections.abc import Sequence
from http import HTTPStatus
from typing import TypeAlias, cast

import httptools

from branchyard.naming import dns_label

__all__ = ["BASELINE", "Address", "RouteTable", "Router"]

Address: TypeAlias = tuple[str, int]
"""(host, port) of a backend, e.g. ``("127.0.0.1", 40123)``."""

BASELINE = "main"
"""The namespace of every repository's default branch; peers fall back to it."""

MAX_HEAD_BYTES = 64 * 1024
"""Largest request head the router accepts before answering 431."""

HEAD_TIMEOUT_SECONDS = 30.0
"""How long a client connection may take to send a complete request head, counted from
its connection or from its previous response (so idle keep-alive connections end too)."""

CONNECT_TIMEOUT_SECONDS = 10.0
"""How long connecting to a backend may take before the client gets a 502."""

LINGER_SECONDS = 2.0
"""How long to keep discarding client bytes after answering an error ourselves."""

POOL_IDLE_SECONDS = 4.0
"""How long an idle backend connection stays in the pool (uvicorn closes after 5 s)."""

POOL_MAX_IDLE = 64
"""Most idle connections kept per backend address."""

SWEEP_SECONDS = 1.0
"""How often idle client and pooled connections are checked for their timeouts."""

LISTEN_BACKLOG = 1024

_log = logging.getLogger(__name__)

_Key: TypeAlias = tuple[str, str]
"""(namespace, service)."""

_HOST_CACHE_SIZE = 1024
_IDEMPOTENT = frozenset([b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"])

# What the router does with request headers (by lowercase name); others pass as they are.
_HOST, _CONNECTION, _DROP, _XFF, _TRANSFER_ENCODING = range(5)
_REQUEST_HEADERS = {
    b"host": _HOST,
    b"connection": _CONNECTION,
    b"keep-alive": _DROP,
    b"proxy-connection": _DROP,
    b"x-forwarded-for": _XFF,
    b"x-forwarded-host": _DROP,
    b"x-forwarded-proto": _DROP,
    b"transfer-encoding": _TRANSFER_ENCODING,
}

# Why a client connection is not being read (bits of _ClientConnection._paused).
_BACKEND_FULL = 1  # the backend connection's write buffer is full
_CONNECTING = 2  # a backend connection is being opened for the current request
_QUEUED = 4  # a pipelined request waits for the current response
_UPGRADING = 8  # an upgrade request waits for its answer

_now = time.monotonic

_QUICKACK: int | None = getattr(socket, "TCP_QUICKACK", None)  # Linux only
_SMALL_PIECE = 16 * 1024


_HOME_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})  # the router's own address
_HOME_KEY: _Key = ("", "")


def _split_host(host: str) -> tuple[str, str | None]:
    """Split a Host header value into (lowercase name, port or None)."""
    host = host.strip()
    if host.startswith("["):  # an IPv6 literal, "[::1]:8080"
        end = host.find("]")
        if end < 0:
            return host.lower(), None
        name, rest = host[1:end], host[end + 1 :]
        port = rest[1:] if rest.startswith(":") else None
    else:
        name, _, port = host.partition(":")
    if port is not None and not port.isdigit():
        port = None
    return name.rstrip(".").lower(), port


# -- the route table ---------------------------------------------------------------


class _Weighted:
    """Several backends with weights; :meth:`pick` chooses one afresh for each request."""

    __slots__ = ("backends", "cumulative", "top")

    def __init__(self, weights: Sequence[tuple[Address, int]]) -> None:
        positive = [(backend, weight) for backend, weight in weights if weight > 0]
        self.backends = tuple(backend for backend, _ in positive)
        self.cumulative = tuple(itertools.accumulate(weight for _, weight in positive))
        # The highest weight (the first of equals), shown by RouteTable.entries().
        self.top = max(positive, key=lambda pair: pair[1])[0] if positive else None

    def pick(self) -> Address | None:
        backends = self.backends
        if len(backends) <= 1:
            return backends[0] if backends else None
        cumulative = self.cumulative
        return backends[bisect.bisect(cumulative, random.random() * cumulative[-1])]


class RouteTable:
    """Which backend serves each (namespace, service). Pure in-memory state, no I/O.

    An entry is one backend, or several with weights (a canary), or ``None``: the
    service exists in the namespace but nothing serves it (no live revision yet, or
    one that crashed or is restarting, which :meth:`down_because` tells); the router
    answers 503 for it rather than 404. Weights are applied per request: :meth:`resolve` makes
    a weighted random choice on every call.
    """

    def __init__(self) -> None:
        self._backends: dict[_Key, Address | _Weighted | None] = {}
        self._down: dict[_Key, str] = {}  # why an entry with no backend has none
        self._host_keys: dict[_Key, _Key] = {}  # entry -> (DNS namespace, DNS service)
        self._by_host: dict[_Key, _Key] = {}  # (DNS namespace, DNS service) -> entry
        self._host_cache: dict[bytes, _Key | None] = {}  # Host header bytes -> entry
        self.home: Address | None = None  # what serves the router's own address

    def set_home(self, backend: Address | None) -> None:
        """Send requests for the router's own address (``localhost:PORT``) to ``backend``
        (the dashboard); without one they get the 404 listing page."""
        self.home = backend

    def set_backend(
        self, namespace: str, service: str, backend: Address | None, why: str = ""
    ) -> None:
        """Route (namespace, service) to ``backend``; ``None`` means "nothing serves",
        and ``why`` says why if there is more to say than "no live revision yet"."""
        self._set((namespace, service), backend)
        if backend is None and why:
            self._down[(namespace, service)] = why

    def down_because(self, namespace: str, service: str) -> str:
        """Why nothing serves (namespace, service), or "" if nothing was said."""
        return self._down.get((namespace, service), "")

    def set_weights(
        self, namespace: str, service: str, weights: Sequence[tuple[Address, int]]
    ) -> None:
        """Route (namespace, service) to several backends, each request picking one.

        A backend's share of requests is its weight over the sum of weights
        (percentages work, so do any relative weights). A weight of 0 takes no
        requests; when all are 0 (or there are none) the service answers 503.
        Raises ValueError for a negative weight.
        """
        for backend, weight in weights:
            if not weight >= 0:  # also refuses NaN
                raise ValueError(f"weight of {backend} must not be negative: {weight}")
        positive = [(backend, weight) for backend, weight in weights if weight > 0]
        if len({backend for backend, _ in positive}) == 1:
            self._set((namespace, service), positive[0][0])  # one backend: no choice to make
        else:
            self._set((namespace, service), _Weighted(positive))

    def _set(self, key: _Key, route: Address | _Weighted | None) -> None:
        self._backends[key] = route
        self._down.pop(key, None)
        if key not in self._host_keys:
            self._host_keys[key] = host_key = (dns_label(key[0]), dns_label(key[1]))
            self._reindex(host_key)

    def remove(self, namespace: str, service: str) -> None:
        """Forget (namespace, service); removing an unknown entry does nothing."""
        key = (namespace, service)
        if key in self._backends:
            del self._backends[key]
            self._down.pop(key, None)
            self._reindex(self._host_keys.pop(key))

    def resolve(self, namespace: str, service: str) -> Address | None:
        """The backend for one request to this entry (a weighted choice if it has
        several), or None (unknown entry, no live revision, or all weights 0)."""
        route = self._backends.get((namespace, service))
        if isinstance(route, _Weighted):
            return route.pick()
        return route

    def resolve_peer(self, namespace: str, service: str) -> Address | None:
        """Like :meth:`resolve`, but falls back to the baseline's backend."""
        backend = self.resolve(namespace, service)
        if backend is None:
            backend = self.resolve(BASELINE, service)
        return backend

    def resolve_host(self, host: str) -> _Key | None:
        """The (namespace, service) that a Host header value names, or None.

        ``"other-app.bugfix.localhost:7080"`` gives ``("bugfix", "other_app")`` when
        that entry exists: the first label is the service's DNS-safe form, the second
        the namespace's. Case does not matter; the port and any further labels are
        ignored (so a wildcard domain works as well as ``.localhost``).
        """
        name, _ = _split_host(host)
        service, _, rest = name.partition(".")
        namespace = rest.partition(".")[0]
        if not service or not namespace:
            return None
        found = self._by_host.get((namespace, service))
        if found is None:  # not already in DNS-safe form, "other_app" say
            found = self._by_host.get((dns_label(namespace), dns_label(service)))
        return found

    def routes_to(self, backend: Address) -> bool:
        """Whether any entry may send requests to ``backend`` (a weight above 0)."""
        for route in self._backends.values():
            if route == backend or (isinstance(route, _Weighted) and backend in route.backends):
                return True
        return False

    def entries(self) -> list[tuple[str, str, Address | None]]:
        """Every entry as (namespace, service, backend), sorted by namespace, service.

        An entry with weights shows its highest-weight backend.
        """
        listed = []
        for ns, svc in sorted(self._backends):
            route = self._backends[ns, svc]
            listed.append((ns, svc, route.top if isinstance(route, _Weighted) else route))
        return listed

    def _route_host(self, host: bytes) -> _Key | None:
        """:meth:`resolve_host` for raw header bytes, remembered until the names change."""
        cache = self._host_cache
        try:
            return cache[host]
        except KeyError:
            pass
        key = self.resolve_host(host.decode("latin-1"))
        if len(cache) >= _HOST_CACHE_SIZE:
            cache.clear()
        cache[host] = key
        return key

    def _reindex(self, host_key: _Key) -> None:
        self._host_cache.clear()
        candidates = [key for key, hk in self._host_keys.items() if hk == host_key]
        if not candidates:
            self._by_host.pop(host_key, None)
            return
        # Two names with one DNS form ("other_app", "other-app"): the DNS-safe one wins.
        self._by_host[host_key] = min(candidates, key=lambda k: (k != host_key, k))


# -- answers of our own ------------------------------------------------------------


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


def _head_end(data: bytes, heads: int) -> int:
    """The offset just past the ``heads``-th blank line of ``data``, or -1."""
    end = 0
    for _ in range(heads):
        found = data.find(b"\r\n\r\n", end)
        if found < 0:
            return -1
        end = found + 4
    return end


def _who(request: _Request) -> str:
    namespace, service = request.route
    return f"{service} in {namespace}"


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


# -- the client side ---------------------------------------------------------------


class _ClientConnection(asyncio.Protocol):
    """One accepted connection: parses its requests and passes each to a backend.

    Also the httptools request parser's callback object (``on_*`` methods).
    """

    transport: asyncio.Transport

    def __init__(self, listener: _Listener) -> None:
        self._listener = listener
        self._pool = listener.pool
        self._table = listener.table
        self._peer_key = listener.peer_key  # None: the main listener, routed by Host
        self._parser = httptools.HttpRequestParser(self)
        self._feeding = False  # inside feed_data: writes to the backend wait until after
        self._current: _Request | None = None  # the request being answered
        self._parsing: _Request | None = None  # the request whose body is being read
        self._queue: deque[_Request] | None = None  # pipelined requests waiting their turn
        self._backend: _BackendConnection | None = None  # serving _current
        self._spliced = False  # upgraded: bytes pass unparsed from now on
        self._upgrade_tail: bytearray | None = None  # bytes after an upgrade request
        self._answering = False  # we answered ourselves or are closing: discard input
        self._last = False  # no further request is read (after a bad one)
        self._detour = False  # any of: spliced, answering, last, upgrade tail held
        self._client_eof = False
        self._full = False  # the client transport's write buffer is full
        self._paused = 0  # why the client is not read (bits), 0 when it is
        self._waiting_since = 0.0  # waiting for a request head since, 0 when not waiting
        self._linger: asyncio.TimerHandle | None = None
        self._forwarded = b""  # X-Forwarded-For and -Proto for this client
        self._client_ip = b""
        # The request head being parsed.
        self._in_head = False
        self._head_raw = 0  # bytes received while the head was incomplete
        self._head_size = 0  # bytes of the URL and headers parsed so far
        self._url = b""
        self._parts: list[bytes] = []
        self._host: bytes | None = None
        self._hosts = 0
        self._xff: bytes | None = None
        self._connection: bytes | None = None
        self._chunked = False
        self._trailers: list[bytes] = []

    # -- transport events --------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = t = cast(asyncio.Transport, transport)
        if not self._listener.track(self):
            t.abort()
            return
        peer = t.get_extra_info("peername")
        self._client_ip = ip = str(peer[0] if isinstance(peer, tuple) else "unknown").encode()
        self._forwarded = b"X-Forwarded-For: " + ip + b"\r\nX-Forwarded-Proto: http\r\n"
        self._waiting_since = _now()

    def data_received(self, data: bytes) -> None:
        if self._detour:
            if self._spliced:
                backend = self._backend
                if backend is not None:
                    backend.transport.write(data)
            elif self._upgrade_tail is not None and not (self._answering or self._last):
                self._upgrade_tail += data  # the new protocol's first bytes: held
            return  # else discarded
        if self._in_head:
            self._head_raw += len(data)
        self._feeding = True
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade as upgrade:
            if not self._answering:
                self._upgrade_tail = bytearray(data[int(upgrade.args[0]) :])
                self._detour = True
                self._pause(_UPGRADING)
        except httptools.HttpParserError as exc:
            self._feeding = False
            if not isinstance(exc.__context__, _Stop):
                if exc.__context__ is not None:
                    _log.error("router error while parsing a request", exc_info=exc.__context__)
                self._refuse(400, f"bad request: {exc}")
            return
        finally:
            self._feeding = False
        request = self._current
        backend = self._backend
        if request is not None and backend is not None and request.pending:
            self._send(request, backend)
        if self._in_head and self._head_raw > MAX_HEAD_BYTES and not self._answering:
            self._refuse(431, "request head larger than 64 KiB")

    def eof_received(self) -> bool:
        self._client_eof = True
        backend = self._backend
        if self._spliced:
            if backend is None:
                return False
            if backend.eof:
                backend.transport.close()
                return False  # the client transport closes itself
            if backend.transport.can_write_eof():
                backend.transport.write_eof()
            return True
        request = self._current
        if request is None or self._answering:
            return False  # between requests, or answered: close
        if not request.complete:  # the request can never be completed: give up
            if backend is not None:
                self._detach(backend, reusable=False)
            return False
        return True  # keep the connection open to carry the response

    def connection_lost(self, exc: Exception | None) -> None:
        self._listener.connections.discard(self)
        if self._linger is not None:
            self._linger.cancel()
        self._current = self._parsing = None
        self._queue = None
        backend = self._backend
        if backend is not None:
            self._backend = None
            backend.client = None
            self._pool.drop(backend)

    def pause_writing(self) -> None:
        self._full = True
        if self._backend is not None:
            self._backend.pause()

    def resume_writing(self) -> None:
        self._full = False
        if self._backend is not None:
            self._backend.resume()

    # -- httptools request parser callbacks ----------------------------------------

    def on_message_begin(self) -> None:
        self._in_head = True
        self._head_raw = self._head_size = self._hosts = 0
        self._url = b""
        self._parts = [b""]  # [0] becomes the request line
        self._host = self._xff = self._connection = None
        self._chunked = False

    def on_url(self, url: bytes) -> None:
        self._url += url
        self._head_size += len(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._parsing is not None:  # a trailer after a chunked body
            self._trailers.append(name + b": " + value + b"\r\n")
            return
        self._head_size += len(name) + len(value) + 4
        kind = _REQUEST_HEADERS.get(name.lower())
        if kind is None:
            self._parts.append(name + b": " + value + b"\r\n")
        elif kind == _HOST:
            self._hosts += 1
            self._host = value.strip()
            self._parts.append(name + b": " + value + b"\r\n")
        elif kind == _CONNECTION:
            self._connection = value  # hop-by-hop: only passed on for an upgrade
        elif kind == _XFF:
            self._xff = value if self._xff is None else self._xff + b", " + value
        elif kind == _TRANSFER_ENCODING:
            self._chunked = value.rstrip().lower().endswith(b"chunked")
            self._parts.append(name + b": " + value + b"\r\n")

    def on_headers_complete(self) -> None:
        if self._answering or self._last:
            raise _Stop
        self._in_head = False
        if self._head_size > MAX_HEAD_BYTES:
            self._refuse(431, "request head larger than 64 KiB")
            raise _Stop
        parser = self._parser
        version = parser.get_http_version()
        parts = self._parts
        upgrade = parser.should_upgrade()
        if upgrade:
            keep_alive = False
            parts.append(b"Connection: " + (self._connection or b"upgrade") + b"\r\n")
        elif version == "1.1":
            keep_alive = parser.should_keep_alive()
        elif version == "1.0":  # closes after the response; the backend connection need not
            keep_alive = False
            parts.append(b"Connection: keep-alive\r\n")
        else:
            self._refuse(400, f"bad request: HTTP/{version} is not supported")
            raise _Stop
        host = self._host
        if self._hosts == 1 and host:
            parts.append(b"X-Forwarded-Host: " + host + b"\r\n")
            problem: bytes | str = host
        elif self._hosts > 1:
            problem = "more than one Host header"
        else:
            problem = "no Host header" if host is None else "empty Host header"
        xff = self._xff
        if xff is None:
            parts.append(self._forwarded)
        else:
            parts.append(b"X-Forwarded-For: " + xff + b", " + self._client_ip)
            parts.append(b"\r\nX-Forwarded-Proto: http\r\n")
        parts.append(b"\r\n")
        method = parser.get_method()
        parts[0] = (
            method + b" " + self._url + (b" HTTP/1.1\r\n" if version == "1.1" else b" HTTP/1.0\r\n")
        )
        request = _Request(
            b"".join(parts),
            problem,
            method in _IDEMPOTENT,
            method == b"HEAD",
            keep_alive,
            self._chunked,
        )
        self._parsing = request
        if self._current is None:
            self._waiting_since = 0.0
            self._start(request)
            if self._answering:
                raise _Stop
        else:
            if self._queue is None:
                self._queue = deque()
            self._queue.append(request)
            self._pause(_QUEUED)

    def on_body(self, body: bytes) -> None:
        request = self._parsing
        if request is None or self._answering:
            raise _Stop
        request.body = True
        if request.chunked:
            body = b"%x\r\n" % len(body) + body + b"\r\n"
        request.pending.append(body)

    def on_message_complete(self) -> None:
        request = self._parsing
        if request is None:
            return
        self._parsing = None
        if request.chunked:
            request.pending.append(b"0\r\n" + b"".join(self._trailers) + b"\r\n")
            self._trailers.clear()
        request.complete = True

    # -- routing -----------------------------------------------------------------

    def _start(self, request: _Request) -> None:
        """Make ``request`` the current one: resolve its backend and send it there."""
        self._current = request
        table = self._table
        peer_key = self._peer_key
        backend: Address | None
        if peer_key is None:
            host = request.host
            if not isinstance(host, bytes):
                self._answer(_text_response(400, f"bad request: {host}"))
                return
            key = table._route_host(host)
            if key is None:
                text = host.decode("latin-1")
                if table.home is None or _split_host(text)[0] not in _HOME_NAMES:
                    self._answer(_not_found_page(text, table.entries()))
                    return
                key, backend = _HOME_KEY, table.home
            else:
                backend = table.resolve(*key)
        else:
            key = peer_key
            backend = table.resolve_peer(*key)
        request.route = key
        if backend is None:
            namespace, service = key
            why = table.down_because(namespace, service)
            text = (
                f"{service} in {namespace} is not serving: {why}"
                if why
                else (f"no live revision of {service} in {namespace} yet")
            )
            self._answer(_text_response(503, text))
            return
        connection = self._pool.take(backend)
        if connection is None:
            self._open(request, backend)
        else:
            request.reused = True
            self._attach(connection)

    def _open(self, request: _Request, backend: Address) -> None:
        """Open a new connection to ``backend`` for ``request`` (in a task)."""
        self._pause(_CONNECTING)
        entry = self._pool.entry(backend)
        task = asyncio.get_running_loop().create_task(self._connect(request, entry))
        entry.connecting.add(task)

    async def _connect(self, request: _Request, entry: _Backend) -> None:
        pool = self._pool
        host, port = entry.address
        task = asyncio.current_task()
        try:
            try:
                async with asyncio.timeout(CONNECT_TIMEOUT_SECONDS):
                    _, connection = await asyncio.get_running_loop().create_connection(
                        lambda: _BackendConnection(entry, pool), host, port
                    )
            except asyncio.CancelledError:  # drained or shut down
                if request is self._current and not self.transport.is_closing():
                    self._bad_gateway(f"cannot reach {_who(request)} at {host}:{port}: drained")
                raise
            except Exception as exc:  # OSError mostly; TimeoutError; a bad address
                reason = str(exc) or type(exc).__name__
                _log.warning("cannot reach %s at %s:%s: %s", _who(request), host, port, reason)
                if request is self._current:
                    self._bad_gateway(f"cannot reach {_who(request)} at {host}:{port}: {reason}")
                return
            entry.busy.add(connection)
        finally:
            entry.connecting.discard(cast("asyncio.Task[None]", task))
            pool.settle(entry)
            pool.forget_if_unused(entry)
        if request is not self._current or self.transport.is_closing():
            pool.put(connection)  # the client went away: keep the connection for others
            return
        self._resume(_CONNECTING)
        self._attach(connection)

    def _attach(self, backend: _BackendConnection) -> None:
        request = self._current
        assert request is not None
        self._backend = backend
        backend.attach(self, request)
        if self._full:
            backend.pause()
        if request.pending and not self._feeding:
            self._send(request, backend)

    def _send(self, request: _Request, backend: _BackendConnection) -> None:
        pending = request.pending
        backend.transport.write(pending[0] if len(pending) == 1 else b"".join(pending))
        pending.clear()

    def _detach(self, backend: _BackendConnection, reusable: bool) -> None:
        self._backend = None
        backend.client = None
        if self._paused & _BACKEND_FULL:
            self._resume(_BACKEND_FULL)
        if reusable:
            self._pool.put(backend)
        else:
            self._pool.drop(backend)

    # -- events from the backend connection ----------------------------------------

    def response_done(self, backend: _BackendConnection) -> None:
        """The response is complete (by its framing, or by the backend's close)."""
        request = self._current
        assert request is not None
        self._current = None
        reusable = (
            backend.keep_alive
            and request.complete
            and not backend.transport.get_write_buffer_size()  # the request was all sent
        )
        self._detach(backend, reusable)
        if not request.complete:  # answered before the whole request arrived
            self._linger_close()
        elif not (request.keep_alive and backend.keep_alive):
            self.transport.close()
        elif self._queue:
            next_request = self._queue.popleft()
            if not self._queue:
                self._resume(_QUEUED)
            self._start(next_request)
        elif self._client_eof or self._last:
            self.transport.close()
        else:
            self._waiting_since = _now()

    def backend_failed(self, backend: _BackendConnection, what: str) -> None:
        """The backend connection ended, or spoke nonsense, before the response ended."""
        request = self._current
        self._detach(backend, reusable=False)
        if request is None:
            return
        if (
            request.reused
            and not backend.received
            and not backend.aborted
            and not request.retried
            and request.idempotent
            and request.complete
            and not request.body
        ):  # most likely a pooled connection the backend had closed: try a fresh one
            request.retried = True
            request.reused = False
            request.pending = [request.head]
            self._open(request, backend.entry.address)
            return
        self._bad_gateway(f"{_who(request)} {what}")

    def upgraded(self, backend: _BackendConnection) -> None:
        """The backend answered 101: splice the two connections from now on."""
        self._spliced = backend.spliced = self._detour = True
        self._current = self._parsing = None
        self._queue = None
        tail = self._upgrade_tail
        self._upgrade_tail = None
        if tail:
            backend.transport.write(bytes(tail))
        if self._client_eof:
            if backend.transport.can_write_eof():
                backend.transport.write_eof()
        else:
            self._resume(_UPGRADING | _QUEUED)

    def backend_eof(self) -> bool:
        """A spliced backend connection half-closed."""
        if self._client_eof:
            self.transport.close()
            return False  # the backend transport closes itself
        if self.transport.can_write_eof():
            self.transport.write_eof()
        return True

    def backend_lost(self) -> None:
        """A spliced backend connection closed."""
        self._backend = None
        self.transport.close()  # sends what is still buffered for the client first

    def backend_full(self, full: bool) -> None:
        if full:
            self._pause(_BACKEND_FULL)
        else:
            self._resume(_BACKEND_FULL)

    # -- answering and closing -----------------------------------------------------

    def _pause(self, reason: int) -> None:
        if not self._paused and not self._client_eof:
            self.transport.pause_reading()
        self._paused |= reason

    def _resume(self, reason: int) -> None:
        if self._paused & reason:
            self._paused &= ~reason
            if not self._paused and not self._client_eof and not self.transport.is_closing():
                self.transport.resume_reading()

    def _refuse(self, status: int, line: str) -> None:
        """Answer a bad request, unless an earlier request's response is still due."""
        current = self._current
        if current is not None and self._parsing is not current:
            self._last = self._detour = True  # finish the response in flight, then close
            self._pause(_QUEUED)
            return
        self._answer(_text_response(status, line))

    def _bad_gateway(self, line: str) -> None:
        self._answer(_text_response(502, line))

    def _answer(self, response: bytes) -> None:
        """Write our own response (unless one was started), then close gracefully."""
        request = self._current
        backend = self._backend
        if backend is not None:
            self._detach(backend, reusable=False)
        if self.transport.is_closing():
            self._answering = self._detour = True
            return
        if request is not None and request.answered:  # too late for an answer of ours
            self._answering = self._detour = True
            self.transport.close()
            return
        self.transport.write(response)
        self._linger_close()

    def _linger_close(self) -> None:
        """End our side, and read and discard what the client still sends until it
        closes (or we give up), so unread bytes do not turn our close into a reset
        that eats the response."""
        client = self.transport
        self._answering = self._detour = True
        self._current = self._parsing = None
        self._queue = None
        if self._client_eof or not client.can_write_eof():
            client.close()
            return
        client.write_eof()
        self._paused = 0
        client.resume_reading()
        if self._linger is None:
            self._linger = asyncio.get_running_loop().call_later(LINGER_SECONDS, client.abort)

    def close_if_idle(self, deadline: float) -> None:
        """Close the connection if it has waited for a request head since before ``deadline``."""
        since = self._waiting_since
        if since and since < deadline and self._current is None:
            self.transport.close()

    def abort(self) -> None:
        """Drop the connection and its backend connection now (router shutdown)."""
        backend = self._backend
        if backend is not None:  # detached first: its end must not start a retry
            self._backend = None
            backend.client = None
            backend.entry.busy.discard(backend)
            backend.transport.abort()
        self._current = self._parsing = None
        self.transport.abort()


# -- the backend side --------------------------------------------------------------


class _BackendConnection(asyncio.Protocol):
    """One connection to a backend: idle in the pool, or serving one client's request.

    Also the httptools response parser's callback object. It has no ``on_body`` or
    ``on_header``: the parser only finds where a response ends, and copies nothing.
    """

    transport: asyncio.Transport

    def __init__(self, entry: _Backend, pool: _Pool) -> None:
        self.entry = entry
        self.pool = pool
        self.parser = httptools.HttpResponseParser(self)
        self.client: _ClientConnection | None = None  # None while idle
        self.client_transport: asyncio.Transport | None = None
        self.request: _Request | None = None
        self.sock: socket.socket | None = None
        self.idle_since = 0.0
        self.spliced = False
        self.paused = False  # reading paused because the client cannot take more
        self.eof = False
        self.aborted = False  # drain gave up on it: no retry
        # The current response.
        self.received = False  # any byte of it
        self.heads = 0  # heads (1xx and final) complete in `held`
        self.final = False  # the final (non-1xx) head is complete
        self.complete = False
        self.keep_alive = False
        self.upgraded = False
        self.stopped = False  # a callback stopped the parser on purpose
        self.head_only = False
        self.hold = False  # hold the head back to add "Connection: close"
        self.held = b""

    def attach(self, client: _ClientConnection, request: _Request) -> None:
        self.client = client
        self.client_transport = client.transport
        self.request = request
        self.received = self.final = self.complete = self.upgraded = False
        self.heads = 0
        self.head_only = request.head_only
        self.hold = not request.keep_alive

    # -- transport events --------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.sock = transport.get_extra_info("socket")

    def data_received(self, data: bytes) -> None:
        client = self.client
        client_transport = self.client_transport
        if client is None or client_transport is None:  # an idle connection spoke: drop it
            self.transport.close()
            return
        if self.spliced:
            client_transport.write(data)
            return
        self.received = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self.upgraded = True
        except httptools.HttpParserError:
            if self.stopped:  # HEAD or 101: this parser is done, the next one starts afresh
                self.stopped = False
                self.parser = httptools.HttpResponseParser(self)
            elif self.complete:  # bytes after the end of the response
                self.keep_alive = False
            else:
                client.backend_failed(self, "sent an answer that is not HTTP/1.x")
                return
        if self.hold:
            held = self._hold(data)
            if held is None:
                self._ack_now()
                return
            data = held
        client_transport.write(data)
        assert self.request is not None
        self.request.answered = True
        if self.complete:
            client.response_done(self)
        elif self.upgraded:
            client.upgraded(self)
        elif len(data) < _SMALL_PIECE:
            self._ack_now()

    def _ack_now(self) -> None:
        """Send the ACK for what was just read now, not up to 40 ms later.

        A backend that writes a response in several small pieces without
        TCP_NODELAY (``http.server`` does: head, then body) holds each piece back
        until the previous one is acknowledged (Nagle), and on a kept-alive
        request/response connection Linux delays that ACK. Asking for a quick ACK
        once a small piece left the response incomplete avoids the stall.
        """
        if _QUICKACK is not None and self.sock is not None:
            with contextlib.suppress(OSError):
                self.sock.setsockopt(socket.IPPROTO_TCP, _QUICKACK, 1)

    def _hold(self, data: bytes) -> bytes | None:
        """Hold the response head until it is complete, then add "Connection: close"."""
        held = self.held + data if self.held else data
        if not self.final and not self.upgraded:
            if self.heads and self.client_transport is not None:  # 100 Continue: pass it on
                end = _head_end(held, self.heads)
                if end > 0:
                    self.client_transport.write(held[:end])
                    held = held[end:]
                    self.heads = 0
            if len(held) <= MAX_HEAD_BYTES:
                self.held = held
                return None
        self.hold = False
        self.held = b""
        if self.final and self.keep_alive and not self.upgraded:
            end = _head_end(held, self.heads)
            if end > 0:
                return held[: end - 2] + b"Connection: close\r\n" + held[end - 2 :]
        return held

    def eof_received(self) -> bool:
        self.eof = True
        client = self.client
        if client is not None and self.spliced:
            return client.backend_eof()
        self._ended()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        client = self.client
        if client is not None:  # first, so that a retry counts before the pool forgets us
            if self.spliced:
                client.backend_lost()
            else:
                self._ended()
        self.pool.lost(self)

    def _ended(self) -> None:
        client = self.client
        if client is None:
            return  # idle: the pool forgets it in connection_lost
        if self.final and not self.complete:  # a body that ends with the connection
            if self.held and self.client_transport is not None:
                self.client_transport.write(self.held)
                self.held = b""
            self.complete = True
            self.keep_alive = False
            client.response_done(self)
        elif self.aborted:
            client.backend_failed(self, "was retired (drained) before it finished answering")
        elif self.received:
            client.backend_failed(self, "closed the connection in the middle of its answer")
        else:
            client.backend_failed(self, "closed the connection without answering")

    def pause_writing(self) -> None:
        if self.client is not None:
            self.client.backend_full(True)

    def resume_writing(self) -> None:
        if self.client is not None:
            self.client.backend_full(False)

    def pause(self) -> None:
        if not self.paused:
            self.paused = True
            self.transport.pause_reading()

    def resume(self) -> None:
        if self.paused:
            self.paused = False
            if not self.eof and not self.transport.is_closing():
                self.transport.resume_reading()

    # -- httptools response parser callbacks ---------------------------------------

    def on_headers_complete(self) -> None:
        parser = self.parser
        status = parser.get_status_code()
        self.heads += 1
        if status < 200:
            if status == 101:  # from now on the bytes are the new protocol's
                self.upgraded = self.stopped = True
                raise _Stop
            return  # 100 Continue and the like: a final head follows
        self.final = True
        self.keep_alive = parser.should_keep_alive()
        if self.head_only:  # the parser cannot know that a HEAD response has no body
            self.complete = self.stopped = True
            raise _Stop

    def on_message_complete(self) -> None:
        if self.final:
            self.complete = True


# -- the pool of backend connections -----------------------------------------------


class _Backend:
    """The connections to one backend address."""

    __slots__ = ("address", "busy", "connecting", "drained", "draining", "idle")

    def __init__(self, address: Address) -> None:
        self.address = address
        self.idle: list[_BackendConnection] = []  # oldest first
        self.busy: set[_BackendConnection] = set()  # serving a request, or spliced
        self.connecting: set[asyncio.Task[None]] = set()
        self.draining = 0  # drains under way
        self.drained: asyncio.Future[None] | None = None  # set once nothing is busy


class _Pool:
    """Keep-alive backend connections, per backend address, shared by all listeners."""

    def __init__(self) -> None:
        self.entries: dict[Address, _Backend] = {}
        self.closing = False
        self._sweeper: asyncio.TimerHandle | None = None

    def entry(self, address: Address) -> _Backend:
        entry = self.entries.get(address)
        if entry is None:
            entry = self.entries[address] = _Backend(address)
        return entry

    def take(self, address: Address) -> _BackendConnection | None:
        """An idle connection to ``address`` to reuse (now busy), or None."""
        entry = self.entries.get(address)
        if entry is None or not entry.idle:
            return None
        idle = entry.idle
        fresh_since = _now() - POOL_IDLE_SECONDS
        while idle:
            connection = idle.pop()
            if connection.idle_since > fresh_since and not connection.transport.is_closing():
                entry.busy.add(connection)
                return connection
            connection.transport.close()
        return None

    def put(self, connection: _BackendConnection) -> None:
        """A response is done and ``connection`` can carry another request."""
        entry = connection.entry
        entry.busy.discard(connection)
        if connection.paused:
            connection.resume()
        if (
            entry.draining
            or self.closing
            or len(entry.idle) >= POOL_MAX_IDLE
            or connection.transport.is_closing()
        ):
            connection.transport.close()
        else:
            connection.idle_since = _now()
            entry.idle.append(connection)
            if self._sweeper is None:
                loop = asyncio.get_running_loop()
                self._sweeper = loop.call_later(SWEEP_SECONDS, self._sweep)
        if entry.drained is not None:
            self.settle(entry)

    def drop(self, connection: _BackendConnection) -> None:
        """``connection`` cannot be reused: close it."""
        entry = connection.entry
        entry.busy.discard(connection)
        connection.transport.close()
        if entry.drained is not None:
            self.settle(entry)

    def lost(self, connection: _BackendConnection) -> None:
        """``connection`` is closed: forget it."""
        entry = connection.entry
        entry.busy.discard(connection)
        if connection in entry.idle:
            entry.idle.remove(connection)
        self.settle(entry)
        self.forget_if_unused(entry)

    def forget_if_unused(self, entry: _Backend) -> None:
        if (
            not (entry.idle or entry.busy or entry.connecting or entry.draining)
            and self.entries.get(entry.address) is entry
        ):
            del self.entries[entry.address]

    def settle(self, entry: _Backend) -> None:
        drained = entry.drained
        if drained is not None and not entry.busy and not entry.connecting and not drained.done():
            drained.set_result(None)

    def in_flight(self, address: Address) -> int:
        entry = self.entries.get(address)
        return 0 if entry is None else len(entry.busy) + len(entry.connecting)

    async def drain(self, address: Address, grace: float) -> int:
        entry = self.entries.get(address)
        if entry is None:
            return 0
        entry.draining += 1
        try:
            for connection in entry.idle:
                connection.transport.close()
            entry.idle.clear()
            if entry.busy or entry.connecting:
                if entry.drained is None or entry.drained.done():
                    entry.drained = asyncio.get_running_loop().create_future()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(max(grace, 0.0)):
                        await asyncio.shield(entry.drained)
            left = list(entry.busy)
            tasks = list(entry.connecting)
            for connection in left:
                connection.aborted = True
                connection.transport.abort()
            for task in tasks:
                task.cancel()
            if left or tasks:
                _log.warning(
                    "drain of %s:%s aborted %d connection(s) after %.1f s",
                    *address,
                    len(left) + len(tasks),
                    grace,
                )
                await asyncio.gather(*tasks, return_exceptions=True)
                await asyncio.sleep(0)  # let the aborted transports close their sockets
            return len(left) + len(tasks)
        finally:
            entry.draining -= 1
            if not entry.draining:
                entry.drained = None
                self.forget_if_unused(entry)

    def _sweep(self) -> None:
        self._sweeper = None
        fresh_since = _now() - POOL_IDLE_SECONDS
        waiting = False
        for entry in list(self.entries.values()):
            idle = entry.idle
            while idle and idle[0].idle_since <= fresh_since:
                idle.pop(0).transport.close()
            waiting = waiting or bool(idle)
        if waiting and not self.closing:
            self._sweeper = asyncio.get_running_loop().call_later(SWEEP_SECONDS, self._sweep)

    async def close(self) -> None:
        """Close every backend connection, idle or not, and stop connecting."""
        self.closing = True
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        tasks = [task for entry in self.entries.values() for task in entry.connecting]
        for task in tasks:
            task.cancel()
        for entry in list(self.entries.values()):
            for connection in [*entry.idle, *entry.busy]:
                connection.transport.abort()
        await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.sleep(0)  # let the aborted transports close their sockets


# -- listeners and the router ------------------------------------------------------


class _Listener:
    """One listening socket and the connections it accepted."""

    def __init__(self, table: RouteTable, pool: _Pool, peer_key: _Key | None) -> None:
        self.table = table
        self.pool = pool
        self.peer_key = peer_key  # None: the main listener, routed by Host
        self.connections: set[_ClientConnection] = set()
        self.closing = False
        self.server: asyncio.Server | None = None
        self.port = 0
        self._sweeper: asyncio.TimerHandle | None = None

    async def open(self, host: str, port: int) -> int:
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(
            lambda: _ClientConnection(self), host, port, backlog=LISTEN_BACKLOG
        )
        self.port = self.server.sockets[0].getsockname()[1]
        return self.port

    def track(self, connection: _ClientConnection) -> bool:
        if self.closing:
            return False
        self.connections.add(connection)
        if self._sweeper is None:
            loop = asyncio.get_running_loop()
            self._sweeper = loop.call_later(SWEEP_SECONDS, self._sweep)
        return True

    def _sweep(self) -> None:
        """Close connections that have waited too long for a request head."""
        self._sweeper = None
        deadline = _now() - HEAD_TIMEOUT_SECONDS
        for connection in list(self.connections):
            connection.close_if_idle(deadline)
        if self.connections and not self.closing:
            self._sweeper = asyncio.get_running_loop().call_later(SWEEP_SECONDS, self._sweep)

    async def close(self) -> None:
        """Stop listening, abort every connection, and return once their sockets are shut."""
        self.closing = True
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        server = self.server
        if server is None:
            return
        loop = asyncio.get_running_loop()
        # Stop accepting first and let connections already accepted get their transport:
        # asyncio (3.11) leaks a socket accepted just before Server.close() otherwise.
        for sock in server.sockets:
            with contextlib.suppress(NotImplementedError, ValueError):
                loop.remove_reader(sock.fileno())
        await asyncio.sleep(0)
        server.close()
        for _ in range(3):  # late connection_made calls see `closing` and abort themselves
            for connection in list(self.connections):
                connection.abort()
            await asyncio.sleep(0)
        with contextlib.suppress(Exception):
            await server.wait_closed()


class Router:
    """Owns the listening sockets, the proxied connections and the backend connection
    pool; routes each request by a RouteTable.

    One main listener routes by Host header; any number of peer listeners each lead
    to one (namespace, service). All methods run on the event loop's thread.
    """

    def __init__(self, table: RouteTable) -> None:
        self._table = table
        self._pool = _Pool()
        self._main: _Listener | None = None
        self._peers: dict[_Key, _Listener] = {}
        self._peer_lock: asyncio.Lock | None = None

    async def serve(self, host: str, port: int) -> int:
        """Start the main listener (port 0 picks a free one); return the bound port."""
        if self._main is not None:
            raise RuntimeError(f"the router already serves on port {self._main.port}")
        listener = _Listener(self._table, self._pool, None)
        bound = await listener.open(host, port)
        self._main = listener
        return bound

    @property
    def main_port(self) -> int:
        """The main listener's port; raises RuntimeError before :meth:`serve`."""
        if self._main is None:
            raise RuntimeError("the router is not serving")
        return self._main.port

    async def open_peer_listener(
        self, namespace: str, service: str, host: str = "127.0.0.1", port: int = 0
    ) -> int:
        """A stable address whose requests go to ``table.resolve_peer(...)``.

        The backend is looked up for each request, so the listener follows new
        revisions and the baseline fallback, even on a kept-alive connection; any
        Host header is accepted. Idempotent: if the (namespace, service) already has
        a listener, its port is returned (``host`` and ``port`` are then ignored).
        Raises OSError if the asked-for port cannot be bound.
        """
        if self._peer_lock is None:
            self._peer_lock = asyncio.Lock()
        key = (namespace, service)
        async with self._peer_lock:
            existing = self._peers.get(key)
            if existing is not None:
                return existing.port
            listener = _Listener(self._table, self._pool, key)
            bound = await listener.open(host, port)
            self._peers[key] = listener
            return bound

    def peer_port(self, namespace: str, service: str) -> int | None:
        """The port of (namespace, service)'s peer listener, or None if it has none."""
        existing = self._peers.get((namespace, service))
        return None if existing is None else existing.port

    async def close_peer_listener(self, namespace: str, service: str) -> None:
        """Stop listening for (namespace, service) and drop its open connections."""
        listener = self._peers.pop((namespace, service), None)
        if listener is not None:
            await listener.close()

    async def drain(self, backend: Address, grace: float) -> int:
        """Retire ``backend``: call once the table no longer routes to it.

        Its idle pooled connections are closed at once; requests in flight on it (and
        upgraded connections) may finish for ``grace`` seconds, after which what is
        left is aborted (a client still waiting for a response gets a 502). Returns
        how many connections had to be aborted. Client connections are not affected:
        their next request goes wherever the table says.
        """
        return await self._pool.drain(backend, grace)

    def in_flight(self, backend: Address) -> int:
        """How many connections to ``backend`` serve a request (or are upgraded, or
        being opened) right now."""
        return self._pool.in_flight(backend)

    async def close(self) -> None:
        """Close every listener, every open proxied connection and every pooled one."""
        listeners = list(self._peers.values())
        if self._main is not None:
            listeners.append(self._main)
        self._peers.clear()
        self._main = None
        await asyncio.gather(*(listener.close() for listener in listeners))
        await self._pool.close()

    def _open_connections(self) -> int:
        """How many client connections are open (for tests and diagnostics)."""
        listeners = [*self._peers.values(), *([self._main] if self._main else [])]
        return sum(len(listener.connections) for listener in listeners)

    def _idle_connections(self, backend: Address) -> int:
        """How many idle pooled connections to ``backend`` there are (for tests)."""
        entry = self._pool.entries.get(backend)
        return 0 if entry is None else len(entry.idle)
