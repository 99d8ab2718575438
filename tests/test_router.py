"""Tests for the router: real sockets on 127.0.0.1, backends run by http.server in threads.

The router runs on an event loop in a background thread (see ``LoopThread``), so the
tests themselves can use blocking clients: http.client and plain sockets.
"""

from __future__ import annotations

import asyncio
import http.client
import os
import socket
import socketserver
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, TypeVar

import pytest

from branchyard.router import BASELINE, Address, Router, RouteTable

T = TypeVar("T")
TIMEOUT = 5.0


# -- harness ---------------------------------------------------------------------


class LoopThread:
    """An event loop running in a daemon thread; tests hand it coroutines."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(TIMEOUT)

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

    def remove(self, namespace: str, service: str) -> None:
        self.loop.call(self.table.remove, namespace, service)

    def get(self, host: str, path: str = "/") -> tuple[int, dict[str, str], bytes]:
        return http_get(self.port, host, path)


def http_get(port: int, host: str, path: str = "/") -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=TIMEOUT)
    try:
        conn.request("GET", path, headers={"Host": host})
        response = conn.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        conn.close()


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
    """Answers ``NAME PATH PEERPORT``; echoes chunked bodies chunk by chunk; upgrades."""

    protocol_version = "HTTP/1.1"
    name = "backend"

    def do_GET(self) -> None:
        if self.headers.get("Upgrade"):
            self._upgrade()
            return
        body = f"{self.name} {self.path} {self.client_address[1]}".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self) -> None:
        assert self.headers["Transfer-Encoding"] == "chunked"
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


@dataclass
class Backends:
    servers: list[socketserver.BaseServer] = field(default_factory=list)

    def http(self, name: str) -> Address:
        handler = type(f"Backend_{name}", (Backend,), {"name": name})
        return self._start(QuietServer(("127.0.0.1", 0), handler))

    def tcp(self, handler: type[socketserver.BaseRequestHandler]) -> Address:
        server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), handler)
        server.daemon_threads = True
        server.block_on_close = False
        return self._start(server)

    def _start(self, server: socketserver.TCPServer) -> Address:
        threading.Thread(target=server.serve_forever, args=(0.01,), daemon=True).start()
        self.servers.append(server)
        host, port = server.server_address[:2]
        return str(host), int(port)

    def stop(self) -> None:
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


def free_port() -> int:
    """A port that nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


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


class EchoAfterEof(socketserver.BaseRequestHandler):
    """A plain TCP service that answers only once the client has finished sending."""

    def handle(self) -> None:
        received = recv_all(self.request)
        self.request.sendall(b"got " + received)


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


# -- the main listener -----------------------------------------------------------


def test_host_header_picks_the_namespace_and_service(proxy: Proxy, backends: Backends) -> None:
    proxy.set_backend("main", "web", backends.http("web-main"))
    proxy.set_backend("bugfix", "web", backends.http("web-bugfix"))
    proxy.set_backend("bugfix", "other_app", backends.http("other-bugfix"))

    status, _, body = proxy.get(f"web.main.localhost:{proxy.port}", "/a")
    assert (status, body.split()[:2]) == (200, [b"web-main", b"/a"])
    status, _, body = proxy.get(f"web.bugfix.localhost:{proxy.port}", "/b")
    assert (status, body.split()[:2]) == (200, [b"web-bugfix", b"/b"])
    status, _, body = proxy.get(f"other-app.bugfix.localhost:{proxy.port}")
    assert (status, body.split()[0]) == (200, b"other-bugfix")


def test_keep_alive_connection_serves_two_requests_on_one_backend_connection(
    proxy: Proxy, backends: Backends
) -> None:
    proxy.set_backend("main", "web", backends.http("web"))
    conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=TIMEOUT)
    try:
        answers = []
        for path in ["/one", "/two"]:
            conn.request("GET", path, headers={"Host": "web.main.localhost"})
            response = conn.getresponse()
            answers.append(response.read().split())
            sock = conn.sock
        assert sock is conn.sock  # http.client did not reconnect
        assert [a[1] for a in answers] == [b"/one", b"/two"]
        assert answers[0][2] == answers[1][2]  # same upstream connection (same source port)
    finally:
        conn.close()


def test_chunked_request_body_is_streamed_both_ways_without_buffering(
    proxy: Proxy, backends: Backends
) -> None:
    proxy.set_backend("main", "web", backends.http("web"))
    with connect(proxy.port) as sock:
        buffer = bytearray()
        sock.sendall(
            b"POST /echo HTTP/1.1\r\nHost: web.main.localhost\r\nTransfer-Encoding: chunked\r\n\r\n"
        )
        head = recv_until(sock, b"\r\n\r\n", buffer)
        assert head.startswith(b"HTTP/1.1 200")
        for piece in [b"first", b"second", b"third"]:
            # each chunk comes back before the next one is sent: nothing waits for the end
            sock.sendall(b"%x\r\n%s\r\n" % (len(piece), piece))
            assert recv_until(sock, piece + b"\r\n", buffer).endswith(piece + b"\r\n")
        sock.sendall(b"0\r\n\r\n")
        assert recv_until(sock, b"0\r\n\r\n", buffer) == b"0\r\n\r\n"


def test_websocket_style_upgrade_carries_raw_bytes_both_ways(
    proxy: Proxy, backends: Backends
) -> None:
    proxy.set_backend("main", "web", backends.http("web"))
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
        sock.shutdown(socket.SHUT_WR)
        assert recv_all(sock) == b""  # the backend's close comes through


