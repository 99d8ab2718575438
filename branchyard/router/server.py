"""Listeners and the Router: the listening sockets, their connections, and the pool they share."""

from __future__ import annotations

import asyncio
import contextlib
import socket

from branchyard.router import limits
from branchyard.router.caps import Admission, Budget, process_budget
from branchyard.router.dial import Dialer
from branchyard.router.limits import (
    LISTEN_BACKLOG,
    Address,
    _Key,
    _now,
)
from branchyard.router.pages import _text_response
from branchyard.router.pool import _Pool
from branchyard.router.proxy import _ClientConnection
from branchyard.router.table import RouteTable


class _Listener:
    """One listening socket and the connections it accepted (and did not refuse)."""

    def __init__(
        self, table: RouteTable, pool: _Pool, peer_key: _Key | None, admission: Admission
    ) -> None:
        self.table = table
        self.pool = pool
        self.peer_key = peer_key  # None: the main listener, routed by Host
        self.admission = admission
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

    async def open_on(self, sock: socket.socket) -> None:
        """Accept on ``sock``, a socket already listening (made in a box's namespace)."""
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(lambda: _ClientConnection(self), sock=sock)
        self.port = sock.getsockname()[1]

    def track(self, connection: _ClientConnection) -> bool:
        """Hold a new connection, or end it at once (False): the listener closes, or a
        cap is reached (then it gets a 503 line, and its descriptor is freed as soon as
        that is sent)."""
        transport = connection.transport
        if self.closing:
            transport.abort()
            return False
        main = self.peer_key is None
        refusal = self.admission.refusal(main, len(self.connections), connection.source)
        if refusal is not None:
            transport.write(_text_response(503, f"too many connections: {refusal}"))
            transport.close()
            return False
        self.admission.admit(main, connection.source)
        self.connections.add(connection)
        if self._sweeper is None:
            loop = asyncio.get_running_loop()
            self._sweeper = loop.call_later(limits.SWEEP_SECONDS, self._sweep)
        return True

    def untrack(self, connection: _ClientConnection) -> None:
        if connection in self.connections:
            self.connections.remove(connection)
            self.admission.release(self.peer_key is None, connection.source)

    def _sweep(self) -> None:
        """Close connections that have waited too long for a request head."""
        self._sweeper = None
        deadline = _now() - limits.HEAD_TIMEOUT_SECONDS
        for connection in list(self.connections):
            connection.close_if_idle(deadline)
        if self.connections and not self.closing:
            self._sweeper = asyncio.get_running_loop().call_later(limits.SWEEP_SECONDS, self._sweep)

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


class BoxListener(_Listener):
    """A peer listener inside one box's namespace; it goes with the box."""

    def __init__(
        self,
        table: RouteTable,
        pool: _Pool,
        peer_key: _Key,
        admission: Admission,
        owners: set[_Listener],
    ) -> None:
        super().__init__(table, pool, peer_key, admission)
        self._owners = owners

    async def close(self) -> None:
        self._owners.discard(self)
        await super().close()


class Router:
    """Owns the listening sockets, the proxied connections and the backend connection
    pool; routes each request by a RouteTable.

    One main listener routes by Host header; any number of peer listeners each lead
    to one (namespace, service). All methods run on the event loop's thread. How many
    client connections they hold is capped by ``budget`` (by default the one this
    process's file descriptor limit allows: :mod:`branchyard.router.caps`).
    """

    def __init__(self, table: RouteTable, budget: Budget | None = None) -> None:
        self._table = table
        self.dialer = Dialer()
        self._pool = _Pool(self.dialer)
        self._admission = Admission(budget or process_budget())
        self._main: _Listener | None = None
        self._peers: dict[_Key, _Listener] = {}
        self._in_boxes: set[_Listener] = set()  # peer listeners inside boxes' namespaces
        self._peer_lock: asyncio.Lock | None = None

    async def serve(self, host: str, port: int) -> int:
        """Start the main listener (port 0 picks a free one); return the bound port."""
        if self._main is not None:
            raise RuntimeError(f"the router already serves on port {self._main.port}")
        listener = _Listener(self._table, self._pool, None, self._admission)
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
            listener = _Listener(self._table, self._pool, key, self._admission)
            bound = await listener.open(host, port)
            self._peers[key] = listener
            return bound

    async def serve_peer_in_box(
        self, namespace: str, service: str, sock: socket.socket
    ) -> BoxListener:
        """Serve (namespace, service)'s peer address on ``sock``, a socket listening
        inside a box's network namespace, until the returned listener is closed."""
        listener = BoxListener(
            self._table, self._pool, (namespace, service), self._admission, self._in_boxes
        )
        await listener.open_on(sock)
        self._in_boxes.add(listener)
        return listener

    def peer_at(self, port: int) -> _Key | None:
        """The (namespace, service) whose peer listener has ``port``, or None."""
        return next((key for key, peer in self._peers.items() if peer.port == port), None)

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
        listeners = [*self._peers.values(), *self._in_boxes]
        if self._main is not None:
            listeners.append(self._main)
        self._peers.clear()
        self._in_boxes.clear()
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
