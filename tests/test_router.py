"""Tests for the router: real sockets on 127.0.0.1, backends run by http.server in threads.

The router runs on an event loop in a background thread (see ``LoopThread``), so the
tests themselves can use blocking clients: http.client and plain sockets.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import os
import select
import socket
import socketserver
import threading
import time
from collections import Counter
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, ClassVar, TypeVar

import pytest

from branchyard.router import BASELINE, Address, Router, RouteTable
from branchyard.router import limits as router_module
from branchyard.router.caps import Budget, budget_for
from tests.conftest import free_port

T = TypeVar("T")
TIMEOUT = 5.0
WEB = "web.main.localhost"


# -- harness ---------------------------------------------------------------------


class LoopThread:
    """An event loop running in a daemon thread; tests hand it coroutines."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(TIMEOUT)

    def start(self, coro: Coroutine[Any, Any, T]) -> Any:
        """Start ``coro`` on the loop without waiting; returns a concurrent Future."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def call(self, fn: Callable[..., T], *args: Any) -> T:
        async def on_loop() -> T:
            return fn(*args)

        return self.run(on_loop())

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(TIMEOUT)
        self.loop.close()


@dataclass
class Proxy:
    loop: LoopThread
    table: RouteTable
    router: Router
    port: int

    def set_backend(self, namespace: str, service: str, backend: Address | None) -> None:
        self.loop.call(self.table.set_backend, namespace, service, backend)

    def set_weights(self, namespace: str, service: str, weights: list[tuple[Address, int]]) -> None:
        self.loop.call(self.table.set_weights, namespace, service, weights)

    def remove(self, namespace: str, service: str) -> None:
        self.loop.call(self.table.remove, namespace, service)

    def get(self, host: str, path: str = "/") -> tuple[int, dict[str, str], bytes]:
        return http_get(self.port, host, path)

    def in_flight(self, backend: Address) -> int:
        return self.loop.call(self.router.in_flight, backend)

    def idle(self, backend: Address) -> int:
        return self.loop.call(self.router._idle_connections, backend)

    def drain(self, backend: Address, grace: float) -> int:
        return self.loop.run(self.router.drain(backend, grace))


def http_get(port: int, host: str, path: str = "/") -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=TIMEOUT)
    try:
        conn.request("GET", path, headers={"Host": host})
        response = conn.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        conn.close()


def ask(
    conn: http.client.HTTPConnection,
    path: str = "/",
    host: str = WEB,
    method: str = "GET",
    headers: dict[str, str] | None = None,
) -> tuple[int, bytes]:
    """One request on a kept-alive connection; (status, body)."""
    conn.request(method, path, headers={"Host": host, **(headers or {})})
    response = conn.getresponse()
    return response.status, response.read()


def keep_alive(port: int) -> http.client.HTTPConnection:
    return http.client.HTTPConnection("127.0.0.1", port, timeout=TIMEOUT)


def wait_until(condition: Callable[[], bool], what: str, timeout: float = TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


@pytest.fixture
def proxy() -> Iterator[Proxy]:
    loop = LoopThread()
    table = RouteTable()
    router = Router(table)
    port = loop.run(router.serve("127.0.0.1", 0))
    try:
        yield Proxy(loop, table, router, port)
    finally:
        loop.run(router.close())
        loop.stop()


class Backend(BaseHTTPRequestHandler):
    """Answers ``NAME PATH PEERPORT`` and a few special paths; echoes bodies; upgrades.

    Each subclass (one per backend) records the router-side port of every request it
    served (``seen``) and of every connection that ended (``closed``). ``/held`` answers
    once the test sets ``release``: a request in flight for as long as a test needs,
    whatever the machine's speed.
    """

    protocol_version = "HTTP/1.1"
    name = "backend"
    seen: ClassVar[list[int]]
    closed: ClassVar[list[int]]
    release: ClassVar[threading.Event]

    def do_GET(self) -> None:
        type(self).seen.append(self.client_address[1])
        if self.headers.get("Upgrade"):
            self._upgrade()
            return
        if self.path == "/held":
            type(self).release.wait(60)  # bounded: a test that fails never sets it
        if self.path.startswith("/status/"):
            self.send_response(int(self.path.rsplit("/", 1)[1]))
            self.end_headers()
            return
        if self.path == "/chunked":
            self._chunked_answer([b"a", b"bb", b"ccc"])
            return
        if self.path == "/close-delimited":
            self.wfile.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nuntil the end")
            self.close_connection = True
            return
        if self.path == "/headers":
            self._answer(f"{self.requestline}\r\n{self.headers}".encode())
            return
        self._answer(f"{self.name} {self.path} {self.client_address[1]}".encode())

    def do_HEAD(self) -> None:
        type(self).seen.append(self.client_address[1])
        self.send_response(200)
        self.send_header("Content-Length", "1000")
        self.end_headers()

    def do_POST(self) -> None:
        type(self).seen.append(self.client_address[1])
        if self.headers["Transfer-Encoding"] != "chunked":
            self._answer(b"got " + self.rfile.read(int(self.headers["Content-Length"])))
            return
        self.send_response(200)
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        self.wfile.flush()
        while True:  # echo each chunk as soon as it arrives
            size = int(self.rfile.readline().strip(), 16)
            chunk = self.rfile.read(size)
            self.rfile.readline()
            self.wfile.write(b"%x\r\n%s\r\n" % (size, chunk))
            self.wfile.flush()
            if size == 0:
                return

    def finish(self) -> None:
        super().finish()
        type(self).closed.append(self.client_address[1])

    def _answer(self, body: bytes) -> None:
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _chunked_answer(self, chunks: list[bytes]) -> None:
        self.send_response(200)
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        for chunk in [*chunks, b""]:
            self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            self.wfile.flush()

    def _upgrade(self) -> None:
        self.send_response(101)
        self.send_header("Upgrade", self.headers["Upgrade"])
        self.send_header("Connection", "Upgrade")
        self.end_headers()
        self.wfile.flush()
        self.close_connection = True
        while data := self.rfile.read1(65536):
            self.connection.sendall(b"echo:" + data)

    def log_message(self, format: str, *args: Any) -> None:
        pass


class QuietServer(ThreadingHTTPServer):
    block_on_close = False  # keep-alive handler threads must not delay teardown

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # a backend whose connection the router aborted: expected in drain tests


@dataclass
class Backends:
    servers: list[socketserver.BaseServer] = field(default_factory=list)
    handlers: dict[Address, type[Backend]] = field(default_factory=dict)

    def http(self, name: str) -> Address:
        handler = type(
            f"Backend_{name}",
            (Backend,),
            {"name": name, "seen": [], "closed": [], "release": threading.Event()},
        )
        address = self._start(QuietServer(("127.0.0.1", 0), handler))
        self.handlers[address] = handler
        return address

    def tcp(self, handler: type[socketserver.BaseRequestHandler]) -> Address:
        server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), handler)
        server.daemon_threads = True
        server.block_on_close = False
        return self._start(server)

    def stats(self, address: Address) -> type[Backend]:
        return self.handlers[address]

    def _start(self, server: socketserver.TCPServer) -> Address:
        threading.Thread(target=server.serve_forever, args=(0.01,), daemon=True).start()
        self.servers.append(server)
        host, port = server.server_address[:2]
        return str(host), int(port)

    def stop(self) -> None:
        for handler in self.handlers.values():
            handler.release.set()
        for server in self.servers:
            server.shutdown()
            server.server_close()


@pytest.fixture
def backends() -> Iterator[Backends]:
    started = Backends()
    try:
        yield started
    finally:
        started.stop()


def connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)


def recv_until(sock: socket.socket, marker: bytes, buffer: bytearray) -> bytes:
    """Read into ``buffer`` until it holds ``marker``; return and consume up to it."""
    while marker not in buffer:
        data = sock.recv(65536)
        assert data, f"connection closed before {marker!r}; got {bytes(buffer)!r}"
        buffer += data
    end = buffer.index(marker) + len(marker)
    head = bytes(buffer[:end])
    del buffer[:end]
    return head


def recv_all(sock: socket.socket) -> bytes:
    chunks = []
    while data := sock.recv(65536):
        chunks.append(data)
    return b"".join(chunks)


def raw_exchange(port: int, request: bytes) -> bytes:
    with connect(port) as sock:
        sock.sendall(request)
        return recv_all(sock)


def who(body: bytes) -> bytes:
    """The backend name in a default answer."""
    return body.split()[0]


def open_sockets(ports: set[int]) -> int:
    """How many of this process's TCP sockets, listeners aside, have an end on one of `ports`."""
    inodes = set()
    for table in ("/proc/self/net/tcp", "/proc/self/net/tcp6"):
        with open(table) as rows:
            for row in list(rows)[1:]:
                local, remote, state, inode = (row.split()[i] for i in (1, 2, 3, 9))
                ends = {int(local.rsplit(":", 1)[1], 16), int(remote.rsplit(":", 1)[1], 16)}
                if state != "0A" and ends & ports:
                    inodes.add(f"socket:[{inode}]")
    fd_dir = "/proc/self/fd"
    links = []
    for fd in os.listdir(fd_dir):
        try:
            links.append(os.readlink(os.path.join(fd_dir, fd)))
        except FileNotFoundError:  # closed while we looked
            continue
    return sum(link in inodes for link in links)


