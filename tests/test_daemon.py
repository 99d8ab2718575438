"""The daemon's own edges: ports, homes, demo, following logs."""

from __future__ import annotations

import os
import queue
import socket
import stat
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import (
    SERVICE,
    Daemon,
    ServiceRepo,
    start_daemon,
    stdlib_service,
    stop_cleanly,
    wait_for,
)

pytestmark = pytest.mark.integration


def _up(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "branchyard", "--home", str(home), "up", *args],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def test_a_second_daemon_on_the_same_home_or_port_is_refused(
    daemon: Daemon, tmp_path: Path
) -> None:
    same_home = _up(daemon.home, "--router-port", "0")
    assert same_home.returncode == 1
    assert same_home.stderr.strip().splitlines()[-1] == (
        f"error: a daemon is already running with home {daemon.home}"
    )
    same_port = _up(tmp_path / "other", "--router-port", str(daemon.router_port))
    assert same_port.returncode == 1
    last = same_port.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: cannot listen on 127.0.0.1:{daemon.router_port}"), last
    assert not (tmp_path / "other" / "daemon.json").exists()
    assert daemon.cli("info").stdout.startswith("router  http://127.0.0.1:")


def test_demo_registers_three_wired_sample_services(daemon: Daemon, tmp_path: Path) -> None:
    done = daemon.cli("demo", str(tmp_path / "demo"))
    assert "registered other_app" in done.stdout
    assert f"curl http://web.bugfix.localhost:{daemon.router_port}/" in done.stdout
    wait_for(lambda: daemon.ps_q() == ["main:app", "main:other_app", "main:web"], 60, "demo")

    def page() -> str:
        status, body = daemon.get("web.main.localhost")
        both = b'"service": "other_app"' in body and b'"service": "app"' in body
        return body.decode() if status == 200 and both else ""

    # web may first start before app's branch heads are read, then restart wired to it
    wait_for(page, 60, "web showing both peers")
    again = daemon.cli("demo", str(tmp_path / "demo"), check=False)
    assert again.returncode == 1 and "already exists" in again.stderr


# The test service, saying the path of each request it answers (before answering it).
SAYS_EACH_REQUEST = SERVICE.replace(
    "    def log_message(self, *args):\n        pass\n",
    "    def log_message(self, *args):\n        print(self.command, self.path, flush=True)\n",
)
assert SAYS_EACH_REQUEST != SERVICE


def test_logs_follow_prints_the_output_and_keeps_the_stream_open(
    daemon: Daemon, make_repo: Callable[..., ServiceRepo]
) -> None:
    app = make_repo("app", stdlib_service(**{"app.py": SAYS_EACH_REQUEST}))
    daemon.cli("repo", "add", str(app.origin))
    wait_for(lambda: daemon.answer("app"), 30, "app live")
    daemon.answer("app", path="/before")  # written before following began
    follower = daemon.follow("logs", "-f", "app")
    lines: queue.Queue[str] = queue.Queue()
    assert follower.stdout is not None
    output = follower.stdout

    def read() -> None:
        for line in output:
            if line != "GET /\n":  # health checks and the waits for app
                lines.put(line)

    threading.Thread(target=read, daemon=True).start()
    try:
        assert lines.get(timeout=30).startswith("listening on")
        assert lines.get(timeout=30) == "GET /before\n"
        for number in range(3):  # written while it follows, each seen before the next
            daemon.answer("app", path=f"/after/{number}")
            assert lines.get(timeout=30) == f"GET /after/{number}\n"
        assert follower.poll() is None
    finally:
        follower.kill()
        follower.wait()
    assert lines.empty()  # nothing repeated


LOUD_SERVICE = """\
import http.server, os, sys
sys.stdout.write(("x" * 1023 + "\\n") * 8192)  # 8 MiB, more than the sockets between hold
sys.stdout.flush()
class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.end_headers()
        self.wfile.write(b"ok")
http.server.HTTPServer(("127.0.0.1", int(os.environ["PORT"])), Handler).serve_forever()
"""


@pytest.mark.integration
def test_the_daemon_stops_while_a_log_follower_reads_nothing(
    tmp_path: Path, make_repo: Callable[..., ServiceRepo]
) -> None:
    app = make_repo("app", {"Procfile": "web: python app.py\n", "app.py": LOUD_SERVICE})
    running = start_daemon(tmp_path / "home")
    try:
        running.cli("repo", "add", str(app.origin))
        wait_for(lambda: running.cli("ps", check=False).stdout.count(" live "), 60, "app live")
        client = socket.socket()
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        client.connect(("127.0.0.1", int(running.info["api"].rsplit(":", 1)[1])))
        token = (running.home / "token").read_text().strip()
        client.sendall(
            b"GET /api/namespaces/main/services/app/logs?follow=true HTTP/1.1\r\n"
            b"Host: api\r\nAuthorization: Bearer " + token.encode() + b"\r\n\r\n"
        )
        assert client.recv(4096).lower().startswith(b"http/1.1 200")
        # The client reads no further: the answer waits, blocked, for it.
        stop_cleanly(running)
        client.close()
    finally:
        running.stop()


def test_a_home_made_with_a_loose_umask_is_private_once_the_daemon_started(
    tmp_path: Path, make_repo: Callable[..., ServiceRepo]
) -> None:
    home = tmp_path / "home"
    loose = os.umask(0)
    try:
        home.mkdir(0o777)
        (home / "mirrors").mkdir(0o777)  # as a first daemon with no umask of its own left it
        (home / "token").write_text("a token someone set\n")
        (home / "token").chmod(0o666)
    finally:
        os.umask(loose)
    assert stat.S_IMODE(home.stat().st_mode) == 0o777
    running = start_daemon(home, wrap=["sh", "-c", 'umask 000 && exec "$@"', "sh"])
    try:
        running.cli("repo", "add", str(make_repo("app").origin))
        running.cli("env", "set", "app", "--secret", "X=1")  # makes secrets.json
        wait_for(lambda: running.answer("app"), 30, "app live")
        looked_at = [*home.iterdir(), *(home / "logs" / "main" / "app").iterdir()]
        modes = {
            str(path.relative_to(home)): oct(stat.S_IMODE(path.lstat().st_mode))
            for path in looked_at
            if not path.is_symlink()
        }
        assert {"token", "mirrors", "secrets.json", "state.db", "logs"} <= set(modes)
        assert [name for name in modes if name.endswith(".build.log")], modes
        private = {n: oct(0o700 if (home / n).is_dir() else 0o600) for n in modes}
        assert (oct(stat.S_IMODE(home.stat().st_mode)), modes) == (oct(0o700), private)
    finally:
        stop_cleanly(running)
