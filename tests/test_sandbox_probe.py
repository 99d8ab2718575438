"""A hostile service pushed on a branch tries every read and escape of issue 10.

Sandboxed, each one fails; with ``--no-sandbox`` the same probe reads the token,
the secrets, the store and another service's secret, and its escaped processes
outlive a daemon killed with -9: the probe works, so the sandboxed test can fail.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from bench.common import processes_with
from branchyard.runtime.sandbox import TMP_SIZE
from tests.conftest import Daemon, ServiceRepo, git, start_daemon, stop_cleanly, wait_for
from tests.githttp import GitHttpServer
from tests.leftovers import boxes
from tests.test_api import call, github_push, signed

WEBHOOK_SECRET = "hook-secret-of-the-daemon"
REPO_SECRET = "hook-secret-of-the-vault-repo"
DB_PASSWORD = "vaults-own-db-password"
ESCAPERS = ("86399", "86398", "86397")
# setsid, a double fork through a subshell, and setsid -f: none stays in the process group.
PROCFILE = (
    "web: setsid sleep 86399 & (sleep 86398 &) ; setsid -f sleep 86397 ; exec python3 app.py\n"
)
PROBE = """\
import glob, json, os, resource
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

HOME = {home!r}


def read(path):
    try:
        with open(path, "rb") as file:
            return file.read().decode("latin-1")
    except OSError:
        return None


def write(path):
    try:
        with open(path, "w") as file:
            file.write("x")
        return True
    except OSError:
        return False


def listing(path):
    try:
        return sorted(os.listdir(path))
    except OSError:
        return None


def probe():
    return {{
        "token": read(HOME + "/token"),
        "token_upwards": read(os.path.relpath(HOME + "/token")),
        "secrets": read(HOME + "/secrets.json"),
        "state": (read(HOME + "/state.db") or "") + (read(HOME + "/state.db-wal") or "") or None,
        "other_log": read(HOME + "/logs/main/vault/v2.log"),
        "other_builds": listing(HOME + "/builds/main"),
        "environs": [e for e in map(read, glob.glob("/proc/[0-9]*/environ")) if e],
        "parent": read("/proc/%d/environ" % os.getppid()),
        "pids": sorted(int(p) for p in os.listdir("/proc") if p.isdigit()),
        "uid": os.geteuid(),
        "tmp_writable": write("/tmp/mine"),
        "scratch_writable": write(os.environ["HOME"] + "/mine"),
        "etc_readable": read("/etc/hosts") is not None and read("/etc/passwd") is not None,
        "oom_score_adj": read("/proc/self/oom_score_adj"),
        "nproc": resource.getrlimit(resource.RLIMIT_NPROC)[0],
        "tmp_size": os.statvfs("/tmp").f_blocks * os.statvfs("/tmp").f_frsize,
        "environ": dict(os.environ),
    }}


class Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_GET(self):
        body = json.dumps(probe()).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


ThreadingHTTPServer(("127.0.0.1", int(os.environ["PORT"])), Handler).serve_forever()
"""


def escapers(marker: str) -> list[int]:
    """The pids of the probe's escaped ``sleep`` processes."""
    found = []
    for pid in processes_with(marker):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if argv[0] == b"sleep" and argv[1].decode() in ESCAPERS:
            found.append(pid)
    return found