# -- the route table -------------------------------------------------------------


def test_host_names_reach_services_by_their_dns_safe_form_in_any_case() -> None:
    table = RouteTable()
    table.set_backend("bugfix", "other_app", ("127.0.0.1", 1))
    table.set_backend(BASELINE, "web", ("127.0.0.1", 2))

    assert table.resolve_host("other-app.bugfix.localhost:7080") == ("bugfix", "other_app")
    assert table.resolve_host("OTHER-APP.Bugfix.LOCALHOST") == ("bugfix", "other_app")
    assert table.resolve_host("web.main.localhost") == ("main", "web")
    assert table.resolve_host("web.main.localhost.") == ("main", "web")
    assert table.resolve_host("other_app.bugfix.localhost") == ("bugfix", "other_app")


def test_a_service_whose_name_is_already_dns_safe_wins_a_shared_host_name() -> None:
    table = RouteTable()
    table.set_backend("main", "other_app", ("127.0.0.1", 1))
    table.set_backend("main", "other-app", ("127.0.0.1", 2))
    assert table.resolve_host("other-app.main.localhost") == ("main", "other-app")

    table.remove("main", "other-app")
    assert table.resolve_host("other-app.main.localhost") == ("main", "other_app")


def test_host_names_that_name_no_entry_resolve_to_none() -> None:
    table = RouteTable()
    table.set_backend("main", "web", ("127.0.0.1", 2))

    for host in ["localhost:7080", "127.0.0.1:7080", "[::1]:7080", "", "web.bugfix.localhost"]:
        assert table.resolve_host(host) is None, host


def test_entries_are_sorted_and_removal_forgets_the_host_name() -> None:
    table = RouteTable()
    table.set_backend("main", "web", ("127.0.0.1", 2))
    table.set_backend("bugfix", "web", None)
    table.set_backend("bugfix", "app", ("127.0.0.1", 3))

    assert table.entries() == [
        ("bugfix", "app", ("127.0.0.1", 3)),
        ("bugfix", "web", None),
        ("main", "web", ("127.0.0.1", 2)),
    ]
    table.remove("bugfix", "app")
    table.remove("bugfix", "never-there")
    assert table.resolve_host("app.bugfix.localhost") is None
    assert table.resolve("bugfix", "app") is None


def test_peers_resolve_to_their_namespace_first_then_to_the_baseline() -> None:
    table = RouteTable()
    table.set_backend(BASELINE, "app", ("127.0.0.1", 1))
    assert table.resolve_peer("bugfix", "app") == ("127.0.0.1", 1)

    table.set_backend("bugfix", "app", None)
    assert table.resolve_peer("bugfix", "app") == ("127.0.0.1", 1)

    table.set_backend("bugfix", "app", ("127.0.0.1", 2))
    assert table.resolve_peer("bugfix", "app") == ("127.0.0.1", 2)
    assert table.resolve_peer("bugfix", "nothing") is None

    table.set_weights("bugfix", "app", [(("127.0.0.1", 2), 0)])
    assert table.resolve_peer("bugfix", "app") == ("127.0.0.1", 1)


def test_weights_choose_a_backend_on_every_resolve_in_proportion() -> None:
    table = RouteTable()
    a, b, c = ("127.0.0.1", 1), ("127.0.0.1", 2), ("127.0.0.1", 3)

    table.set_weights("main", "web", [(a, 100), (b, 0)])
    assert {table.resolve("main", "web") for _ in range(200)} == {a}

    table.set_weights("main", "web", [(a, 1), (b, 3), (c, 0)])
    counts = Counter(table.resolve("main", "web") for _ in range(4000))
    assert set(counts) == {a, b}
    assert 700 < counts[a] < 1300  # expected 1000

    table.set_weights("main", "web", [(a, 0), (b, 0)])
    assert table.resolve("main", "web") is None


