"""Floods against a real daemon: thousands of idle connections to a peer listener, a
hundred held webhook bodies, three hundred unfinished fetches. Each is capped, and the
rest keeps being served meanwhile (docs/security.md, "Floods and their caps")."""

from __future__ import annotations

import contextlib
import resource
import selectors
import socket
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from branchyard.api import WEBHOOK_BODIES_BYTES, WEBHOOK_BODY_SECONDS
from branchyard.daemon import SERVER_CONNECTIONS
from branchyard.gitserve import BODY_SECONDS, GIT_PROCESSES, GIT_WAITING
from branchyard.router.limits import PEER_LISTENER_CONNECTIONS
from branchyard.webhooks import MAX_BODY
from tests.conftest import Daemon, ServiceRepo, git, start_daemon, stop_cleanly, wait_for

pytestmark = pytest.mark.integration

MIB = 1024 * 1024
WEBHOOK_GROWTH = 64 * MIB
"""The most the daemon's peak RSS may grow by while 100 webhook bodies are held: the
bodies' budget twice over (a body is copied once when complete), and room for the
interpreter; with no budget it grew by about 630 MB."""


@pytest.fixture(autouse=True)
def many_descriptors() -> Iterator[None]:
    """This process's soft descriptor limit at its hard one, for thousands of sockets."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


@contextlib.contextmanager
def connections(port: int, count: int) -> Iterator[list[socket.socket]]:
    with contextlib.ExitStack() as stack:
        yield [
            stack.enter_context(socket.create_connection(("127.0.0.1", port), timeout=60))
            for _ in range(count)
        ]


def first_answers(sockets: list[socket.socket], count: int) -> dict[socket.socket, bytes]:
    """The first bytes of the first ``count`` of ``sockets`` to answer, waited for."""
    answered: dict[socket.socket, bytes] = {}
    with selectors.DefaultSelector() as waiting:  # epoll: descriptors past select()'s 1024
        for sock in sockets:
            waiting.register(sock, selectors.EVENT_READ)
        while len(answered) < count:
            readable = waiting.select(60)
            assert readable, f"{len(answered)} of {count} answers came"
            for key, _ in readable:
                ready = key.fileobj
                assert isinstance(ready, socket.socket)
                answered[ready] = ready.recv(65536)
                waiting.unregister(ready)
    return answered


def read_to_end(sock: socket.socket) -> bytes:
    received = bytearray()
    while data := sock.recv(65536):
        received += data
    return bytes(received)


def status_kb(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} in /proc/{pid}/status")


def descriptors(pid: int) -> int:
    return len(list(Path(f"/proc/{pid}/fd").iterdir()))


def port_of(url: str) -> int:
    return int(url.rstrip("/").rsplit(":", 1)[1])


def test_a_flooded_peer_listener_refuses_past_its_cap_while_other_namespaces_and_the_api_serve(
    daemon: Daemon, make_repo: Callable[..., ServiceRepo]
) -> None:
    repos = {name: make_repo(name) for name in ("app", "web")}
    for repo in repos.values():
        daemon.cli("repo", "add", str(repo.origin))
    wait_for(lambda: daemon.ps_q() == ["main:app", "main:web"], 60, "the baseline")
    repos["web"].checkout("bugfix")
    repos["web"].push("bugfix")
    wait_for(lambda: daemon.answer("web", "bugfix"), 60, "web live in bugfix")
    pid = daemon.process.pid
    web = wait_for(lambda: daemon.answer("web"), 30, "web live in main")
    flooded = port_of(web["env"]["APP_URL"])  # (main, app)'s listener
    before = descriptors(pid)
    with connections(flooded, 4000) as flood:
        refused = first_answers(flood, 4000 - PEER_LISTENER_CONNECTIONS)
        for answer in refused.values():
            assert answer.startswith(b"HTTP/1.1 503 "), answer
            assert answer.endswith(b"holds 512 connections, its most\n"), answer
        held = descriptors(pid)
        assert held <= before + PEER_LISTENER_CONNECTIONS + 16, (before, held)
        # bugfix's web reaches app through its own peer listener (app falls back to main)
        reached = daemon.answer("web", "bugfix", "/call/APP_URL")["env"]
        assert reached["BRANCHYARD_SERVICE"] == "app"
        assert daemon.answer("web", "bugfix")["env"]["BRANCHYARD_NAMESPACE"] == "bugfix"
        assert daemon.ps_q("bugfix") == ["bugfix:web"]  # the API
    print(f"descriptors: {before} before, {held} under 4000 connections")


def test_connections_to_the_api_past_its_cap_are_refused_at_once(daemon: Daemon) -> None:
    with connections(port_of(daemon.info["api"]), SERVER_CONNECTIONS + 100) as flood:
        refused = first_answers(flood, 100)
        for answer in refused.values():
            assert answer.startswith(b"HTTP/1.1 503 "), answer
            assert answer.endswith(b"too many connections to this server: retry\n"), answer
    assert "router" in wait_for(lambda: daemon.cli("info", check=False).stdout, 10, "info")


def test_a_hundred_held_webhook_bodies_keep_the_daemon_within_its_memory_bound(
    daemon: Daemon,
) -> None:
    pid = daemon.process.pid
    before = status_kb(pid, "VmRSS")
    head = (
        b"POST /hooks/github HTTP/1.1\r\nHost: hooks\r\nContent-Type: application/json\r\n"
        b"X-GitHub-Event: push\r\nContent-Length: %d\r\n\r\n" % MAX_BODY
    )
    admitted = WEBHOOK_BODIES_BYTES // MAX_BODY
    with connections(port_of(daemon.info["api"]), 100) as senders:
        for sock in senders:
            sock.sendall(head + b"{")
        refused = first_answers(senders, 100 - admitted)
        for answer in refused.values():
            assert answer.startswith(b"HTTP/1.1 503 "), answer
            assert b"retry-after: 1" in answer.lower(), answer
        held = [sock for sock in senders if sock not in refused]
        for sock in held:
            sock.sendall(b" " * (MAX_BODY - 2))  # all but the last byte: it trickles
        assert "router" in daemon.cli("info").stdout  # the API answers meanwhile
        for sock in held:  # cut once WEBHOOK_BODY_SECONDS have passed
            answer = read_to_end(sock)
            assert answer.startswith(b"HTTP/1.1 408 "), answer
            assert f"not complete after {WEBHOOK_BODY_SECONDS:g} s".encode() in answer
    peak = status_kb(pid, "VmHWM")
    print(f"VmRSS {before} kB before; VmHWM {peak} kB after 100 held bodies")
    assert (peak - before) * 1024 <= WEBHOOK_GROWTH, (before, peak)


def git_processes(git_dir: Path) -> int:
    """How many ``git upload-pack`` processes serve ``git_dir`` now."""
    wanted = str(git_dir).encode()
    count = 0
    for entry in Path("/proc").iterdir():
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0") if entry.name.isdigit() else []
        except OSError:
            continue
        count += b"upload-pack" in argv and wanted in argv
    return count


def test_three_hundred_unfinished_fetches_run_few_gits_and_a_fetch_right_after_works(
    tmp_path: Path, make_repo: Callable[..., ServiceRepo]
) -> None:
    repo = make_repo("web", {"README": "web\n"})
    running = start_daemon(tmp_path / "home", "--git-listen", "127.0.0.1:0")
    try:
        running.cli("repo", "add", str(repo.origin))
        head = (
            b"POST /web/git-upload-pack HTTP/1.1\r\nHost: pod\r\n"
            b"Content-Type: application/x-git-upload-pack-request\r\n"
            b"Content-Length: 1000\r\n\r\n0032want "
        )
        with connections(port_of(running.info["git"]), 300) as flood:
            for sock in flood:
                sock.sendall(head)
            busy = first_answers(flood, 300 - GIT_PROCESSES - GIT_WAITING)
            for answer in busy.values():
                assert answer.startswith(b"HTTP/1.1 503 "), answer
                assert b"retry-after: 5" in answer.lower(), answer
            wait_for(lambda: git_processes(repo.origin) == GIT_PROCESSES, 10, "four gits")
            counts = [git_processes(repo.origin)]
            turns = [sock for sock in flood if sock not in busy]
            cut = first_answers(turns, GIT_PROCESSES)  # after BODY_SECONDS: their bodies cut
            for sock, start in cut.items():
                answer = start + read_to_end(sock)  # and the connection closes
                assert answer.startswith(b"HTTP/1.1 408 "), answer
                assert f"not complete after {BODY_SECONDS:g} s".encode() in answer
            counts.append(git_processes(repo.origin))
            assert max(counts) <= GIT_PROCESSES, counts
        clone = tmp_path / "clone"
        git("clone", "-q", f"{running.info['git']}/web", str(clone))
        assert (clone / "README").read_text() == "web\n"
        wait_for(lambda: git_processes(repo.origin) == 0, 10, "no git left")
    finally:
        stop_cleanly(running)