@pytest.fixture
def hostile(
    tmp_path: Path, make_repo: Callable[..., ServiceRepo], monkeypatch: pytest.MonkeyPatch
) -> Iterator[Callable[..., tuple[Daemon, dict[str, Any]]]]:
    """A daemon (with ``flags``) running ``vault`` with a secret in main, and the probe in evil."""
    started: list[tuple[Daemon, tuple[str, ...]]] = []

    def run(*flags: str) -> tuple[Daemon, dict[str, Any]]:
        monkeypatch.setenv("BRANCHYARD_WEBHOOK_SECRET", WEBHOOK_SECRET)
        daemon = start_daemon(tmp_path / "home", *flags)
        started.append((daemon, flags))
        vault, probe = make_repo("vault"), make_repo("probe")
        daemon.cli("repo", "add", str(vault.origin), "--webhook-secret", REPO_SECRET)
        daemon.cli("env", "set", "vault", "--secret", f"DB_PASSWORD={DB_PASSWORD}")
        wait_for(lambda: (daemon.row("main", "vault")["live"] or {}).get("ordinal") == 2, 30)
        daemon.cli("repo", "add", str(probe.origin))
        probe.checkout("evil")
        files = {"Procfile": PROCFILE, "app.py": PROBE.format(home=str(daemon.home))}
        probe.commit(files, "probe")
        probe.push("evil")
        found = wait_for(lambda: daemon.answer("probe", "evil"), 60, "probe live")
        wait_for(lambda: len(escapers(daemon.marker)) == 3, 15, "the escapers started")
        return daemon, found

    yield run
    for daemon, flags in started:
        if daemon.process.poll() is None:
            stop_cleanly(daemon)
        elif not daemon.checked:  # killed by the test: the next daemon answers for it
            stop_cleanly(start_daemon(daemon.home, *flags))


def test_a_sandboxed_probe_reads_nothing_of_the_daemon_or_its_neighbours_and_escapes_nothing(
    hostile: Callable[..., tuple[Daemon, dict[str, Any]]],
) -> None:
    daemon, found = hostile()
    assert found["token"] is None
    assert found["token_upwards"] is None
    assert found["secrets"] is None
    assert found["state"] is None
    assert found["other_log"] is None
    assert found["other_builds"] is None
    assert found["parent"] is None
    assert not [e for e in found["environs"] if DB_PASSWORD in e or WEBHOOK_SECRET in e]
    assert len(found["pids"]) <= 6, found["pids"]  # its box: bwrap's init, sh, python, sleeps
    assert found["uid"] == 65534
    assert found["tmp_writable"] and found["scratch_writable"] and found["etc_readable"]
    assert found["oom_score_adj"] == "1000\n", found["oom_score_adj"]  # before the daemon
    # A cgroup counts its processes instead of the rlimit all boxes' user shared (4096).
    assert found["nproc"] == resource.getrlimit(resource.RLIMIT_NPROC)[0] != 4096
    assert found["tmp_size"] == TMP_SIZE
    assert WEBHOOK_SECRET not in found["environ"].values()

    daemon.kill()
    wait_for(lambda: not boxes(daemon.home), 15, "every box gone with the daemon")


def test_a_sandboxed_revision_that_stops_takes_its_escaped_processes_along(
    hostile: Callable[..., tuple[Daemon, dict[str, Any]]],
) -> None:
    daemon, _ = hostile()
    first = set(escapers(daemon.marker))
    daemon.cli("-n", "evil", "restart", "probe")
    wait_for(lambda: not first & set(escapers(daemon.marker)), 15, "the first box's escapers gone")
    assert len(escapers(daemon.marker)) == 3


def test_an_unsandboxed_probe_reads_it_all_and_its_escapers_outlive_the_daemon(
    hostile: Callable[..., tuple[Daemon, dict[str, Any]]],
) -> None:
    daemon, found = hostile("--no-sandbox")
    token = (daemon.home / "token").read_text()
    assert found["token"] == token
    assert found["token_upwards"] == token
    assert DB_PASSWORD in found["secrets"]
    assert REPO_SECRET in found["state"]
    assert "listening on" in found["other_log"]
    assert "vault" in found["other_builds"]
    assert [e for e in found["environs"] if DB_PASSWORD in e]
    assert daemon.marker in found["parent"], "the daemon's environment is readable"
    assert WEBHOOK_SECRET not in found["parent"], "but holds no secret"
    assert found["uid"] == os.geteuid()

    escaped = set(escapers(daemon.marker))
    daemon.kill()
    assert escaped & set(escapers(daemon.marker)), "unsandboxed escapers outlive the daemon"


def test_the_home_and_what_the_daemon_writes_in_it_are_private(
    daemon: Daemon, make_repo: Callable[..., ServiceRepo]
) -> None:
    assert daemon.home.stat().st_mode & 0o777 == 0o700
    daemon.cli("repo", "add", str(make_repo("app").origin))
    daemon.cli("env", "set", "app", "--secret", "X=1")  # makes secrets.json
    wait_for(lambda: daemon.answer("app"), 30, "app live")
    for log in (daemon.home / "logs" / "main" / "app").iterdir():
        assert log.stat().st_mode & 0o777 == 0o600, log.name
    for name in ("token", "secrets.json", "state.db", "daemon.json"):
        assert (daemon.home / name).stat().st_mode & 0o777 == 0o600, name
    assert json.loads((daemon.home / "daemon.json").read_text())["sandbox"]