def test_entries_show_the_highest_weight_backend_and_routes_to_knows_every_one() -> None:
    table = RouteTable()
    a, b = ("127.0.0.1", 1), ("127.0.0.1", 2)

    table.set_weights("main", "web", [(a, 10), (b, 90)])
    assert table.entries() == [("main", "web", b)]
    assert table.routes_to(a) and table.routes_to(b)
    assert table.resolve_host("web.main.localhost") == ("main", "web")

    table.set_weights("main", "web", [(a, 0), (b, 0)])
    assert table.entries() == [("main", "web", None)]
    assert not table.routes_to(a)

    with pytest.raises(ValueError, match="negative"):
        table.set_weights("main", "web", [(a, -1)])


# -- the main listener: routing --------------------------------------------------


def test_host_header_picks_the_namespace_and_service(proxy: Proxy, backends: Backends) -> None:
    proxy.set_backend("main", "web", backends.http("web-main"))
    proxy.set_backend("bugfix", "web", backends.http("web-bugfix"))
    proxy.set_backend("bugfix", "other_app", backends.http("other-bugfix"))

    status, _, body = proxy.get(f"web.main.localhost:{proxy.port}", "/a")
    assert (status, body.split()[:2]) == (200, [b"web-main", b"/a"])
    status, _, body = proxy.get(f"web.bugfix.localhost:{proxy.port}", "/b")
    assert (status, body.split()[:2]) == (200, [b"web-bugfix", b"/b"])
    status, _, body = proxy.get(f"other-app.bugfix.localhost:{proxy.port}")
    assert (status, who(body)) == (200, b"other-bugfix")


def test_keep_alive_connection_serves_two_requests_on_one_backend_connection(
    proxy: Proxy, backends: Backends
) -> None:
    proxy.set_backend("main", "web", backends.http("web"))
    conn = keep_alive(proxy.port)
    try:
        answers = []
        for path in ["/one", "/two"]:
            answers.append(ask(conn, path)[1].split())
            sock = conn.sock
        assert sock is conn.sock  # http.client did not reconnect
        assert [a[1] for a in answers] == [b"/one", b"/two"]
        assert answers[0][2] == answers[1][2]  # same upstream connection (same source port)
    finally:
        conn.close()


def test_a_backend_head_that_comes_without_its_body_is_acknowledged_at_once(
    proxy: Proxy, backends: Backends, monkeypatch: pytest.MonkeyPatch
) -> None:
    # http.server sends the head and the body in two writes without TCP_NODELAY: Nagle holds
    # the body back until the head is acknowledged, and on a kept-alive connection Linux
    # delays that ACK by ~40 ms. So the router asks for a quick ACK as soon as it has read a
    # head alone. This backend sends each body only once the test saw the router ask.
    quick_acks: list[int] = []  # the local port of each socket that asked
    setsockopt = socket.socket.setsockopt

    def spy(sock: socket.socket, level: int, option: int, *value: Any) -> None:
        if (level, option) == (socket.IPPROTO_TCP, socket.TCP_QUICKACK):
            quick_acks.append(sock.getsockname()[1])
        setsockopt(sock, level, option, *value)

    monkeypatch.setattr(socket.socket, "setsockopt", spy)
    router_ports: list[int] = []
    body_may_go = threading.Semaphore(0)

    class HeadThenBody(socketserver.BaseRequestHandler):
        def handle(self) -> None:
            router_ports.append(self.client_address[1])
            buffer = bytearray()
            for _ in range(3):
                recv_until(self.request, b"\r\n\r\n", buffer)
                self.request.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\n")
                assert body_may_go.acquire(timeout=TIMEOUT)
                self.request.sendall(b"body")

    proxy.set_backend("main", "web", backends.tcp(HeadThenBody))
    with connect(proxy.port) as client:
        buffer = bytearray()
        for answered in range(3):
            client.sendall(b"GET / HTTP/1.1\r\nHost: web.main.localhost\r\n\r\n")
            recv_until(client, b"\r\n\r\n", buffer)  # the head went through alone
            asked = proxy.loop.call(quick_acks.copy)  # once the router's read of it is over
            assert asked == router_ports * (answered + 1)  # one pooled connection, asked each time
            body_may_go.release()
            recv_until(client, b"body", buffer)


def test_a_keep_alive_client_moves_to_the_new_backend_at_its_next_request(
    proxy: Proxy, backends: Backends
) -> None:
    old, new = backends.http("old"), backends.http("new")
    proxy.set_backend("main", "web", old)
    conn = keep_alive(proxy.port)
    try:
        assert who(ask(conn)[1]) == b"old"
        sock = conn.sock
        proxy.set_backend("main", "web", new)
        assert who(ask(conn)[1]) == b"new"
        proxy.set_backend("main", "web", old)
        assert who(ask(conn)[1]) == b"old"
        assert conn.sock is sock  # all on one client connection
    finally:
        conn.close()


def test_backend_connections_are_pooled_across_client_connections(
    proxy: Proxy, backends: Backends
) -> None:
    web = backends.http("web")
    proxy.set_backend("main", "web", web)

    for _ in range(20):  # a new client connection each time
        assert proxy.get(WEB)[0] == 200

    assert len(backends.stats(web).seen) == 20
    assert len(set(backends.stats(web).seen)) == 1  # one backend connection served them all
    assert proxy.idle(web) == 1
    assert proxy.in_flight(web) == 0


def test_weights_apply_to_each_request_of_one_keep_alive_connection(
    proxy: Proxy, backends: Backends
) -> None:
    a, b = backends.http("a"), backends.http("b")
    conn = keep_alive(proxy.port)
    try:
        proxy.set_weights("main", "web", [(a, 100), (b, 0)])
        assert {who(ask(conn)[1]) for _ in range(20)} == {b"a"}

        proxy.set_weights("main", "web", [(a, 50), (b, 50)])
        counts = Counter(who(ask(conn)[1]) for _ in range(400))
        assert counts[b"a"] > 100 and counts[b"b"] > 100, counts

        proxy.set_weights("main", "web", [(a, 0), (b, 0)])
        conn.request("GET", "/", headers={"Host": WEB})
        response = conn.getresponse()
        assert (response.status, response.read()) == (503, b"no live revision of web in main yet\n")
    finally:
        conn.close()


# -- the main listener: HTTP -----------------------------------------------------


