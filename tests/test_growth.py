"""Nothing grows without bound: webhook floods, event text, build logs, logs across
rotation, and connections that never finish their request."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest

from tests.conftest import Daemon, start_daemon
from tests.test_api import call, github_push, token_of

pytestmark = pytest.mark.integration

ESCAPES = "\x1b]0;pwned\x07\x1b[2J\x1b[H"


def store_bytes(daemon: Daemon) -> int:
    return sum(
        (daemon.home / name).stat().st_size
        for name in ("state.db", "state.db-wal")
        if (daemon.home / name).exists()
    )


def test_a_flood_of_unsigned_webhooks_with_huge_fields_stores_little(daemon: Daemon) -> None:
    before = store_bytes(daemon)
    url = f"https://forge.example/{ESCAPES}/" + "a" * 4_900_000 + ".git"
    payload = json.loads(github_push("https://forge.example/app.git", "main", "1" * 40))
    payload["repository"]["clone_url"] = url
    body = json.dumps(payload).encode()
    assert 4_900_000 < len(body) < 5 * 1024 * 1024
    for _ in range(3):
        status, answer = call(daemon, "POST", "/hooks/github", body, {"X-GitHub-Event": "push"})
        assert status == 202 and len(json.dumps(answer)) < 2000, (status, str(answer)[:200])

    after = store_bytes(daemon)
    print(f"store after the flood: {after} bytes (before: {before})")
    assert after - before < 256 * 1024
    good = {"Authorization": f"Bearer {token_of(daemon)}"}
    status, events = call(daemon, "GET", "/api/events", headers=good)
    assert status == 200 and len(json.dumps(events)) < 20_000
    assert len([e for e in events if "not a registered repo" in e["message"]]) == 3
    shown = daemon.cli("events").stdout
    assert "\x1b" not in shown and "\x07" not in shown
    assert "\\x1b]0;pwned\\x07" in shown and "more characters)" in shown


def closed_by_server(sock: socket.socket) -> bool:
    """True once the server has closed ``sock`` (reads EOF); waits at most 20 s."""
    sock.settimeout(20)
    try:
        while sock.recv(65536):
            pass
    except TimeoutError:
        return False
    return True


def still_open(sock: socket.socket) -> bool:
    try:
        return sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) != b""
    except BlockingIOError:
        return True


def test_api_clients_that_never_finish_a_request_head_are_closed(tmp_path: Path) -> None:
    daemon = start_daemon(tmp_path / "home", "--api-head-timeout", "1")
    try:
        address = ("127.0.0.1", int(daemon.info["api"].rsplit(":", 1)[1]))
        auth = f"Authorization: Bearer {token_of(daemon)}\r\n"
        stream = socket.create_connection(address)
        stream.sendall(f"GET /events HTTP/1.1\r\nHost: x\r\n{auth}\r\n".encode())
        silent = socket.create_connection(address)
        slow = [socket.create_connection(address) for _ in range(50)]
        for sock in slow:
            sock.sendall(b"GET /api/info HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        kept_alive = socket.create_connection(address)
        kept_alive.sendall(f"GET /api/info HTTP/1.1\r\nHost: x\r\n{auth}\r\n".encode())
        kept_alive.settimeout(10)
        assert kept_alive.recv(65536).startswith(b"HTTP/1.1 200")
        kept_alive.sendall(b"GET /api/info HTTP/1.1\r\nHost: ")

        assert all(closed_by_server(sock) for sock in [silent, *slow, kept_alive])
        assert still_open(stream), "a response in progress was cut"
        assert daemon.cli("info").returncode == 0
        for sock in [stream, silent, *slow, kept_alive]:
            sock.close()
    finally:
        assert daemon.stop() == 0
