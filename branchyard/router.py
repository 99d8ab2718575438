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
Routing is **per connection**, not per request. On the main listener the router reads
the first request head (up to the blank line, at most 64 KiB), picks the backend from
its ``Host`` header, connects, sends the bytes it has buffered, and from then on only
splices bytes both ways until both sides have closed. It never parses another byte of
that connection. This makes keep-alive, pipelining, chunked or streamed bodies in
either direction, WebSocket and other upgrades, and half-closed connections work
without any code for them, and keeps the per-request cost close to two socket writes.
The price is that a keep-alive connection stays on the backend it was first routed to:
after a new revision goes live, new connections reach it and old ones finish on the
old revision (which is what draining wants anyway). The router adds no headers
(no ``X-Forwarded-For``), since that would mean parsing every request.

Peer listeners do not parse at all: each accepted connection is sent to
:meth:`RouteTable.resolve_peer`, looked up at accept time, so the listener follows
new revisions and the baseline fallback without ever changing port. They can carry
any TCP protocol, not only HTTP.

The proxy uses asyncio ``Protocol`` and transport callbacks instead of streams: data
arriving on one side is written to the other side's transport straight from
``data_received`` (the transport sends it at once when the socket can take it), with
no task switch, no coroutine and no intermediate buffer. Flow control is explicit:
when one side's write buffer passes its high-water mark (``pause_writing``) the
router stops reading from the other side, and resumes when it drains, so a slow
reader never makes the router buffer more than about one high-water mark per
direction. Half-close is passed through: an EOF from one side becomes a
``write_eof`` (a TCP FIN) on the other, and the pair closes once both have ended.

Errors the router answers itself, always with ``Content-Length`` and
``Connection: close``, after which it stops writing and discards what the client
still sends for a short while, so the client reads the answer instead of a reset:

- 400 when the first request has no (or more than one) ``Host`` header;
- 404 for a host that names no known service (including ``localhost:PORT``), with a
  small HTML page linking every namespace's services;
- 431 when the request head is larger than 64 KiB;
- 503 when the service is known but has no live revision yet;
- 502 when the backend cannot be reached, or closes the connection without sending
  a byte of answer.

A connection that has not sent a complete head within 30 s is closed without one.

A peer listener answers 503 (nothing live here or in the baseline) or 502 (backend
unreachable) the same way, without having read anything: whatever protocol the
client speaks, it gets an HTTP answer, which is the right one for HTTP peers. A peer
backend that closes without answering is passed through as a plain close, since
for other protocols that can be normal.

Every open proxied connection is tracked, so :meth:`Router.close` (and
:meth:`Router.close_peer_listener` for its own) can abort them and leave no socket
behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import html
import logging
import re
from http import HTTPStatus
from typing import TypeAlias, cast

from branchyard.naming import dns_label

__all__ = ["BASELINE", "Address", "RouteTable", "Router"]

Address: TypeAlias = tuple[str, int]
"""(host, port) of a backend, e.g. ``("127.0.0.1", 40123)``."""

BASELINE = "main"
"""The namespace of every repository's default branch; peers fall back to it."""

MAX_HEAD_BYTES = 64 * 1024
"""Largest first request head the main listener accepts before answering 431."""

HEAD_TIMEOUT_SECONDS = 30.0
"""How long a new connection on the main listener may take to send its first head."""

CONNECT_TIMEOUT_SECONDS = 10.0
"""How long connecting to a backend may take before the client gets a 502."""

LINGER_SECONDS = 2.0
"""How long to keep discarding client bytes after answering an error ourselves."""

LISTEN_BACKLOG = 1024

_log = logging.getLogger(__name__)

_Key: TypeAlias = tuple[str, str]
"""(namespace, service)."""

_HOST_HEADER = re.compile(rb"\r\nhost:[ \t]*([^\r\n]*)", re.IGNORECASE)
_HEAD_END = b"\r\n\r\n"


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