def test_chunked_request_body_is_streamed_both_ways_without_buffering(
    proxy: Proxy, backends: Backends
) -> None:
    proxy.set_backend("main", "web", backends.http("web"))
    with connect(proxy.port) as sock:
        buffer = bytearray()
        sock.sendall(b"POST /echo HTTP/1.1\r\nHost: " + WEB.encode() + b"\r\n")
        sock.sendall(b"Transfer-Encoding: chunked\r\n\r\n")
        head = recv_until(sock, b"\r\n\r\n", buffer)
        assert head.startswith(b"HTTP/1.1 200")
        for piece in [b"first", b"second", b"third"]:
            # each chunk comes back before the next one is sent: nothing waits for the end
            sock.sendall(b"%x\r\n%s\r\n" % (len(piece), piece))
            assert recv_until(sock, piece + b"\r\n", buffer).endswith(piece + b"\r\n")
        sock.sendall(b"0\r\n\r\n")
        assert recv_until(sock, b"0\r\n\r\n", buffer) == b"0\r\n\r\n"

        # the connection (and the backend connection) carry on
        sock.sendall(b"GET /after HTTP/1.1\r\nHost: web.main.localhost\r\n\r\n")
        assert recv_until(sock, b"\r\n\r\n", buffer).startswith(b"HTTP/1.1 200")


def test_request_bodies_with_a_length_and_chunked_responses_pass_through(
    proxy: Proxy, backends: Backends
) -> None:
    proxy.set_backend("main", "web", backends.http("web"))
    conn = keep_alive(proxy.port)
    try:
        conn.request("POST", "/", body=b"x" * 100_000, headers={"Host": WEB})
        response = conn.getresponse()
        assert (response.status, response.read()) == (200, b"got " + b"x" * 100_000)

        conn.request("GET", "/chunked", headers={"Host": WEB})
        response = conn.getresponse()
        assert response.getheader("Transfer-Encoding") == "chunked"
        assert response.read() == b"abbccc"
        sock = conn.sock

        assert ask(conn)[0] == 200
        assert conn.sock is sock
    finally:
        conn.close()


@pytest.mark.parametrize("connection", ["keep-alive", "close"])
def test_an_expect_100_continue_request_gets_the_interim_answer_before_sending_its_body(
    proxy: Proxy, backends: Backends, connection: str
) -> None:
    proxy.set_backend("main", "web", backends.http("web"))
    with connect(proxy.port) as sock:
        buffer = bytearray()
        sock.sendall(
            b"POST / HTTP/1.1\r\nHost: web.main.localhost\r\nContent-Length: 5\r\n"
            b"Expect: 100-continue\r\nConnection: %s\r\n\r\n" % connection.encode()
        )
        assert recv_until(sock, b"\r\n\r\n", buffer).startswith(b"HTTP/1.1 100 ")
        sock.sendall(b"hello")
        head = recv_until(sock, b"\r\n\r\n", buffer)
        assert head.startswith(b"HTTP/1.1 200 ")
        assert (b"\r\nConnection: close\r\n" in head) == (connection == "close")
        assert recv_until(sock, b"got hello", buffer) == b"got hello"


def test_head_204_and_304_answers_have_no_body_and_leave_both_connections_usable(
    proxy: Proxy, backends: Backends
) -> None:
    web = backends.http("web")
    proxy.set_backend("main", "web", web)
    conn = keep_alive(proxy.port)
    try:
        first = ask(conn)[1].split()[2]
        sock = conn.sock

        conn.request("HEAD", "/", headers={"Host": WEB})
        response = conn.getresponse()
        assert (response.status, response.getheader("Content-Length")) == (200, "1000")
        assert response.read() == b""
        assert ask(conn, "/status/204") == (204, b"")
        assert ask(conn, "/status/304") == (304, b"")

        last = ask(conn)[1].split()[2]
        assert conn.sock is sock
        assert first == last  # the backend connection was reused throughout
        assert len(set(backends.stats(web).seen)) == 1
    finally:
        conn.close()


def test_a_response_that_ends_with_the_connection_reaches_the_client_which_is_closed(
    proxy: Proxy, backends: Backends
) -> None:
    web = backends.http("web")
    proxy.set_backend("main", "web", web)

    answer = raw_exchange(
        proxy.port, b"GET /close-delimited HTTP/1.1\r\nHost: web.main.localhost\r\n\r\n"
    )

    assert answer.startswith(b"HTTP/1.1 200 OK\r\n")
    assert answer.endswith(b"\r\n\r\nuntil the end")
    assert proxy.idle(web) == 0


def test_requests_carry_x_forwarded_headers_and_no_hop_by_hop_ones(
    proxy: Proxy, backends: Backends
) -> None:
    proxy.set_backend("main", "web", backends.http("web"))
    conn = keep_alive(proxy.port)
    try:
        _, seen = ask(conn, "/headers", headers={"Connection": "keep-alive", "Keep-Alive": "9"})
        lines = seen.decode().splitlines()
        assert lines[0] == "GET /headers HTTP/1.1"
        assert "X-Forwarded-For: 127.0.0.1" in lines
        assert "X-Forwarded-Host: web.main.localhost" in lines
        assert "X-Forwarded-Proto: http" in lines
        assert "Host: web.main.localhost" in lines
        assert not [line for line in lines if line.lower().startswith(("connection", "keep-"))]

        _, seen = ask(
            conn,
            "/headers",
            headers={"X-Forwarded-For": "10.1.2.3", "X-Forwarded-Host": "evil", "X-Other": "1"},
        )
        lines = seen.decode().splitlines()
        assert "X-Forwarded-For: 10.1.2.3, 127.0.0.1" in lines
        assert "X-Forwarded-Host: web.main.localhost" in lines
        assert "X-Forwarded-Host: evil" not in lines
        assert "X-Other: 1" in lines
    finally:
        conn.close()


def test_a_client_asking_to_close_is_told_so_while_the_backend_connection_is_kept(
    proxy: Proxy, backends: Backends
) -> None:
    web = backends.http("web")
    proxy.set_backend("main", "web", web)

    answers = [
        raw_exchange(
            proxy.port, b"GET / HTTP/1.1\r\nHost: web.main.localhost\r\nConnection: close\r\n\r\n"
        ),
        raw_exchange(proxy.port, b"GET / HTTP/1.0\r\nHost: web.main.localhost\r\n\r\n"),
    ]

    for answer in answers:
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 ")
        assert b"\r\nConnection: close" in head
        assert who(body) == b"web"
    assert len(set(backends.stats(web).seen)) == 1
    assert proxy.idle(web) == 1


