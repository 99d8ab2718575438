"""Each box has a network of its own (issue 18, items 3, 5 and 6): a hostile service
pushed on a branch tries to reach the daemon's ports, other services and the host,
to steal another service's port, and to leave through the egress proxy to this
machine. It reaches only its peers (here: the baseline's vault, through its
``VAULT_URL``) and what the daemon exposes.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import (
    Daemon,
    ServiceRepo,
    daemon_with,
    free_port,
    wait_for,
)

pytestmark = pytest.mark.integration

PROBE = """\
import json, os, socket, threading, time, urllib.parse, urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

TARGETS = {targets!r}


def connect(port):
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2):
            return "open"
    except OSError as exc:
        return type(exc).__name__


def through_proxy(port):
    if "HTTPS_PROXY" not in os.environ:
        return None
    proxy = urllib.parse.urlsplit(os.environ["HTTPS_PROXY"])
    with socket.create_connection((proxy.hostname, proxy.port), timeout=5) as s:
        s.sendall(b"CONNECT 127.0.0.1:%d HTTP/1.1\\r\\nHost: x\\r\\n\\r\\n" % port)
        return s.recv(200).split(b"\\r\\n", 1)[0].decode()


def listening():
    ports = set()
    for line in open("/proc/net/tcp").read().splitlines()[1:]:
        local, state = line.split()[1], line.split()[3]
        if state == "0A":
            ports.add(int(local.split(":")[1], 16))
    return sorted(ports)


def steal(port):
    # bind the port as soon as it is free (its service crashed), and answer there

    class Stolen(BaseHTTPRequestHandler):
        def do_GET(self):
            body = json.dumps({{"started": "stolen", "env": {{}}}}).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    def keep_trying():
        for _ in range(3000):
            try:
                server = ThreadingHTTPServer(("127.0.0.1", port), Stolen)
            except OSError:
                time.sleep(0.01)
            else:
                server.serve_forever()

    threading.Thread(target=keep_trying, daemon=True).start()


class Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_GET(self):
        if self.path.startswith("/steal/"):
            steal(int(self.path.removeprefix("/steal/")))
            found = "trying"
        elif self.path == "/reach":
            with urllib.request.urlopen(os.environ["VAULT_URL"], timeout=5) as peer:
                vault = json.loads(peer.read())["env"]["BRANCHYARD_SERVICE"]
            found = {{
                "connect": {{name: connect(port) for name, port in TARGETS.items()}},
                "proxy": through_proxy(TARGETS["api"]),
                "listening": listening(),
                "peer": vault,
                "proxy_variable": os.environ.get("HTTPS_PROXY"),
                "port": int(os.environ["PORT"]),
                "peer_port": urllib.parse.urlsplit(os.environ["VAULT_URL"]).port,
            }}
        else:
            found = "ok"
        body = json.dumps(found).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


ThreadingHTTPServer(("127.0.0.1", int(os.environ["PORT"])), Handler).serve_forever()
"""


@pytest.fixture
def networked(tmp_path: Path) -> Iterator[tuple[Daemon, int]]:
    """A daemon that also serves its git server on loopback, and that server's port."""
    git_port = free_port()
    with daemon_with(tmp_path / "home", "--git-listen", f"127.0.0.1:{git_port}") as running:
        yield running, git_port


def _hostile(
    daemon: Daemon, git_port: int, make_repo: Callable[..., ServiceRepo]
) -> tuple[ServiceRepo, dict[str, int]]:
    """vault live in main, and the probe live in evil, aimed at every port it should miss."""
    vault, probe = make_repo("vault"), make_repo("probe")
    daemon.cli("repo", "add", str(vault.origin))
    daemon.cli("repo", "add", str(probe.origin))
    # vault's second revision knows its peer probe in main: its port is the one to steal
    wait_for(lambda: "PROBE_URL" in daemon.answer("vault")["env"], 30, "vault with its peer")
    vault_port = int(daemon.answer("vault")["env"]["PORT"])
    targets = {
        "api": int(daemon.info["api"].rsplit(":", 1)[1]),
        "router": daemon.router_port,
        "git": git_port,
        "vault": vault_port,
    }
    probe.checkout("evil")
    probe.commit({"app.py": PROBE.format(targets=targets)}, "probe")
    probe.push("evil")
    wait_for(lambda: daemon.answer("probe", "evil", "/"), 60, "probe live")
    return probe, targets


def test_a_box_reaches_its_peer_and_nothing_else_of_the_machine(
    networked: tuple[Daemon, int], make_repo: Callable[..., ServiceRepo]
) -> None:
    daemon, git_port = networked
    _, targets = _hostile(daemon, git_port, make_repo)
    found: dict[str, Any] = daemon.answer("probe", "evil", "/reach")
    assert found["peer"] == "vault", "its peer, the baseline's vault, through VAULT_URL"
    refused = {name: "ConnectionRefusedError" for name in targets}
    assert found["connect"] == refused
    assert (found["proxy"] or "").startswith("HTTP/1.1 403"), found["proxy"]
    assert found["proxy_variable"] == "http://127.0.0.1:3128"
    # In its namespace: its own port, and the daemon's peer address and proxy for it.
    assert found["listening"] == sorted([found["port"], found["peer_port"], 3128])
    assert "with its own network" in daemon.cli("info").stdout


def test_a_box_that_binds_another_services_port_gets_none_of_its_requests(
    networked: tuple[Daemon, int], make_repo: Callable[..., ServiceRepo]
) -> None:
    daemon, git_port = networked
    _, targets = _hostile(daemon, git_port, make_repo)
    status, body = daemon.get("probe.evil.localhost", f"/steal/{targets['vault']}")
    assert (status, body) == (200, b'"trying"')
    first = daemon.answer("vault")["started"]

    os.kill(daemon.host_pid("vault"), signal.SIGKILL)  # the moment the attack waits for
    wait_for(lambda: daemon.answer("vault")["started"] != first, 30, "vault back")
    answers = [daemon.answer("vault") for _ in range(20)]
    assert {a["started"] for a in answers} != {"stolen"}
    assert all(a["env"]["BRANCHYARD_SERVICE"] == "vault" for a in answers), "none the probe's"
    assert daemon.row("main", "vault")["state"] == "live"