class RouteTable:
    """Which backend serves each (namespace, service). Pure in-memory state, no I/O.

    An entry with backend ``None`` means the service exists in the namespace but has
    no live revision yet; the router answers 503 for it rather than 404.
    """

    def __init__(self) -> None:
        self._backends: dict[_Key, Address | None] = {}
        self._host_keys: dict[_Key, _Key] = {}  # entry -> (DNS namespace, DNS service)
        self._by_host: dict[_Key, _Key] = {}  # (DNS namespace, DNS service) -> entry

    def set_backend(self, namespace: str, service: str, backend: Address | None) -> None:
        """Route (namespace, service) to ``backend``; ``None`` means "no live revision"."""
        key = (namespace, service)
        self._backends[key] = backend
        if key not in self._host_keys:
            self._host_keys[key] = host_key = (dns_label(namespace), dns_label(service))
            self._reindex(host_key)

    def remove(self, namespace: str, service: str) -> None:
        """Forget (namespace, service); removing an unknown entry does nothing."""
        key = (namespace, service)
        if key in self._backends:
            del self._backends[key]
            self._reindex(self._host_keys.pop(key))

    def resolve(self, namespace: str, service: str) -> Address | None:
        """The backend of exactly this entry, or None (unknown, or no live revision)."""
        return self._backends.get((namespace, service))

    def resolve_peer(self, namespace: str, service: str) -> Address | None:
        """The namespace's live backend if there is one, else the baseline's."""
        backend = self._backends.get((namespace, service))
        if backend is None:
            backend = self._backends.get((BASELINE, service))
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

    def entries(self) -> list[tuple[str, str, Address | None]]:
        """Every entry as (namespace, service, backend), sorted by namespace, service."""
        return [(ns, svc, self._backends[ns, svc]) for ns, svc in sorted(self._backends)]

    def _reindex(self, host_key: _Key) -> None:
        candidates = [key for key, hk in self._host_keys.items() if hk == host_key]
        if not candidates:
            self._by_host.pop(host_key, None)
            return
        # Two names with one DNS form ("other_app", "other-app"): the DNS-safe one wins.
        self._by_host[host_key] = min(candidates, key=lambda k: (k != host_key, k))


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