def test_pipelined_requests_are_answered_one_by_one_in_order(
    proxy: Proxy, backends: Backends
) -> None:
    proxy.set_backend("main", "web", backends.http("web"))

    answer = raw_exchange(
        proxy.port,
        b"GET /one HTTP/1.1\r\nHost: web.main.localhost\r\n\r\n"
        b"GET /two HTTP/1.1\r\nHost: web.main.localhost\r\n\r\n"
        b"GET /three HTTP/1.1\r\nHost: web.main.localhost\r\nConnection: close\r\n\r\n",
    )

    assert answer.count(b"HTTP/1.1 200 OK") == 3
    assert answer.index(b"web /one") < answer.index(b"web /two") < answer.index(b"web /three")


def test_websocket_style_upgrade_carries_raw_bytes_both_ways(
    proxy: Proxy, backends: Backends
) -> None:
    web = backends.http("web")
    proxy.set_backend("main", "web", web)
    with connect(proxy.port) as sock:
        buffer = bytearray()
        sock.sendall(
            b"GET /ws HTTP/1.1\r\nHost: web.main.localhost\r\n"
            b"Upgrade: websocket\r\nConnection: Upgrade\r\n\r\n"
        )
        head = recv_until(sock, b"\r\n\r\n", buffer)
        assert head.startswith(b"HTTP/1.1 101")
        for message in [b"\x81\x05hello", b"\x00\xff binary \r\n\r\n", b"last"]:
            sock.sendall(message)
            assert recv_until(sock, b"echo:" + message, buffer).endswith(message)
        assert proxy.in_flight(web) == 1
        sock.shutdown(socket.SHUT_WR)
        assert recv_all(sock) == b""  # the backend's close comes through

    wait_until(lambda: proxy.in_flight(web) == 0, "the upgraded connection to end")
    assert proxy.idle(web) == 0  # never pooled


def test_unknown_host_gets_a_404_that_names_no_service_or_namespace(proxy: Proxy) -> None:
    proxy.set_backend("main", "web", ("127.0.0.1", 1))
    proxy.set_backend("secret-branch", "other_app", None)

    for host in [f"localhost:{proxy.port}", f"127.0.0.1:{proxy.port}", "nope.main.localhost:9"]:
        port = host.rpartition(":")[2]
        status, headers, body = proxy.get(host)
        assert status == 404
        assert headers["Connection"] == "close"
        assert headers["Content-Type"].startswith("text/html")
        assert int(headers["Content-Length"]) == len(body)
        page = body.decode()
        assert f"No service answers for <code>{host}</code>" in page
        assert f"http://SERVICE.NAMESPACE.localhost:{port}/" in page
        assert "branchyard ps" in page
        for name in ("web", "other", "secret-branch", "bugfix", "href"):
            assert name not in page, name


def test_a_keep_alive_client_gets_a_404_for_a_later_request_to_an_unknown_host(
    proxy: Proxy, backends: Backends
) -> None:
    proxy.set_backend("main", "web", backends.http("web"))
    conn = keep_alive(proxy.port)
    try:
        assert ask(conn)[0] == 200
        status, body = ask(conn, host="nothing.main.localhost")
        assert status == 404 and b"No service answers for" in body and b"web" not in body
    finally:
        conn.close()


def test_service_without_a_live_revision_gets_a_503(proxy: Proxy) -> None:
    proxy.set_backend("bugfix", "web", None)

    status, headers, body = proxy.get("web.bugfix.localhost")

    assert status == 503
    assert body == b"no live revision of web in bugfix yet\n"
    assert headers["Connection"] == "close"
    assert int(headers["Content-Length"]) == len(body)


def test_unreachable_backend_gets_a_502_with_a_reason(proxy: Proxy) -> None:
    port = free_port()
    proxy.set_backend("main", "web", ("127.0.0.1", port))

    status, headers, body = proxy.get("web.main.localhost")

    assert status == 502
    assert body.startswith(f"cannot reach web in main at 127.0.0.1:{port}: ".encode())
    assert body.count(b"\n") == 1
    assert headers["Connection"] == "close"
    assert int(headers["Content-Length"]) == len(body)


def test_backend_hanging_up_without_answering_gets_a_502(proxy: Proxy, backends: Backends) -> None:
    class HangUp(socketserver.BaseRequestHandler):
        def handle(self) -> None:
            self.request.recv(65536)

    proxy.set_backend("main", "web", backends.tcp(HangUp))

    status, headers, body = proxy.get("web.main.localhost")

    assert (status, body) == (502, b"web in main closed the connection without answering\n")
    assert headers["Connection"] == "close"


def test_backend_answering_something_that_is_not_http_gets_a_502(
    proxy: Proxy, backends: Backends
) -> None:
    class Nonsense(socketserver.BaseRequestHandler):
        def handle(self) -> None:
            self.request.recv(65536)
            self.request.sendall(b"SSH-2.0-OpenSSH\r\n")

    proxy.set_backend("main", "web", backends.tcp(Nonsense))

    status, _, body = proxy.get("web.main.localhost")

    assert (status, body) == (502, b"web in main sent an answer that is not HTTP/1.x\n")


class AnswersOnce(socketserver.BaseRequestHandler):
    """Answers the first request of each connection; hangs up on the next one unanswered,
    like a backend that closed an idle keep-alive connection just as it was reused."""

    connections = 0

    def handle(self) -> None:
        type(self).connections += 1
        buffer = bytearray()
        recv_until(self.request, b"\r\n\r\n", buffer)
        self.request.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nfresh")
        self.request.recv(65536)


def test_a_stale_pooled_connection_is_retried_once_on_a_fresh_one(
    proxy: Proxy, backends: Backends
) -> None:
    class Once(AnswersOnce):
        connections = 0

    proxy.set_backend("main", "web", backends.tcp(Once))
    conn = keep_alive(proxy.port)
    try:
        assert ask(conn) == (200, b"fresh")
        assert ask(conn) == (200, b"fresh")  # the pooled connection hung up: retried
        assert Once.connections == 2
    finally:
        conn.close()


def test_a_post_on_a_stale_pooled_connection_is_not_retried_and_gets_a_502(
    proxy: Proxy, backends: Backends
) -> None:
    class Once(AnswersOnce):
        connections = 0

    proxy.set_backend("main", "web", backends.tcp(Once))
    conn = keep_alive(proxy.port)
    try:
        assert ask(conn) == (200, b"fresh")
        status, body = ask(conn, method="POST")
        assert (status, body) == (502, b"web in main closed the connection without answering\n")
        assert Once.connections == 1
    finally:
        conn.close()


