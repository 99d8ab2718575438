"""Bad behaviour that must be survived: hangs, floods of logs, bursts, kills, leaks."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from functools import partial
from pathlib import Path

import pytest

from branchyard.client import Client, path_of
from tests.conftest import (
    Daemon,
    ServiceRepo,
    git,
    start_daemon,
    stdlib_service,
    stop_cleanly,
    wait_for,
)
from tests.leftovers import Made, held

pytestmark = pytest.mark.integration

HANGS = """\
import os, socket, time
server = socket.socket()
server.bind(("127.0.0.1", int(os.environ["PORT"])))
server.listen()
held = []
while True:
    connection, _ = server.accept()
    held.append(connection)  # accepts, never answers
"""

FLOODS = """\
import sys
line = "x" * 1023 + "\\n"
for _ in range(60 * 1024):  # 60 MiB of output
    sys.stdout.write(line)
sys.stdout.flush()
""" + stdlib_service()["app.py"]


def test_a_health_check_that_hangs_times_out_and_the_old_revision_serves(
    daemon: Daemon, make_repo: Callable[..., ServiceRepo]
) -> None:
    app = make_repo("app")
    daemon.cli("repo", "add", str(app.origin))
    first = wait_for(lambda: daemon.answer("app")["env"]["BRANCHYARD_REVISION"], 30)
    app.commit({"app.py": HANGS, "branchyard.yaml": "health:\n  timeout: 2\n"}, "hangs")
    app.push()
    row = wait_for(lambda: (r := daemon.row("main", "app"))["reason"] and r, 30, "failure")
    assert "did not pass within 2 s" in row["reason"]
    assert daemon.answer("app")["env"]["BRANCHYARD_REVISION"] == first


def test_a_service_flooding_its_log_keeps_it_bounded(
    daemon: Daemon, make_repo: Callable[..., ServiceRepo]
) -> None:
    app = make_repo("app", stdlib_service(**{"app.py": FLOODS}))
    daemon.cli("repo", "add", str(app.origin))
    wait_for(lambda: daemon.answer("app"), 60, "app live after its flood")
    log = daemon.home / "logs" / "main" / "app" / "v1.log"
    wait_for(lambda: log.stat().st_size <= 10 * 1024 * 1024, 10, "rotated")
    rotated = log.with_name("v1.log.1")
    assert rotated.stat().st_size <= 10 * 1024 * 1024
    assert log.stat().st_size + rotated.stat().st_size < 60 * 1024 * 1024


def test_a_burst_of_fifty_pushes_builds_only_what_is_newest(
    daemon: Daemon, make_repo: Callable[..., ServiceRepo]
) -> None:
    # A build a poll (every second) cuts short: a target superseded later than that built.
    build = "build: echo building && sleep 3 && echo built\n"
    app = make_repo("app", stdlib_service(**{"branchyard.yaml": build}))
    daemon.cli("repo", "add", str(app.origin))
    wait_for(lambda: daemon.answer("app"), 30, "app live")
    commits = [app.commit({"n": str(number)}, f"burst {number}") for number in range(50)]
    for sha in commits:  # fifty pushes, as fast as git goes
        git("push", "-q", "origin", f"{sha}:refs/heads/main", cwd=app.clone)
    last = commits[-1]
    wait_for(lambda: daemon.serves("app", "main", last), 60, "the newest live")
    history = json.loads(daemon.cli("revisions", "app", "--format", "json").stdout)
    times = [round(r["created_at"] - history[-1]["created_at"], 2) for r in history]
    assert len(history) <= 5, f"{len(history)} revisions for 50 pushes: {times}"
    assert (history[0]["state"], history[0]["sha"]) == ("live", last)
    assert history[-1]["state"] == "stopped"  # v1, replaced by the newest
    assert all(r["state"] == "superseded" for r in history[1:-1]), history
    logs = daemon.home / "logs" / "main" / "app"
    built = sorted(
        int(log.name[1:].split(".")[0])
        for log in logs.glob("v*.build.log")
        if "\nbuilt\n" in log.read_text()
    )
    assert built == [history[-1]["ordinal"], history[0]["ordinal"]]  # v1 and the newest
    kept = sorted(p.name for p in (daemon.home / "builds" / "main" / "app").glob("*.ok"))
    assert kept == [f"v{r['ordinal']}-{r['sha'][:7]}.ok" for r in (history[-1], history[0])]


def test_no_file_descriptor_leaks_across_a_hundred_deploys(
    daemon: Daemon, make_repo: Callable[..., ServiceRepo]
) -> None:
    pid = int(daemon.info["pid"])
    app = make_repo("app")
    daemon.cli("repo", "add", str(app.origin))
    wait_for(lambda: daemon.answer("app"), 30, "app live")

    def descriptors() -> int:
        return len(os.listdir(f"/proc/{pid}/fd"))

    for number in range(5):  # warm up pools and caches
        sha = app.commit({"n": str(number)}, f"warm {number}")
        app.push()
        wait_for(partial(daemon.serves, "app", "main", sha), 30, "warm-up")
    before = descriptors()

    def serves(version: str) -> bool:
        return bool(daemon.answer("app")["env"].get("VERSION") == version)

    # The CLI's own request, sent from here: a CLI process per deploy made it ~1.6x as long.
    api, env = Client(daemon.home), path_of("namespaces", "main", "services", "app", "env")
    for number in range(100):
        api.call("PATCH", env, {"set": {"VERSION": str(number)}})
        wait_for(partial(serves, str(number)), 30, f"deploy {number}")

    def retired() -> bool:  # marked stopped once its processes are gone
        revisions = json.loads(daemon.cli("revisions", "app", "--format", "json").stdout)
        return all(r["state"] in ("stopped", "superseded") for r in revisions[1:])

    wait_for(retired, 30, "the last retirement to finish")
    assert descriptors() <= before + 5, (before, descriptors())


@pytest.mark.parametrize(
    ("files", "moment"),
    [
        ({"branchyard.yaml": "build: echo mid-build && sleep 10\n"}, "mid-build"),
        (
            {
                "app.py": "import time\nprint('mid-health-check', flush=True)\ntime.sleep(10)\n"
                + stdlib_service()["app.py"],
                "branchyard.yaml": "health:\n  timeout: 60\n",
            },
            "mid-health-check",
        ),
    ],
    ids=["mid-build", "mid-health-check"],
)
def test_a_daemon_killed_mid_deploy_converges_on_restart(
    tmp_path: Path, make_repo: Callable[..., ServiceRepo], files: dict[str, str], moment: str
) -> None:
    """Converged: the deploy the kill cut short is done as the same revision (v2 live, v1
    stopped, no v3), ``ps`` shows what a daemon never killed shows, nothing of the first
    daemon runs, and the second one stops cleanly."""
    app = make_repo("app")
    home = tmp_path / "home"
    first = start_daemon(home)
    first.cli("repo", "add", str(app.origin))
    stable = wait_for(lambda: first.answer("app")["env"]["BRANCHYARD_REVISION"], 30)
    listed, before = first.ps_q(), first.row("main", "app")  # v1 live, as never killed
    pushed = app.commit(files, moment)
    app.push()
    suffix = ".build.log" if moment == "mid-build" else ".log"
    log = home / "logs" / "main" / "app" / f"v2{suffix}"
    wait_for(lambda: log.exists() and moment in log.read_text(), 30, moment)  # it says so
    made = Made.by(first.process.pid, home)
    assert made.processes, "the first daemon runs v1 and v2's build or start"
    first.kill()
    second = start_daemon(home)
    try:
        wait_for(lambda: not made.running(), 15, "the first daemon's processes gone")
        wait_for(lambda: not held(made.namespaces), 15, "the first daemon's box networks gone")
        wait_for(lambda: second.serves("app", "main", stable), 60, "the stable revision again")
        wait_for(lambda: second.serves("app", "main", pushed), 60, "the push deployed")
        row = wait_for(lambda: (r := second.row("main", "app"))["state"] == "live" and r, 30)
        assert (row["live"]["ordinal"], row["live"]["sha"]) == (2, pushed), row["live"]
        assert row["latest"] == row["live"] and (row["weights"], before["weights"]) == (
            {"2": 100},
            {"1": 100},
        )
        assert row["url"] == f"http://app.main.localhost:{second.router_port}/"  # port 0: new
        revision = ("live", "latest", "weights", "since", "url")
        assert {k: v for k, v in row.items() if k not in revision} == {
            k: v for k, v in before.items() if k not in revision
        }  # state live, no reason, no restart, no pin: what v1 showed
        assert second.ps_q() == listed == ["main:app"]
        found = json.loads(second.cli("revisions", "app", "--format", "json").stdout)
        assert [(r["ordinal"], r["sha"], r["state"]) for r in found] == [
            (2, pushed, "live"),
            (1, stable, "stopped"),
        ]
    finally:
        made.close()
        stop_cleanly(second)


def test_a_stale_git_lock_left_in_the_settings_is_removed_at_start(
    tmp_path: Path, make_repo: Callable[..., ServiceRepo]
) -> None:
    """A daemon killed mid-commit leaves git's index.lock (and a ref's lock) behind;
    the next one removes them, so settings can be changed again."""
    app = make_repo("app")
    first = start_daemon(tmp_path / "home")
    try:
        first.cli("repo", "add", str(app.origin))
        first.cli("env", "set", "app", "GREETING=before")
        wait_for(lambda: first.answer("app")["env"].get("GREETING") == "before", 30, "set")
    finally:
        stop_cleanly(first)
    dot_git = first.home / "settings" / ".git"
    stale = [dot_git / "index.lock", dot_git / "refs" / "heads" / "main.lock"]
    for lock in stale:
        lock.write_text("left by a killed daemon\n")

    second = start_daemon(tmp_path / "home")
    try:
        wait_for(lambda: second.answer("app")["env"].get("GREETING") == "before", 30, "back")
        assert not any(lock.exists() for lock in stale)
        second.cli("env", "set", "app", "GREETING=after")
        wait_for(lambda: second.answer("app")["env"].get("GREETING") == "after", 30, "changed")
        assert "GREETING=after" in second.cli("env", "ls", "app").stdout
    finally:
        stop_cleanly(second)