class _ClientSide(asyncio.Protocol):
    """One accepted connection, and the backend connection it is spliced to.

    States: reading the head (main listener only), connecting to the backend,
    splicing, or answering an error ourselves. The backend half is a thin
    :class:`_BackendSide` that forwards its events here.
    """

    def __init__(self, listener: _Listener) -> None:
        self._listener = listener
        self._peer_key = listener.peer_key  # None: the main listener, routed by Host
        self._transport: asyncio.Transport | None = None
        self._backend: asyncio.Transport | None = None
        self._buffer = b""  # bytes read before the backend connection exists
        self._scanned = 0  # how far _buffer was searched for the end of the head
        self._answering = False  # we wrote our own response; discard input
        self._client_eof = False
        self._backend_eof = False
        self._backend_full = False  # the backend transport's write buffer is full
        self._timer: asyncio.TimerHandle | None = None
        self._connecting: asyncio.Task[None] | None = None
        self._route: _Key = ("", "")  # (namespace, service) once routed

    # -- client transport events -------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = t = cast(asyncio.Transport, transport)
        if not self._listener.track(self):
            t.abort()
            return
        if self._peer_key is None:
            loop = asyncio.get_running_loop()
            self._timer = loop.call_later(HEAD_TIMEOUT_SECONDS, t.close)
            return
        namespace, service = self._peer_key
        backend = self._listener.table.resolve_peer(namespace, service)
        if backend is None:
            self._answer(_text_response(503, f"no live revision of {service} in {namespace} yet"))
        else:
            self._connect(namespace, service, backend)

    def data_received(self, data: bytes) -> None:
        backend = self._backend
        if backend is not None:
            backend.write(data)
        elif self._answering:
            pass
        elif self._connecting is not None:
            self._buffer += data
        else:
            self._buffer += data
            self._route_by_host()

    def eof_received(self) -> bool:
        self._client_eof = True
        if self._backend is not None:
            if self._backend_eof:
                self._backend.close()
                return False  # the client transport closes itself
            if self._backend.can_write_eof():
                self._backend.write_eof()
            return True
        # Still connecting: keep the client open to carry the answer; the EOF is
        # passed on once connected. Otherwise (no head yet, or answered): close.
        return self._connecting is not None

    def connection_lost(self, exc: Exception | None) -> None:
        self._listener.connections.discard(self)
        if self._timer is not None:
            self._timer.cancel()
        if self._connecting is not None:
            self._connecting.cancel()
        if self._backend is not None:
            if exc is None:
                self._backend.close()
            else:
                self._backend.abort()

    def pause_writing(self) -> None:
        if self._backend is not None and not self._backend_eof:
            self._backend.pause_reading()

    def resume_writing(self) -> None:
        if self._backend is not None and not self._backend_eof:
            self._backend.resume_reading()

    # -- backend transport events (called by _BackendSide) -----------------------

    def backend_made(self, backend: asyncio.Transport) -> None:
        client = self._transport
        assert client is not None
        if client.is_closing():
            backend.close()
            return
        self._backend = backend
        if self._buffer:
            data, self._buffer = self._buffer, b""
            backend.write(data)
        if self._client_eof:
            if backend.can_write_eof():
                backend.write_eof()
        elif not self._backend_full:
            client.resume_reading()

    def backend_eof(self, answered: bool) -> bool:
        self._backend_eof = True
        client = self._transport
        assert client is not None
        if not answered and self._peer_key is None:
            self._answer_backend_hung_up()
            return False
        if self._client_eof:
            client.close()
            return False  # the backend transport closes itself
        if client.can_write_eof():
            client.write_eof()
        return True

    def backend_lost(self, answered: bool) -> None:
        assert self._transport is not None
        if self._answering:
            return
        if not answered and self._peer_key is None:
            self._answer_backend_hung_up()
        else:
            self._transport.close()  # sends what is still buffered for the client first

    def _answer_backend_hung_up(self) -> None:
        """The backend ended the connection without a byte of answer (it crashed?)."""
        self._backend = None
        namespace, service = self._route
        self._answer(
            _text_response(502, f"{service} in {namespace} closed the connection without answering")
        )

    def backend_full(self, full: bool) -> None:
        self._backend_full = full
        client = self._transport
        if client is None or self._client_eof:
            return
        if full:
            client.pause_reading()
        else:
            client.resume_reading()

    # -- routing -----------------------------------------------------------------

    def _route_by_host(self) -> None:
        buffer = self._buffer
        end = buffer.find(_HEAD_END, max(0, self._scanned - 3))
        if end < 0 or end + 4 > MAX_HEAD_BYTES:
            if len(buffer) >= MAX_HEAD_BYTES:
                self._answer(_text_response(431, "request head larger than 64 KiB"))
            self._scanned = len(buffer)
            return
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        hosts = _HOST_HEADER.findall(buffer, 0, end)
        if len(hosts) != 1 or not hosts[0].strip():
            problem = "no Host header" if not hosts else "more than one Host header"
            self._answer(_text_response(400, f"bad request: {problem}"))
            return
        host = hosts[0].strip().decode("latin-1")
        table = self._listener.table
        key = table.resolve_host(host)
        if key is None:
            self._answer(_not_found_page(host, table.entries()))
            return
        namespace, service = key
        backend = table.resolve(namespace, service)
        if backend is None:
            self._answer(_text_response(503, f"no live revision of {service} in {namespace} yet"))
            return
        self._connect(namespace, service, backend)

    def _connect(self, namespace: str, service: str, backend: Address) -> None:
        assert self._transport is not None
        self._route = (namespace, service)
        self._transport.pause_reading()
        self._connecting = asyncio.get_running_loop().create_task(
            self._open_backend(namespace, service, backend)
        )

    async def _open_backend(self, namespace: str, service: str, backend: Address) -> None:
        loop = asyncio.get_running_loop()
        host, port = backend
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT_SECONDS):
                await loop.create_connection(lambda: _BackendSide(self), host, port)
        except Exception as exc:  # OSError mostly; TimeoutError; a bad address
            reason = str(exc) or type(exc).__name__
            _log.warning(
                "cannot reach %s in %s at %s:%s: %s", service, namespace, host, port, reason
            )
            self._answer(
                _text_response(
                    502, f"cannot reach {service} in {namespace} at {host}:{port}: {reason}"
                )
            )
        finally:
            self._connecting = None

    def _answer(self, response: bytes) -> None:
        """Write our own response, end our side, and linger before closing."""
        client = self._transport
        assert client is not None
        if client.is_closing():
            return
        self._answering = True
        self._buffer = b""
        client.write(response)
        if self._client_eof or not client.can_write_eof():
            client.close()
            return
        client.write_eof()
        # Read and discard what the client still sends until it closes (or we give up),
        # so that unread bytes do not turn our close into a reset that eats the answer.
        client.resume_reading()
        if self._timer is not None:
            self._timer.cancel()
        self._timer = asyncio.get_running_loop().call_later(LINGER_SECONDS, client.abort)

    def abort(self) -> None:
        """Drop both halves now (router shutdown)."""
        if self._connecting is not None:
            self._connecting.cancel()
        if self._backend is not None:
            self._backend.abort()
        if self._transport is not None:
            self._transport.abort()