def test_request_without_a_host_header_gets_a_400(proxy: Proxy) -> None:
    answer = raw_exchange(proxy.port, b"GET / HTTP/1.0\r\nAccept: */*\r\n\r\n")

    assert answer.startswith(b"HTTP/1.1 400 ")
    assert answer.endswith(b"bad request: no Host header\n")
    assert b"\r\nConnection: close\r\n" in answer


def test_bytes_that_are_not_http_get_a_400(proxy: Proxy) -> None:
    answer = raw_exchange(proxy.port, b"\x16\x03\x01 this is not http\r\n\r\n")

    assert answer.startswith(b"HTTP/1.1 400 ")
    assert b"\r\nConnection: close\r\n" in answer


def test_request_head_over_64_kib_gets_a_431(proxy: Proxy) -> None:
    filler = b"X-Filler: " + b"a" * 1000 + b"\r\n"
    request = b"GET / HTTP/1.1\r\nHost: web.main.localhost\r\n" + filler * 70 + b"\r\n"

    answer = raw_exchange(proxy.port, request)

    assert answer.startswith(b"HTTP/1.1 431 ")


def test_half_closed_client_still_gets_the_answer(proxy: Proxy, backends: Backends) -> None:
    proxy.set_backend("main", "web", backends.http("web"))
    with connect(proxy.port) as sock:
        sock.sendall(b"GET /half HTTP/1.1\r\nHost: web.main.localhost\r\n\r\n")
        sock.shutdown(socket.SHUT_WR)
        answer = recv_all(sock)  # ends: the router closes once the answer is out
    assert answer.startswith(b"HTTP/1.1 200 ")
    assert b"\r\n\r\nweb /half " in answer


def test_slow_reader_makes_the_router_stop_reading_from_the_backend(
    proxy: Proxy, backends: Backends
) -> None:
    total = 64 * 1024 * 1024
    sent = 0
    stalled = threading.Event()  # set once the backend's send stays blocked: nobody reads

    class Firehose(socketserver.BaseRequestHandler):
        def handle(self) -> None:
            nonlocal sent
            self.request.recv(65536)
            self.request.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % total)
            self.request.setblocking(False)
            chunk = bytes(1024 * 1024)
            try:
                while sent < total:
                    try:
                        sent += self.request.send(chunk[: total - sent])
                    except BlockingIOError:
                        if not select.select([], [self.request], [], 0.5)[1]:
                            stalled.set()
                            select.select([], [self.request], [], TIMEOUT)
            except OSError:
                pass

    proxy.set_backend("main", "hose", backends.tcp(Firehose))
    with connect(proxy.port) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: hose.main.localhost\r\n\r\n")
        # read nothing: only socket buffers and one high-water mark fill up
        assert stalled.wait(TIMEOUT), "the backend never had to wait"
        stalled_at = sent
        assert stalled_at < total / 2
        buffer = bytearray()
        recv_until(sock, b"\r\n\r\n", buffer)
        received = len(buffer)
        while received < total:
            data = sock.recv(1024 * 1024)
            assert data
            received += len(data)
        assert received == total


