"""Rollouts: no dropped request, pin and roll back, supervision, retention, crash safety."""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import threading
import time
from collections.abc import Callable
from functools import partial
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from tests.conftest import (
    SERVICE,
    Daemon,
    ServiceRepo,
    daemon_with,
    git,
    processes_with,
    start_daemon,
    stdlib_service,
    stop_cleanly,
    wait_for,
)

pytestmark = pytest.mark.integration


class Load:
    """Bounded request loops through the router: keep-alive and a new connection each.

    Whatever goes wrong in a loop is an error of the load, an exception of any kind
    included (a loop that died of one would make fewer requests, and fewer errors): on
    leaving, the load fails unless each loop ran to the end without one and answered
    requests until then (see :meth:`answered_since`)."""

    LOOPS = ("keep-alive", "new connection")

    def __init__(self, port: int, host: str) -> None:
        self.port = port
        self.host = host
        # (time the request was sent, revision sha that answered it). The send time is
        # what counts: an answer made just before its revision stopped can reach this
        # thread after the stop was reported, when the machine is busy.
        self.answers: list[tuple[float, str]] = []
        self.errors: list[str] = []
        self.made = dict.fromkeys(self.LOOPS, 0)  # answers per loop
        self._stop = threading.Event()
        self._ended: list[str] = []  # loops that ran until told to stop
        self._threads = [
            threading.Thread(target=self._run, args=(name,), daemon=True) for name in self.LOOPS
        ]

    def __enter__(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(30)
        if exc[0] is None:
            assert self.errors == []
            assert sorted(self._ended) == sorted(self.LOOPS), f"loops ended early: {self._ended}"

    def answered_last_by(self, sha: str) -> bool:
        return bool(self.answers) and self.answers[-1][1] == sha

    def answered_since(self, made: dict[str, int], count: int) -> bool:
        """Each loop answered ``count`` more requests than it had made when ``made``
        (a copy of :attr:`made`) was taken."""
        return all(self.made[name] >= made[name] + count for name in self.LOOPS)

    def _run(self, name: str) -> None:
        try:
            self._loop(name)
        except Exception as exc:
            self.errors.append(f"{name} loop died: {type(exc).__name__}: {exc}")
        else:
            self._ended.append(name)

    def _loop(self, name: str) -> None:
        keep_alive = name == "keep-alive"
        connection: http.client.HTTPConnection | None = None
        deadline = time.monotonic() + 120  # bounded whatever happens
        while not self._stop.is_set():
            if time.monotonic() > deadline:
                raise TimeoutError("not stopped within 120 s")
            started = time.monotonic()
            sent = time.time()
            try:
                if connection is None:
                    connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
                headers = {"Host": self.host}
                if not keep_alive:
                    headers["Connection"] = "close"
                connection.request("GET", "/", headers=headers)
                response = connection.getresponse()
                body = response.read()
                if response.status != 200:
                    self.errors.append(f"HTTP {response.status}: {body[:100]!r}")
                else:
                    sha = json.loads(body)["env"]["BRANCHYARD_REVISION"]
                    self.answers.append((sent, sha))
                    self.made[name] += 1
                if not keep_alive or response.will_close:
                    connection.close()
                    connection = None
            except Exception as exc:  # any of them: a KeyError is a wrong answer too
                self.errors.append(f"{type(exc).__name__}: {exc}")
                if connection is not None:
                    connection.close()
                connection = None
            time.sleep(max(0.0, 0.01 - (time.monotonic() - started)))  # ~100/s per loop


NONE_YET = dict.fromkeys(Load.LOOPS, 0)


class Answers(BaseHTTPRequestHandler):
    """Answers every GET with 200 and the JSON body of the server's ``body``."""

    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        body = json.dumps(getattr(self.server, "body", {})).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.mark.parametrize(
    ("body", "error"),
    [
        ({"started": "x"}, "KeyError: 'env'"),  # a thread that died of it made no error once
        ({"env": {}}, "KeyError: 'BRANCHYARD_REVISION'"),
        ([], "TypeError: list indices must be integers or slices, not str"),
    ],
)
def test_a_load_whose_requests_get_a_wrong_answer_fails(body: object, error: str) -> None:
    server = ThreadingHTTPServer(("127.0.0.1", 0), Answers)
    server.body = body  # type: ignore[attr-defined]
    serving = threading.Thread(target=server.serve_forever, daemon=True)
    serving.start()
    try:
        with pytest.raises(AssertionError), Load(server.server_port, "app") as load:
            wait_for(lambda: len(load.errors) >= 10, 30, "errors")
        assert set(load.errors) == {error}, set(load.errors)
        assert load.made == dict.fromkeys(Load.LOOPS, 0)
    finally:
        server.shutdown()
        server.server_close()


def test_twenty_pushes_under_load_drop_no_request(
    daemon: Daemon, make_repo: Callable[..., ServiceRepo]
) -> None:
    app = make_repo("app")
    daemon.cli("repo", "add", str(app.origin))
    wait_for(lambda: daemon.answer("app"), 30, "app live")
    with Load(daemon.router_port, "app.main.localhost") as load:
        wait_for(lambda: load.answered_since(NONE_YET, 10), 30, "answers before the pushes")
        for number in range(20):
            sha = app.commit({"n.txt": str(number)}, f"push {number}")
            app.push()
            wait_for(partial(daemon.serves, "app", "main", sha), 30, f"push {number}")
            wait_for(partial(load.answered_last_by, sha), 30, f"push {number} answers the load")
        pushed = dict(load.made)
        wait_for(lambda: load.answered_since(pushed, 20), 30, "answers after the pushes")
    revisions = json.loads(daemon.cli("revisions", "app", "--format", "json").stdout)
    stopped_at = {r["sha"]: r["changed_at"] for r in revisions if r["state"] == "stopped"}
    late = [(at, sha) for at, sha in load.answers if sha in stopped_at and at > stopped_at[sha]]
    assert late == [], "requests sent after their revision was reported stopped, answered by it"


def test_rollback_pins_then_unpin_follows_new_commits(
    daemon: Daemon, make_repo: Callable[..., ServiceRepo]
) -> None:
    app = make_repo("app")
    daemon.cli("repo", "add", str(app.origin))
    first = wait_for(lambda: daemon.answer("app")["env"]["BRANCHYARD_REVISION"], 30)
    second = app.commit({"x": "2"}, "second commit")
    app.push()
    wait_for(lambda: daemon.serves("app", "main", second), 30, "second live")

    done = daemon.cli("rollback", "app")
    assert "v1" in done.stdout and "pinned" in done.stdout
    assert daemon.serves("app", "main", first)
    listing = daemon.cli("revisions", "app").stdout
    assert "second commit" in listing and "replaced by v1" in listing

    third = app.commit({"x": "3"}, "third commit")
    app.push()
    row = wait_for(
        lambda: (r := daemon.row("main", "app"))["latest"]["state"] == "staged" and r,
        30,
        "third staged",
    )
    assert row["latest"]["sha"] == third and "pinned v1" in row["state"]
    assert daemon.serves("app", "main", first)

    assert "v3 goes live" in daemon.cli("unpin", "app").stdout
    wait_for(lambda: daemon.serves("app", "main", third), 30, "third live after unpin")
    daemon.cli("promote", "app", "v2")
    assert daemon.serves("app", "main", second)
    assert daemon.row("main", "app")["pinned"] == 2


def test_unpin_goes_to_the_branch_head_building_it_if_need_be_and_ps_says_when_behind(
    daemon: Daemon, make_repo: Callable[..., ServiceRepo]
) -> None:
    # The flag lies in the service's environment, which its sandbox shows (read-only).
    refuses = "import os, sys\nif os.path.exists(os.environ['VIRTUAL_ENV'] + '/refuse'):\n"
    app = make_repo("app", stdlib_service(**{"app.py": refuses + "    sys.exit(5)\n" + SERVICE}))
    first = git("rev-parse", "HEAD", cwd=app.clone)
    daemon.cli("repo", "add", str(app.origin))
    wait_for(lambda: daemon.serves("app", "main", first), 30, "v1 live")
    (flag,) = (venv / "refuse" for venv in (daemon.home / "venvs").iterdir())
    flag.write_text("x")
    head = app.commit({"x": "2"}, "second")
    app.push()
    wait_for(lambda: daemon.row("main", "app")["latest"]["state"] == "failed", 30, "v2 failed")
    assert daemon.row("main", "app")["logs_command"] == "branchyard logs app --revision 2"
    flag.unlink()

    daemon.cli("promote", "app", "1")
    assert "pinned v1" in daemon.cli("ps").stdout
    assert daemon.cli("unpin", "app").stdout == (
        f"main:app follows new commits; building the head of main ({head[:7]})\n"
    )
    wait_for(lambda: daemon.serves("app", "main", head), 30, "the head built again, live")
    assert daemon.row("main", "app")["live"]["ordinal"] == 3

    daemon.cli("rollback", "app")
    behind = f"behind main ({head[:7]})"
    assert daemon.serves("app", "main", first) and behind in daemon.cli("ps").stdout
    assert daemon.row("main", "app")["behind"] and behind in daemon.page("/ns/main/app")[1]
    assert daemon.cli("unpin", "app").stdout == "main:app follows new commits; v3 goes live\n"
    assert daemon.serves("app", "main", head)
    assert "behind" not in daemon.cli("ps").stdout and not daemon.row("main", "app")["behind"]
    assert daemon.cli("unpin", "app").stdout == "main:app follows new commits\n"  # not pinned
    assert daemon.row("main", "app")["latest"]["ordinal"] == 3


def test_weights_split_traffic_per_request(
    daemon: Daemon, make_repo: Callable[..., ServiceRepo]
) -> None:
    app = make_repo("app")
    daemon.cli("repo", "add", str(app.origin))
    first = wait_for(lambda: daemon.answer("app")["env"]["BRANCHYARD_REVISION"], 30)
    second = app.commit({"x": "2"}, "canary")
    app.push()
    wait_for(lambda: daemon.serves("app", "main", second), 30, "second live")
    assert "v1=50 v2=50" in daemon.cli("weight", "app", "1=50", "2=50").stdout
    seen = [daemon.answer("app")["env"]["BRANCHYARD_REVISION"] for _ in range(200)]
    assert seen.count(first) > 40 and seen.count(second) > 40
    assert "split v1=50 v2=50" in daemon.cli("ps").stdout


def test_a_daemon_restart_keeps_the_pin_of_a_split_but_not_the_split(
    tmp_path: Path, make_repo: Callable[..., ServiceRepo]
) -> None:
    app = make_repo("app")
    first = start_daemon(tmp_path / "home")
    try:
        first.cli("repo", "add", str(app.origin))
        one = wait_for(lambda: first.answer("app")["env"]["BRANCHYARD_REVISION"], 30)
        two = app.commit({"x": "2"}, "canary")
        app.push()
        wait_for(lambda: first.serves("app", "main", two), 30, "second live")
        first.cli("weight", "app", "1=70", "2=30")
        seen = {first.answer("app")["env"]["BRANCHYARD_REVISION"] for _ in range(100)}
        assert seen == {one, two}
    finally:
        stop_cleanly(first)

    second = start_daemon(tmp_path / "home")
    try:
        wait_for(lambda: second.serves("app", "main", one), 30, "the pinned one back")
        assert {second.answer("app")["env"]["BRANCHYARD_REVISION"] for _ in range(100)} == {one}
        ps = second.cli("ps").stdout
        assert "pinned v1" in ps and "split" not in ps, ps
    finally:
        stop_cleanly(second)


def test_a_live_revision_that_crashes_is_restarted_and_gives_up_after_too_many(
    daemon: Daemon, make_repo: Callable[..., ServiceRepo]
) -> None:
    app = make_repo("app")
    first = git("rev-parse", "HEAD", cwd=app.clone)
    daemon.cli("repo", "add", str(app.origin))
    started = wait_for(lambda: daemon.answer("app")["started"], 30, "app live")
    os.kill(daemon.host_pid("app"), signal.SIGKILL)
    wait_for(lambda: daemon.answer("app")["started"] != started, 30, "restarted")
    assert daemon.row("main", "app")["restarts"] == 1

    crashy = stdlib_service(
        **{
            "app.py": (
                "import os, sys, pathlib\n"
                "if pathlib.Path(os.environ['HOME'], 'crash').exists():  # its scratch area\n"
                "    print('giving up now', flush=True)\n"
                "    sys.exit(7)\n" + stdlib_service()["app.py"]
            )
        }
    )
    sha = app.commit(crashy, "crashes once flagged")
    app.push()
    wait_for(lambda: daemon.serves("app", "main", sha), 30, "crashy live")
    (daemon.home / "scratch" / "main" / "app" / "v2" / "crash").write_text("x")
    os.kill(daemon.host_pid("app"), signal.SIGKILL)
    row = wait_for(
        lambda: (r := daemon.row("main", "app"))["latest"]["state"] == "crashed" and r,
        90,
        "crashed",
    )
    assert row["reason"] == "exited with code 7 after 5 restarts; last output: giving up now"
    assert any("giving up now" in line for line in row["last_lines"])
    assert "crashed: exited with code 7" in daemon.cli("ps").stdout
    events = daemon.cli("events").stdout.splitlines()
    assert len([e for e in events if "  restarting " in e and " v2 " in e]) == 5  # 5 restarts
    status, body = daemon.get("app.main.localhost")
    assert status == 503
    assert b"app in main is not serving: v2 crashed (exited with code 7" in body
    assert b"yet" not in body

    assert 'data-action="rollback">Roll back to v1<' in daemon.page("/ns/main/app")[1]
    assert "main:app is on v1, pinned" in daemon.cli("rollback", "app").stdout
    assert daemon.serves("app", "main", first)


def test_builds_are_kept_for_the_last_five_revisions_and_gc_reports(
    daemon: Daemon, make_repo: Callable[..., ServiceRepo]
) -> None:
    app = make_repo("app")
    daemon.cli("repo", "add", str(app.origin))
    for number in range(7):
        sha = app.commit({"n": str(number)}, f"c{number}")
        app.push()
        wait_for(partial(daemon.serves, "app", "main", sha), 30, f"commit {number}")
    builds = daemon.home / "builds" / "main" / "app"
    wait_for(lambda: len(list(builds.glob("*.ok"))) == 6, 15, "six builds (live and five)")
    said = daemon.cli("gc").stdout  # the local runtime removes environments, deletes no objects
    assert re.fullmatch(r"freed \d+\.\d MB of builds, removed \d+ environments\n", said), said
    kept = [(p.name, p.stat().st_ino, p.stat().st_mtime_ns) for p in sorted(builds.glob("v4-*"))]
    assert len(kept) == 2, kept  # the checkout and its .ok mark
    daemon.cli("rollback", "app", "v4")
    assert daemon.row("main", "app")["live"]["ordinal"] == 4
    again = [(p.name, p.stat().st_ino, p.stat().st_mtime_ns) for p in sorted(builds.glob("v4-*"))]
    assert again == kept, "the kept build of v4 served the rollback, not a new build"


# A service that says it got SIGTERM and goes on: only SIGKILL ends it.
STUBBORN = """\
import signal
signal.signal(signal.SIGTERM, lambda *_: print("ignoring SIGTERM", flush=True))
"""
# A service that cleans up for a second when told to stop, then exits 0.
GRACEFUL = """\
import signal, sys, time
def finish(*_):
    print("got SIGTERM", flush=True)
    time.sleep(1)
    print("cleaned up, exiting 0", flush=True)
    sys.exit(0)
signal.signal(signal.SIGTERM, finish)
"""


def test_the_logs_of_the_last_ten_revisions_are_kept(
    daemon: Daemon, make_repo: Callable[..., ServiceRepo]
) -> None:
    app = make_repo("app")
    daemon.cli("repo", "add", str(app.origin))
    for number in range(11):  # v2 to v12
        sha = app.commit({"n": str(number)}, f"c{number}")
        app.push()
        wait_for(partial(daemon.serves, "app", "main", sha), 30, f"commit {number}")
    logs = daemon.home / "logs" / "main" / "app"
    kept = {int(log.name[1:].split(".")[0]) for log in logs.iterdir()}
    assert kept == set(range(3, 13)), sorted(kept)
    assert {log.name for log in logs.glob("v12.*")} == {"v12.log", "v12.build.log"}
    assert daemon.cli("logs", "--revision", "3", "app").stdout.startswith("listening on")
    assert daemon.cli("logs", "--revision", "2", "app").stdout == ""  # v2's deleted


def replaced(running: Daemon, app: ServiceRepo) -> int:
    """Add ``app``, then push a commit and wait until it serves: the pid of v1's process."""
    running.cli("repo", "add", str(app.origin))
    pid = wait_for(lambda: running.host_pid("app"), 30, "app live")
    sha = app.commit({"n": "1"}, "next")
    app.push()
    wait_for(lambda: running.serves("app", "main", sha), 30, "next live")
    return pid


@pytest.mark.parametrize("flags", [(), ("--no-sandbox",)], ids=["sandboxed", "unsandboxed"])
def test_a_replaced_service_gets_sigterm_and_its_grace_to_finish(
    tmp_path: Path, make_repo: Callable[..., ServiceRepo], flags: tuple[str, ...]
) -> None:
    """Its shell and its box stay until it is done (they ended at once, and it with them)."""
    app = make_repo("app", stdlib_service(**{"app.py": GRACEFUL + SERVICE}))
    with daemon_with(tmp_path / "home", "--stop-grace", "60", *flags) as running:
        pid = replaced(running, app)
        # well before the grace ends: it exited by itself, SIGKILL never came
        wait_for(lambda: not Path(f"/proc/{pid}").exists(), 30, "the old one to exit")
        said = running.cli("logs", "--revision", "1", "app").stdout.splitlines()
    assert said[-2:] == ["got SIGTERM", "cleaned up, exiting 0"], said


def test_a_service_that_ignores_sigterm_is_killed_after_the_grace(
    tmp_path: Path, make_repo: Callable[..., ServiceRepo]
) -> None:
    app = make_repo("app", stdlib_service(**{"app.py": STUBBORN + SERVICE}))
    running = start_daemon(tmp_path / "home", "--stop-grace", "1", "--drain-grace", "1")
    try:
        pid = replaced(running, app)
        wait_for(lambda: not Path(f"/proc/{pid}").exists(), 15, "the stubborn one killed")
        assert "ignoring SIGTERM" in running.cli("logs", "--revision", "1", "app").stdout
    finally:
        stop_cleanly(running)


@pytest.mark.parametrize("flags", [(), ("--no-sandbox",)], ids=["sandboxed", "unsandboxed"])
def test_a_daemon_killed_with_sigkill_is_cleaned_up_by_the_next_one(
    tmp_path: Path, make_repo: Callable[..., ServiceRepo], flags: tuple[str, ...]
) -> None:
    """Boxes die with their daemon; unsandboxed processes outlive it until the next one
    kills their process groups, which it found in the store."""
    app, web = make_repo("app"), make_repo("web")
    first = start_daemon(tmp_path / "home", *flags)
    for repo in (app, web):
        first.cli("repo", "add", str(repo.origin))
    wait_for(lambda: first.answer("web")["env"].get("APP_URL"), 30, "wired")
    first.cli("env", "set", "web", "GREETING=survives")
    wait_for(lambda: first.answer("web")["env"].get("GREETING") == "survives", 30, "set")
    old_pids = set(processes_with(first.marker))
    first.kill()
    if flags:
        assert old_pids & set(processes_with(first.marker)), "services outlive the daemon"
    else:
        wait_for(lambda: not processes_with(first.marker), 15, "the boxes gone with the daemon")

    second = start_daemon(tmp_path / "home", *flags)
    try:
        wait_for(lambda: second.answer("web")["env"].get("GREETING") == "survives", 60, "back")
        wait_for(lambda: not (old_pids & set(processes_with(first.marker))), 15, "old ones gone")
        assert "env set GREETING" in second.cli("history", "web").stdout
        argvs = [
            Path(f"/proc/{p}/cmdline").read_bytes().split(b"\0")
            for p in processes_with(second.marker)
        ]
        services = [a for a in argvs if a[0].endswith(b"python") and b"app.py" in a]
        assert len(services) == 2, "one process per revision"
    finally:
        stop_cleanly(second)


def test_restart_starts_new_processes_of_the_same_revision_without_a_gap(
    daemon: Daemon, make_repo: Callable[..., ServiceRepo]
) -> None:
    app = make_repo("app")
    daemon.cli("repo", "add", str(app.origin))
    before = wait_for(lambda: daemon.answer("app"), 30, "app live")
    before_pid = daemon.host_pid("app")
    with Load(daemon.router_port, "app.main.localhost") as load:
        wait_for(lambda: load.answered_since(NONE_YET, 10), 30, "answers before the restart")
        assert "v1 restarted" in daemon.cli("restart", "app").stdout
        restarted = dict(load.made)
        wait_for(lambda: load.answered_since(restarted, 20), 30, "answers after the restart")
    after = daemon.answer("app")
    assert after["started"] != before["started"]
    assert after["env"]["BRANCHYARD_REVISION"] == before["env"]["BRANCHYARD_REVISION"]
    wait_for(lambda: not Path(f"/proc/{before_pid}").exists(), 15, "old process stopped")
