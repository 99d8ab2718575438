"""The client side: one accepted connection parses its requests (httptools), routes
each by the table, and passes it to a pooled backend connection.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from typing import Protocol, cast

import httptools

from branchyard.router import limits
from branchyard.router.limits import (
    MAX_HEAD_BYTES,
    Address,
    _Key,
    _now,
)
from branchyard.router.pages import _not_found_page, _text_response
from branchyard.router.pool import _Backend, _BackendConnection, _Pool
from branchyard.router.request import _Request, _Stop
from branchyard.router.table import RouteTable, _split_host

_log = logging.getLogger(__name__)

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

_HOME_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})  # the router's own address
_HOME_KEY: _Key = ("", "")


class Listener(Protocol):
    """What a client connection needs of the listener that accepted it."""

    table: RouteTable
    pool: _Pool
    peer_key: _Key | None

    def track(self, connection: _ClientConnection) -> bool: ...

    def untrack(self, connection: _ClientConnection) -> None: ...


def _who(request: _Request) -> str:
    namespace, service = request.route
    return f"{service} in {namespace}"


class _ClientConnection(asyncio.Protocol):
    """One accepted connection: parses its requests and passes each to a backend.

    Also the httptools request parser's callback object (``on_*`` methods).
    """

    transport: asyncio.Transport

    def __init__(self, listener: Listener) -> None:
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
        self.source = ""  # the client's address, as the listener's caps count it
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
        peer = t.get_extra_info("peername")
        self.source = str(peer[0] if isinstance(peer, tuple) else "unknown")
        if not self._listener.track(self):
            self._answering = self._detour = True  # refused: whatever it sends is discarded
            return
        self._client_ip = ip = self.source.encode()
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
        self._listener.untrack(self)
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
                    self._answer(_not_found_page(text))
                    return
                key, backend = _HOME_KEY, table.home
            else:
                backend = table.resolve(*key)
        else:
            key = peer_key
            backend = table.resolve_peer(*key)
        request.route = key
        if backend is not None and self._pool.in_flight(backend) >= limits.BACKEND_CONNECTIONS:
            namespace, service = key
            text = f"{service} in {namespace} has {limits.BACKEND_CONNECTIONS} requests under way"
            self._answer(_text_response(503, f"{text}, its most: try again"))
            return
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
                async with asyncio.timeout(limits.CONNECT_TIMEOUT_SECONDS):
                    _, connection = await pool.dialer.connect(
                        lambda: _BackendConnection(entry, pool), entry.address
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
            self._linger = asyncio.get_running_loop().call_later(
                limits.LINGER_SECONDS, client.abort
            )

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