def test_without_bubblewrap_up_refuses_in_one_line_saying_what_to_do(tmp_path: Path) -> None:
    empty = tmp_path / "bin"
    empty.mkdir()
    done = subprocess.run(
        [sys.executable, "-m", "branchyard", "--home", str(tmp_path / "home"), "up"],
        capture_output=True,
        text=True,
        env={**os.environ, "PATH": str(empty)},
        timeout=60,
    )
    assert done.returncode == 1
    assert done.stderr.count("\n") == 1, done.stderr
    assert "bubblewrap" in done.stderr and "--no-sandbox" in done.stderr


def test_an_unsandboxed_daemon_says_so_in_info_above_ps_and_on_the_dashboard(
    tmp_path: Path,
) -> None:
    daemon = start_daemon(tmp_path / "home", "--no-sandbox")
    try:
        info = daemon.cli("info").stdout
        assert "sandbox none: pushed code runs with the daemon's rights" in info
        listed = daemon.cli("ps", "-A")
        assert listed.stderr.startswith("warning: no sandbox: pushed code runs")
        assert listed.stdout.startswith("SERVICE")
        assert daemon.cli("ps", "-A", "-q").stdout == ""
        with urllib.request.urlopen(f"{daemon.info['api']}/login") as page:
            assert 'id="unsandboxed"' in page.read().decode()
    finally:
        stop_cleanly(daemon)


def test_a_sandboxed_daemon_says_which_box_and_warns_nowhere(daemon: Daemon) -> None:
    assert "sandbox bubblewrap: each process in its own box, as uid 65534" in (
        daemon.cli("info").stdout
    )
    assert daemon.cli("ps", "-A").stderr == ""
    with urllib.request.urlopen(f"{daemon.info['api']}/login") as page:
        assert 'id="unsandboxed"' not in page.read().decode()


def test_the_global_webhook_secret_works_but_is_gone_from_the_daemons_proc_environ(
    tmp_path: Path, make_repo: Callable[..., ServiceRepo], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BRANCHYARD_WEBHOOK_SECRET", WEBHOOK_SECRET)
    app = make_repo("app")
    running = start_daemon(tmp_path / "home", "--poll-interval", "3600")
    try:
        environ = Path(f"/proc/{running.process.pid}/environ").read_bytes()
        assert running.marker.encode() in environ
        assert WEBHOOK_SECRET.encode() not in environ
        with GitHttpServer(app.origin.parent) as server:
            url = f"{server.url}/app.git"
            running.cli("repo", "add", url)
            body = github_push(url, "main", git("rev-parse", "HEAD", cwd=app.clone))
            assert call(running, "POST", "/hooks/github", body, signed(body, "wrong"))[0] == 401
            hooked = call(running, "POST", "/hooks/github", body, signed(body, WEBHOOK_SECRET))
            assert hooked[0] == 202
    finally:
        stop_cleanly(running)


def test_the_scratch_area_lives_as_long_as_its_revision_restarts_included(
    daemon: Daemon, make_repo: Callable[..., ServiceRepo]
) -> None:
    app = make_repo("app")
    daemon.cli("repo", "add", str(app.origin))
    wait_for(lambda: daemon.answer("app"), 30, "app live")
    first = daemon.home / "scratch" / "main" / "app" / "v1"
    (first / "kept").write_text("x")
    daemon.cli("restart", "app")
    assert daemon.answer("app")["env"]["PORT"]
    assert (first / "kept").exists(), "a restart keeps the revision's scratch area"
    sha = app.commit({"n": "1"}, "next")
    app.push()
    wait_for(lambda: daemon.serves("app", "main", sha), 30, "next live")
    wait_for(lambda: not first.exists(), 15, "v1's scratch area gone with v1")
    assert (first.parent / "v2").is_dir()