def test_unknown_host_gets_a_404_listing_the_services(proxy: Proxy) -> None:
    proxy.set_backend("main", "web", ("127.0.0.1", 1))
    proxy.set_backend("bugfix", "other_app", None)

    for host in [f"localhost:{proxy.port}", f"127.0.0.1:{proxy.port}", "nope.main.localhost:9"]:
        port = host.rpartition(":")[2]
        status, headers, body = proxy.get(host)
        assert status == 404
        assert headers["Connection"] == "close"
        assert headers["Content-Type"].startswith("text/html")
        assert int(headers["Content-Length"]) == len(body)
        page = body.decode()
        assert f'href="http://other-app.bugfix.localhost:{port}/"' in page
        assert f'href="http://web.main.localhost:{port}/"' in page
        assert ">bugfix</h2>" in page and ">main</h2>" in page


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


def test_request_without_a_host_header_gets_a_400(proxy: Proxy) -> None:
    answer = raw_exchange(proxy.port, b"GET / HTTP/1.0\r\nAccept: */*\r\n\r\n")

    assert answer.startswith(b"HTTP/1.1 400 ")
    assert b"\r\nConnection: close\r\n" in answer


def test_request_head_over_64_kib_gets_a_431(proxy: Proxy) -> None:
    filler = b"X-Filler: " + b"a" * 1000 + b"\r\n"
    request = b"GET / HTTP/1.1\r\nHost: web.main.localhost\r\n" + filler * 70 + b"\r\n"

    answer = raw_exchange(proxy.port, request)

    assert answer.startswith(b"HTTP/1.1 431 ")


def test_half_closed_client_still_gets_the_answer(proxy: Proxy, backends: Backends) -> None:
    proxy.set_backend("main", "echo", backends.tcp(EchoAfterEof))
    with connect(proxy.port) as sock:
        request = b"GET / HTTP/1.1\r\nHost: echo.main.localhost\r\n\r\nbody"
        sock.sendall(request)
        sock.shutdown(socket.SHUT_WR)
        assert recv_all(sock) == b"got " + request


def test_slow_reader_makes_the_router_stop_reading_from_the_backend(
    proxy: Proxy, backends: Backends
) -> None:
    total = 64 * 1024 * 1024
    sent = 0

    class Firehose(socketserver.BaseRequestHandler):
        def handle(self) -> None:
            nonlocal sent
            self.request.recv(65536)
            self.request.settimeout(1.0)
            chunk = bytes(1024 * 1024)
            try:
                while sent < total:
                    sent += self.request.send(chunk)
            except OSError:
                pass

    proxy.set_backend("main", "hose", backends.tcp(Firehose))
    with connect(proxy.port) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: hose.main.localhost\r\n\r\n")
        time.sleep(0.4)  # read nothing: only socket buffers and one high-water mark fill up
        stalled_at = sent
        assert stalled_at < total / 2
        received = 0
        while received < total:
            data = sock.recv(1024 * 1024)
            assert data
            received += len(data)
        assert received == total


# -- peer listeners --------------------------------------------------------------


def test_peer_listener_follows_new_revisions_and_falls_back_to_the_baseline(
    proxy: Proxy, backends: Backends
) -> None:
    proxy.set_backend(BASELINE, "app", backends.http("app-main"))
    port = proxy.loop.run(proxy.router.open_peer_listener("bugfix", "app"))

    def who_answers() -> bytes:
        status, _, body = http_get(port, "whatever")
        assert status == 200
        return body.split()[0]

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


def test_peer_listener_splices_any_tcp_protocol_with_half_close(
    proxy: Proxy, backends: Backends
) -> None:
    proxy.set_backend("bugfix", "db", backends.tcp(EchoAfterEof))
    port = proxy.loop.run(proxy.router.open_peer_listener("bugfix", "db"))
    with connect(port) as sock:
        sock.sendall(b"\x00not http at all\xff")
        sock.shutdown(socket.SHUT_WR)
        assert recv_all(sock) == b"got \x00not http at all\xff"


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


def test_close_leaves_nothing_listening_and_drops_open_connections(
    proxy: Proxy, backends: Backends
) -> None:
    proxy.set_backend("main", "web", backends.http("web"))
    peer_port = proxy.loop.run(proxy.router.open_peer_listener("main", "web"))
    conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=TIMEOUT)
    conn.request("GET", "/", headers={"Host": "web.main.localhost"})
    conn.getresponse().read()
    idle = connect(peer_port)
    assert proxy.router.main_port == proxy.port

    proxy.loop.run(proxy.router.close())

    for port in [proxy.port, peer_port]:
        with pytest.raises(ConnectionRefusedError):
            connect(port)
    assert conn.sock is not None
    assert conn.sock.recv(1) == b""  # the kept-alive connection was closed
    assert idle.recv(1) == b""
    conn.close()
    idle.close()
    with pytest.raises(RuntimeError):
        _ = proxy.router.main_port


def test_finished_connections_leave_no_sockets_behind(proxy: Proxy, backends: Backends) -> None:
    proxy.set_backend("main", "web", backends.http("web"))
    fds_before = len(os.listdir("/proc/self/fd")) if os.path.isdir("/proc/self/fd") else None

    for _ in range(20):
        assert proxy.get("web.main.localhost")[0] == 200
        assert proxy.get("nothing.main.localhost")[0] == 404
    deadline = time.monotonic() + TIMEOUT
    while proxy.loop.call(proxy.router._open_connections) and time.monotonic() < deadline:
        time.sleep(0.01)

    assert proxy.loop.call(proxy.router._open_connections) == 0
    if fds_before is not None:
        assert len(os.listdir("/proc/self/fd")) <= fds_before + 2