class _BackendSide(asyncio.Protocol):
    """The backend half of a spliced pair: passes everything to its client half."""

    def __init__(self, client: _ClientSide) -> None:
        self._client = client
        client_transport = client._transport
        assert client_transport is not None
        self._client_transport = client_transport

        self._answered = False  # has the backend sent anything yet?

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._client.backend_made(cast(asyncio.Transport, transport))

    def data_received(self, data: bytes) -> None:
        self._answered = True
        self._client_transport.write(data)

    def eof_received(self) -> bool:
        return self._client.backend_eof(self._answered)

    def connection_lost(self, exc: Exception | None) -> None:
        self._client.backend_lost(self._answered)

    def pause_writing(self) -> None:
        self._client.backend_full(True)

    def resume_writing(self) -> None:
        self._client.backend_full(False)


class _Listener:
    """One listening socket and the connections it accepted."""

    def __init__(self, table: RouteTable, peer_key: _Key | None) -> None:
        self.table = table
        self.peer_key = peer_key  # None: the main listener, routed by Host
        self.connections: set[_ClientSide] = set()
        self.closing = False
        self.server: asyncio.Server | None = None
        self.port = 0

    async def open(self, host: str, port: int) -> int:
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(
            lambda: _ClientSide(self), host, port, backlog=LISTEN_BACKLOG
        )
        self.port = self.server.sockets[0].getsockname()[1]
        return self.port

    def track(self, connection: _ClientSide) -> bool:
        if self.closing:
            return False
        self.connections.add(connection)
        return True

    async def close(self) -> None:
        """Stop listening, abort every connection, and return once their sockets are shut."""
        self.closing = True
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
    """Owns the listening sockets and the proxied connections; routes by a RouteTable.

    One main listener routes by Host header; any number of peer listeners each lead
    to one (namespace, service). All methods run on the event loop's thread.
    """

    def __init__(self, table: RouteTable) -> None:
        self._table = table
        self._main: _Listener | None = None
        self._peers: dict[_Key, _Listener] = {}
        self._peer_lock: asyncio.Lock | None = None

    async def serve(self, host: str, port: int) -> int:
        """Start the main listener (port 0 picks a free one); return the bound port."""
        if self._main is not None:
            raise RuntimeError(f"the router already serves on port {self._main.port}")
        listener = _Listener(self._table, None)
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
        """A stable address whose connections go to ``table.resolve_peer(...)``.

        The backend is looked up for each new connection, so the listener follows new
        revisions and the baseline fallback. Idempotent: if the (namespace, service)
        already has a listener, its port is returned (``host`` and ``port`` are then
        ignored). Raises OSError if the asked-for port cannot be bound.
        """
        if self._peer_lock is None:
            self._peer_lock = asyncio.Lock()
        key = (namespace, service)
        async with self._peer_lock:
            existing = self._peers.get(key)
            if existing is not None:
                return existing.port
            listener = _Listener(self._table, key)
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

    async def close(self) -> None:
        """Close every listener and every open proxied connection."""
        listeners = list(self._peers.values())
        if self._main is not None:
            listeners.append(self._main)
        self._peers.clear()
        self._main = None
        await asyncio.gather(*(listener.close() for listener in listeners))

    def _open_connections(self) -> int:
        """How many proxied connections are open (for tests and diagnostics)."""
        listeners = [*self._peers.values(), *([self._main] if self._main else [])]
        return sum(len(listener.connections) for listener in listeners)
