"""Backend connections: the keep-alive pool per backend address, draining, and the
response side of a proxied request.

A backend connection talks to its client connection only through :class:`Client`, so
this module does not import the proxy (which imports it).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from typing import Protocol, cast

import httptools

from branchyard.router import limits
from branchyard.router.dial import Dialer
from branchyard.router.limits import (
    MAX_HEAD_BYTES,
    POOL_MAX_IDLE,
    Address,
    _now,
)
from branchyard.router.request import _Request, _Stop

_log = logging.getLogger(__name__)


class Client(Protocol):
    """What a backend connection needs of the client connection it serves."""

    transport: asyncio.Transport

    def response_done(self, backend: _BackendConnection) -> None: ...

    def backend_failed(self, backend: _BackendConnection, what: str) -> None: ...

    def upgraded(self, backend: _BackendConnection) -> None: ...

    def backend_eof(self) -> bool: ...

    def backend_lost(self) -> None: ...

    def backend_full(self, full: bool) -> None: ...


_QUICKACK: int | None = getattr(socket, "TCP_QUICKACK", None)  # Linux only
_SMALL_PIECE = 16 * 1024


def _head_end(data: bytes, heads: int) -> int:
    """The offset just past the ``heads``-th blank line of ``data``, or -1."""
    end = 0
    for _ in range(heads):
        found = data.find(b"\r\n\r\n", end)
        if found < 0:
            return -1
        end = found + 4
    return end


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
        self.client: Client | None = None  # None while idle
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

    def attach(self, client: Client, request: _Request) -> None:
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

    def __init__(self, dialer: Dialer) -> None:
        self.dialer = dialer  # how a new connection to a backend is made
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
        fresh_since = _now() - limits.POOL_IDLE_SECONDS
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
                self._sweeper = loop.call_later(limits.SWEEP_SECONDS, self._sweep)
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
        fresh_since = _now() - limits.POOL_IDLE_SECONDS
        waiting = False
        for entry in list(self.entries.values()):
            idle = entry.idle
            while idle and idle[0].idle_since <= fresh_since:
                idle.pop(0).transport.close()
            waiting = waiting or bool(idle)
        if waiting and not self.closing:
            self._sweeper = asyncio.get_running_loop().call_later(limits.SWEEP_SECONDS, self._sweep)

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