def test_client_connections_waiting_too_long_for_a_request_are_closed(
    proxy: Proxy, backends: Backends, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(router_module, "HEAD_TIMEOUT_SECONDS", 0.3)
    monkeypatch.setattr(router_module, "SWEEP_SECONDS", 0.1)
    proxy.set_backend("main", "web", backends.http("web"))
    with connect(proxy.port) as silent, connect(proxy.port) as kept:
        kept.sendall(b"GET / HTTP/1.1\r\nHost: web.main.localhost\r\n\r\n")
        recv_until(kept, b"web / ", bytearray())
        assert silent.recv(1) == b""  # closed by the router, not timed out here
        assert kept.recv(65536) == b""  # after its answer, idle for too long


def test_idle_pooled_connections_are_closed_after_a_while(
    proxy: Proxy, backends: Backends, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(router_module, "POOL_IDLE_SECONDS", 0.2)
    monkeypatch.setattr(router_module, "SWEEP_SECONDS", 0.1)
    web = backends.http("web")
    proxy.set_backend("main", "web", web)

    assert proxy.get(WEB)[0] == 200
    assert proxy.idle(web) == 1
    wait_until(lambda: proxy.idle(web) == 0, "the idle connection to be closed")
    wait_until(lambda: len(backends.stats(web).closed) == 1, "the backend to see the close")


# -- draining --------------------------------------------------------------------


def in_thread(fn: Callable[[], T]) -> Callable[[], T]:
    """Run ``fn`` in a thread now; the returned function joins it and gives its result."""
    results: list[T] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            results.append(fn())
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()

    def join() -> T:
        thread.join(TIMEOUT)
        if errors:
            raise errors[0]
        assert results, "the thread did not finish"
        return results[0]

    return join


def test_drain_lets_an_in_flight_request_finish_while_new_requests_go_to_the_new_backend(
    proxy: Proxy, backends: Backends
) -> None:
    old, new = backends.http("old"), backends.http("new")
    proxy.set_backend("main", "web", old)
    slow = in_thread(lambda: proxy.get(WEB, "/held"))
    wait_until(lambda: len(backends.stats(old).seen) == 1, "the slow request to reach old")
    assert proxy.in_flight(old) == 1

    proxy.set_backend("main", "web", new)
    draining = proxy.loop.start(proxy.router.drain(old, 3600))  # a grace no test outlasts
    assert who(proxy.get(WEB)[2]) == b"new"
    assert not draining.done()
    assert proxy.in_flight(old) == 1

    backends.stats(old).release.set()  # the request finishes: the drain ends with it
    status, _, body = slow()
    assert (status, who(body)) == (200, b"old")
    assert draining.result(TIMEOUT) == 0
    assert proxy.in_flight(old) == 0
    wait_until(lambda: len(backends.stats(old).closed) == 1, "old's connection to close")


def test_drain_closes_idle_connections_at_once_and_client_connections_move_on(
    proxy: Proxy, backends: Backends
) -> None:
    old, new = backends.http("old"), backends.http("new")
    proxy.set_backend("main", "web", old)
    conn = keep_alive(proxy.port)
    try:
        assert who(ask(conn)[1]) == b"old"
        sock = conn.sock
        assert proxy.idle(old) == 1

        proxy.set_backend("main", "web", new)
        assert proxy.drain(old, 3600) == 0  # nothing to wait for: not the grace
        assert proxy.idle(old) == 0
        wait_until(lambda: len(backends.stats(old).closed) == 1, "old to see its connection close")

        assert who(ask(conn)[1]) == b"new"
        assert conn.sock is sock  # the client connection lives on
    finally:
        conn.close()


def test_drain_aborts_a_request_that_outlasts_the_grace_and_counts_it(
    proxy: Proxy, backends: Backends
) -> None:
    old, new = backends.http("old"), backends.http("new")
    proxy.set_backend("main", "web", old)
    slow = in_thread(lambda: proxy.get(WEB, "/held"))  # answers only once released
    wait_until(lambda: len(backends.stats(old).seen) == 1, "the slow request to reach old")
    proxy.set_backend("main", "web", new)

    assert proxy.drain(old, 0.2) == 1  # the grace ends it: it is cut off

    status, _, body = slow()
    assert status == 502
    assert body == b"web in main was retired (drained) before it finished answering\n"
    assert proxy.in_flight(old) == 0


def test_drain_gives_an_upgraded_connection_the_grace_then_aborts_it(
    proxy: Proxy, backends: Backends
) -> None:
    old = backends.http("old")
    proxy.set_backend("main", "web", old)
    with connect(proxy.port) as sock:
        sock.sendall(b"GET /ws HTTP/1.1\r\nHost: web.main.localhost\r\n")
        sock.sendall(b"Upgrade: websocket\r\nConnection: Upgrade\r\n\r\n")
        recv_until(sock, b"\r\n\r\n", bytearray())
        proxy.set_backend("main", "web", None)

        assert proxy.drain(old, 0.2) == 1
        assert recv_all(sock) == b""
    assert proxy.in_flight(old) == 0


def test_drain_of_a_backend_never_used_returns_at_once(proxy: Proxy) -> None:
    assert proxy.drain(("127.0.0.1", free_port()), 5.0) == 0


# -- peer listeners --------------------------------------------------------------


def test_peer_listener_follows_new_revisions_and_falls_back_to_the_baseline(
    proxy: Proxy, backends: Backends
) -> None:
    proxy.set_backend(BASELINE, "app", backends.http("app-main"))
    port = proxy.loop.run(proxy.router.open_peer_listener("bugfix", "app"))

    def who_answers() -> bytes:
        status, _, body = http_get(port, "whatever")
        assert status == 200
        return who(body)

    assert who_answers() == b"app-main"
    proxy.set_backend("bugfix", "app", backends.http("app-bugfix-v1"))
    assert who_answers() == b"app-bugfix-v1"
    proxy.set_backend("bugfix", "app", backends.http("app-bugfix-v2"))
    assert who_answers() == b"app-bugfix-v2"
    proxy.set_backend("bugfix", "app", None)
    assert who_answers() == b"app-main"

    proxy.remove(BASELINE, "app")
    status, headers, body = http_get(port, "whatever")
    assert (status, body) == (503, b"no live revision of app in bugfix yet\n")
    assert headers["Connection"] == "close"

    proxy.set_backend("bugfix", "app", ("127.0.0.1", free_port()))
    status, _, body = http_get(port, "whatever")
    assert status == 502 and body.startswith(b"cannot reach app in bugfix")


def test_peer_listener_switches_per_request_on_one_keep_alive_connection(
    proxy: Proxy, backends: Backends
) -> None:
    proxy.set_backend(BASELINE, "app", backends.http("app-main"))
    port = proxy.loop.run(proxy.router.open_peer_listener("bugfix", "app"))
    conn = keep_alive(port)
    try:
        assert who(ask(conn, host="127.0.0.1")[1]) == b"app-main"
        sock = conn.sock
        proxy.set_backend("bugfix", "app", backends.http("app-bugfix"))
        assert who(ask(conn, host="anything")[1]) == b"app-bugfix"
        proxy.set_backend("bugfix", "app", None)
        assert who(ask(conn, host="anything")[1]) == b"app-main"
        _, seen = ask(conn, "/headers", host=f"127.0.0.1:{port}")
        assert f"X-Forwarded-Host: 127.0.0.1:{port}" in seen.decode().splitlines()
        assert conn.sock is sock
    finally:
        conn.close()


def test_peer_listener_answers_bytes_that_are_not_http_with_a_400(
    proxy: Proxy, backends: Backends
) -> None:
    proxy.set_backend("bugfix", "db", backends.http("db"))
    port = proxy.loop.run(proxy.router.open_peer_listener("bugfix", "db"))

    answer = raw_exchange(port, b"\x00not http at all\xff\r\n\r\n")

    assert answer.startswith(b"HTTP/1.1 400 ")


def test_peer_listener_is_idempotent_and_can_be_closed(proxy: Proxy) -> None:
    router = proxy.router
    first = proxy.loop.run(router.open_peer_listener("bugfix", "app"))
    again = proxy.loop.run(router.open_peer_listener("bugfix", "app"))
    other = proxy.loop.run(router.open_peer_listener("main", "app"))

    assert first == again != other
    assert router.peer_port("bugfix", "app") == first
    assert router.peer_port("bugfix", "web") is None

    proxy.loop.run(router.close_peer_listener("bugfix", "app"))
    assert router.peer_port("bugfix", "app") is None
    with pytest.raises(ConnectionRefusedError):
        connect(first)
    connect(other).close()


def test_peer_listener_on_a_taken_port_raises_oserror(proxy: Proxy) -> None:
    with pytest.raises(OSError):
        proxy.loop.run(proxy.router.open_peer_listener("bugfix", "app", port=proxy.port))
    assert proxy.router.peer_port("bugfix", "app") is None


# -- shutdown --------------------------------------------------------------------


def test_close_leaves_nothing_listening_and_no_connection_open(
    proxy: Proxy, backends: Backends
) -> None:
    web = backends.http("web")
    proxy.set_backend("main", "web", web)
    peer_port = proxy.loop.run(proxy.router.open_peer_listener("main", "web"))
    slow = in_thread(lambda: http_get(peer_port, "x", "/held"))  # in flight until the close
    wait_until(lambda: len(backends.stats(web).seen) == 1, "the slow request to arrive")
    conn = keep_alive(proxy.port)
    ask(conn)  # on a second backend connection, idle in the pool afterwards
    idle = connect(peer_port)
    assert (proxy.in_flight(web), proxy.idle(web)) == (1, 1)
    assert proxy.router.main_port == proxy.port

    proxy.loop.run(proxy.router.close())
    backends.stats(web).release.set()  # its answer now meets a closed connection

    for port in [proxy.port, peer_port]:
        with pytest.raises(ConnectionRefusedError):
            connect(port)
    assert conn.sock is not None
    assert conn.sock.recv(1) == b""  # the kept-alive connection was closed
    assert idle.recv(1) == b""
    with pytest.raises((http.client.HTTPException, ConnectionError)):
        slow()
    # the busy and the pooled backend connection are closed too, and no retry opened another
    seen = set(backends.stats(web).seen)
    assert len(seen) == 2
    wait_until(lambda: set(backends.stats(web).closed) == seen, "the backend connections to close")
    conn.close()
    idle.close()
    with pytest.raises(RuntimeError):
        _ = proxy.router.main_port


def test_finished_connections_leave_no_sockets_behind(proxy: Proxy, backends: Backends) -> None:
    web = backends.http("web")
    proxy.set_backend("main", "web", web)
    ports = {proxy.port, web[1]}
    assert open_sockets(ports) == 0

    for _ in range(20):
        assert proxy.get("web.main.localhost")[0] == 200
        assert proxy.get("nothing.main.localhost")[0] == 404
    wait_until(lambda: not proxy.loop.call(proxy.router._open_connections), "connections to end")
    assert proxy.idle(web) == 1
    assert open_sockets(ports) == 2  # both ends of the pooled connection live in this process

    assert proxy.drain(web, 1.0) == 0  # closes the pooled one, well before it would go stale
    wait_until(lambda: open_sockets(ports) == 0, "every socket to close", timeout=3.0)
    assert backends.stats(web).closed == sorted(set(backends.stats(web).seen))  # one, pooled


def test_the_routers_own_address_goes_home_when_a_home_is_set(
    proxy: Proxy, backends: Backends
) -> None:
    proxy.set_backend("main", "web", backends.http("web"))
    proxy.loop.call(proxy.table.set_home, backends.http("dashboard"))
    for host in (f"localhost:{proxy.port}", f"127.0.0.1:{proxy.port}"):
        status, _, body = proxy.get(host, "/")
        assert (status, who(body)) == (200, b"dashboard")
    status, _, body = proxy.get(f"nope.main.localhost:{proxy.port}")
    assert status == 404 and b"No service answers for" in body and b"web" not in body


# -- floods: the caps on connections --------------------------------------------------


@contextlib.contextmanager
def held(port: int, count: int) -> Iterator[list[socket.socket]]:
    """``count`` connections to ``port``, closed at the end of the block."""
    with contextlib.ExitStack() as stack:
        yield [stack.enter_context(connect(port)) for _ in range(count)]


def read_to_end(sock: socket.socket) -> bytes:
    received = bytearray()
    while data := sock.recv(65536):
        received += data
    return bytes(received)


@pytest.mark.parametrize(
    ("nofile", "clients", "main"),
    [
        (1024, 128, 64),  # less than the reserve: the router's least, 256 descriptors
        (4096, 1024, 512),  # the reserve, 2048, is more than a quarter
        (20000, 7500, 2048),  # a quarter, 5000, is kept; the main listener's share is whole
        (1048576, 393216, 2048),
    ],
)
def test_the_budget_keeps_a_reserve_and_halves_the_rest_for_client_and_backend_ends(
    nofile: int, clients: int, main: int
) -> None:
    assert budget_for(nofile) == Budget(clients, main)


def test_a_flooded_peer_listener_refuses_over_its_cap_at_once_and_the_others_serve(
    proxy: Proxy, backends: Backends, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(router_module, "PEER_LISTENER_CONNECTIONS", 100)
    proxy.set_backend("main", "app", backends.http("app"))
    proxy.set_backend("bugfix", "web", backends.http("web"))
    flooded = proxy.loop.run(proxy.router.open_peer_listener("main", "app"))
    other = proxy.loop.run(proxy.router.open_peer_listener("bugfix", "web"))
    with held(flooded, 100):
        wait_until(lambda: proxy.loop.call(proxy.router._open_connections) == 100, "100 held")
        for _ in range(1000):
            with connect(flooded) as refused:
                answer = read_to_end(refused)  # answered and closed before it sent a byte
                assert answer.startswith(b"HTTP/1.1 503 "), answer
                assert answer.endswith(b"this peer listener holds 100 connections, its most\n")
        assert http_get(other, "any")[0] == 200
        status, _, body = proxy.get("web.bugfix.localhost")
        assert (status, who(body)) == (200, b"web")
        wait_until(lambda: proxy.loop.call(proxy.router._open_connections) == 100, "100 left")


def test_the_peer_listeners_together_never_take_the_main_listeners_share(
    backends: Backends, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(router_module, "PEER_LISTENER_CONNECTIONS", 100)
    loop = LoopThread()
    table = RouteTable()
    router = Router(table, Budget(clients=300, main=100))  # the peer listeners share 200
    web = backends.http("web")
    loop.call(table.set_backend, "main", "web", web)
    main = loop.run(router.serve("127.0.0.1", 0))
    peers = [loop.run(router.open_peer_listener("main", f"s{n}")) for n in range(3)]
    try:
        with held(peers[0], 100), held(peers[1], 100), held(main, 99):
            wait_until(lambda: loop.call(router._open_connections) == 299, "299 held")
            with connect(peers[2]) as refused:
                assert read_to_end(refused).endswith(
                    b"the peer listeners hold 200 connections, their most\n"
                )
            status, _, body = http_get(main, WEB)  # the main listener's 100th
            assert (status, who(body)) == (200, b"web")
    finally:
        loop.run(router.close())
        loop.stop()


def test_thousands_of_idle_connections_are_all_closed_after_the_head_timeout(
    proxy: Proxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(router_module, "HEAD_TIMEOUT_SECONDS", 0.5)
    monkeypatch.setattr(router_module, "SWEEP_SECONDS", 0.1)
    with held(proxy.port, 2000) as idle:
        for sock in idle:
            assert sock.recv(1) == b""  # closed by the router without a word
        wait_until(lambda: proxy.loop.call(proxy.router._open_connections) == 0, "all closed")


def test_a_request_over_its_backends_cap_gets_a_503_at_once(
    proxy: Proxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(router_module, "BACKEND_CONNECTIONS", 2)
    with socket.create_server(("127.0.0.1", 0), backlog=8) as silent:  # never answers
        backend = ("127.0.0.1", silent.getsockname()[1])
        proxy.set_backend("main", "web", backend)
        with held(proxy.port, 2) as waiting:
            for sock in waiting:
                sock.sendall(b"GET / HTTP/1.1\r\nHost: web.main.localhost\r\n\r\n")
            wait_until(lambda: proxy.in_flight(backend) == 2, "two requests under way")
            status, _, body = proxy.get(WEB)
            assert status == 503
            assert body == b"web in main has 2 requests under way, its most: try again\n"
