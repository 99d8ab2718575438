"""Nothing grows without bound: webhook floods, event text, build logs, logs across
rotation, and connections that never finish their request."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import select
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
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
from tests.test_api import call, github_push, signed, token_of

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
    assert len([e for e in events if "not a registered repo" in e["message"]]) == 1
    shown = daemon.cli("events").stdout
    assert "\x1b" not in shown and "\x07" not in shown
    assert "\\x1b]0;pwned\\x07" in shown and "more characters)" in shown


FLOOD = 10_400  # unauthenticated webhooks: more than the 10,000 events the store keeps
SENDERS = 8  # connections sending them at once


def send_webhooks(daemon: Daemon, deliveries: list[tuple[bytes, dict[str, str]]]) -> list[int]:
    """POST each delivery to /hooks/github over one keep-alive connection; the statuses."""
    port = int(daemon.info["api"].rsplit(":", 1)[1])
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    statuses = []
    try:
        for body, headers in deliveries:
            connection.request("POST", "/hooks/github", body=body, headers=headers)
            response = connection.getresponse()
            response.read()
            statuses.append(response.status)
    finally:
        connection.close()
    return statuses


def test_a_flood_of_unauthenticated_webhooks_keeps_every_real_event(
    daemon: Daemon, make_repo: Callable[..., ServiceRepo]
) -> None:
    app = make_repo("app")
    daemon.cli("repo", "add", str(app.origin), "--webhook-secret", "s3cret")
    wait_for(lambda: daemon.answer("app"), 60, "app live")
    good = {"Authorization": f"Bearer {token_of(daemon)}"}
    before = call(daemon, "GET", "/api/events", headers=good)[1]
    assert any(e["kind"] == "deploy" and e["message"].startswith("v1 ") for e in before)
    assert any(e["kind"] == "live" for e in before)

    sha = "1" * 40
    stranger = github_push("https://forge.example/nobody.git", "main", sha)
    forged = github_push(str(app.origin), "main", sha)
    deliveries = [
        (stranger, {"X-GitHub-Event": "push"}) if n % 2 else (forged, signed(forged, "guess"))
        for n in range(FLOOD)
    ]
    with ThreadPoolExecutor(SENDERS) as pool:
        shares = [deliveries[n::SENDERS] for n in range(SENDERS)]
        statuses = [s for done in pool.map(send_webhooks, [daemon] * SENDERS, shares) for s in done]
    assert sorted(set(statuses)) == [202, 401] and len(statuses) == FLOOD

    after = call(daemon, "GET", "/api/events", headers=good)[1]
    assert after[: len(before)] == before  # every real event is still there
    refused = after[len(before) :]
    assert len(refused) <= 2 and all(e["kind"] == "webhook" for e in refused), refused
    shown = daemon.cli("events").stdout
    assert "v1 " in shown and ("not a registered repo" in shown or "does not match" in shown)


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
        stop_cleanly(daemon)


LOUD = """\
import sys
line = "x" * 90
for number in range(300_000):
    sys.stdout.write(f"line {number:08d} {line}\\n")
print("loud step finished")
"""


def test_a_build_step_printing_30_mb_leaves_a_capped_build_log_served_by_its_tail(
    tmp_path: Path, make_repo: Callable[..., ServiceRepo]
) -> None:
    limit = 1024 * 1024
    app = make_repo(
        "app",
        stdlib_service(
            **{"loud.py": LOUD, "branchyard.yaml": "build:\n  - python loud.py\n  - echo done\n"}
        ),
    )
    daemon = start_daemon(tmp_path / "home", "--log-limit", str(limit))
    try:
        daemon.cli("repo", "add", str(app.origin))
        log = daemon.home / "logs" / "main" / "app" / "v1.build.log"
        seen: list[int] = []  # every size either part had while the step printed

        def live_and_sampled() -> bool:
            for part in (log, log.parent / "v1.build.log.1"):
                with contextlib.suppress(FileNotFoundError):
                    seen.append(part.stat().st_size)
            return bool(daemon.row("main", "app")["live"])

        wait_for(live_and_sampled, 60, "app live")
        assert seen and max(seen) <= limit, seen
        sizes = [log.stat().st_size, (log.parent / "v1.build.log.1").stat().st_size]
        assert max(sizes) <= limit, sizes

        tail = daemon.cli("logs", "--build", "--tail", "3", "app").stdout.splitlines()
        assert tail[0] == "loud step finished" and tail[2] == "done", tail
        assert tail[1].startswith("$ /bin/sh -c echo done")
        whole = daemon.cli("logs", "--build", "app").stdout
        assert len(whole) <= sum(sizes) and whole.endswith(
            "loud step finished\n" + "\n".join(tail[1:]) + "\n"
        )
        assert "line 00299999" in whole and "line 00000000" not in whole
    finally:
        stop_cleanly(daemon)


TICKER = (
    """\
import threading, time

def tick():
    number = 0
    while True:
        print(f"tick {number:08d}", flush=True)
        number += 1
        time.sleep(0.004)

threading.Thread(target=tick, daemon=True).start()
"""
    + SERVICE
)


def ticks_followed(process: subprocess.Popen[bytes], count: int) -> list[int]:
    """The tick numbers ``logs -f`` prints, until ``count`` of them (or 60 s pass)."""
    assert process.stdout is not None
    ticks: list[int] = []
    rest = b""
    deadline = time.monotonic() + 60
    while len(ticks) < count:
        left = deadline - time.monotonic()
        ready, _, _ = select.select([process.stdout], [], [], max(left, 0))
        assert ready, f"logs -f printed nothing more after {len(ticks)} ticks"
        chunk = os.read(process.stdout.fileno(), 65536)
        assert chunk, "logs -f ended"
        *lines, rest = (rest + chunk).split(b"\n")
        ticks += [int(line.split()[1]) for line in lines if line.startswith(b"tick ")]
    return ticks


def test_logs_follow_goes_on_across_rotations_of_the_log(
    tmp_path: Path, make_repo: Callable[..., ServiceRepo]
) -> None:
    limit = 2048  # about 145 ticks: the log is rotated about every 0.6 s
    app = make_repo("app", {"Procfile": "web: python app.py\n", "app.py": TICKER})
    daemon = start_daemon(tmp_path / "home", "--log-limit", str(limit))
    command = [sys.executable, "-m", "branchyard", "--home", str(daemon.home)]
    follower = None
    try:
        daemon.cli("repo", "add", str(app.origin))
        wait_for(lambda: daemon.answer("app"), 60, "app live")
        rotated = daemon.home / "logs" / "main" / "app" / "v1.log.1"
        follower = subprocess.Popen([*command, "logs", "-f", "app"], stdout=subprocess.PIPE)
        ticks = ticks_followed(follower, 1500)  # about ten rotations
        assert rotated.exists()
        assert ticks == sorted(set(ticks)), "a tick came twice or out of order"
        missing = sorted(set(range(ticks[0], ticks[-1] + 1)) - set(ticks))
        assert missing == [], f"{len(missing)} ticks lost: {missing[:10]}"
    finally:
        if follower is not None:
            follower.kill()
            follower.wait()
        stop_cleanly(daemon)
