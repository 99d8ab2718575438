"""Every failure of a deploy ends its revision as failed, once, with a reason and an event."""

from __future__ import annotations

import contextlib
import json
import sqlite3
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from branchyard.serving import INTERRUPTED
from tests.conftest import (
    Daemon,
    ServiceRepo,
    git,
    start_daemon,
    stdlib_service,
    stop_cleanly,
    wait_for,
)

pytestmark = pytest.mark.integration


@pytest.fixture
def restartable(tmp_path: Path) -> Iterator[Callable[[], Daemon]]:
    """Start a daemon on one home, as often as a test likes; each is checked when it stops."""
    started: list[Daemon] = []

    def start() -> Daemon:
        if started:
            stop(started[-1])
        started.append(start_daemon(tmp_path / "home"))
        return started[-1]

    def stop(daemon: Daemon) -> None:
        stop_cleanly(daemon)

    yield start
    if started:
        stop(started[-1])


def revisions(daemon: Daemon, service: str, namespace: str = "main") -> list[tuple[int, str]]:
    """(ordinal, state) of a service's revisions, newest first."""
    found = daemon.cli("-n", namespace, "revisions", service, "--format", "json").stdout
    rows: list[dict[str, Any]] = json.loads(found)
    return [(r["ordinal"], r["state"]) for r in rows]


def events(daemon: Daemon, kind: str) -> list[str]:
    """The lines of ``branchyard events`` of one kind."""
    return [line for line in daemon.cli("events").stdout.splitlines() if f"  {kind} " in line]


def settled(daemon: Daemon, repo: ServiceRepo) -> None:
    """Return once the daemon has planned with every head it can see: a new branch
    of ``repo``, from its first commit, is pushed and goes live, which takes a plan
    made after the others."""
    root = git("rev-list", "--max-parents=0", "HEAD", cwd=repo.clone)
    git("checkout", "-q", "-b", "probe", root, cwd=repo.clone)
    sha = repo.commit({"probe.txt": "1"}, "probe")
    repo.push("probe")
    wait_for(lambda: daemon.serves(repo.name, "probe", sha), 60, "the probe branch live")


def test_a_link_out_of_the_checkout_fails_the_revision_naming_the_link(
    daemon: Daemon, make_repo: Callable[..., ServiceRepo]
) -> None:
    app = make_repo("app")
    daemon.cli("repo", "add", str(app.origin))
    first = wait_for(lambda: daemon.answer("app")["env"]["BRANCHYARD_REVISION"], 30, "v1 live")

    (app.clone / "leak").symlink_to("/etc/passwd")
    app.commit({}, "leak the password file")
    app.push()
    wait_for(lambda: revisions(daemon, "app")[0] == (2, "failed"), 30, "v2 failed")

    why = "symlink leak points outside the checkout (to /etc/passwd)"
    assert daemon.row("main", "app")["reason"] == why
    assert any(f"v2: {why}" in line for line in events(daemon, "failed"))
    assert daemon.answer("app")["env"]["BRANCHYARD_REVISION"] == first
    assert not list((daemon.home / "builds" / "main" / "app").glob("v2-*"))


def test_an_unexpected_error_fails_the_revision_and_a_restart_keeps_it_failed(
    restartable: Callable[[], Daemon], make_repo: Callable[..., ServiceRepo]
) -> None:
    app = make_repo("app")
    first = restartable()
    # A file where the service's builds folder goes: the build meets a FileExistsError,
    # an error of the machine, not one of branchyard's own.
    (first.home / "builds" / "main").mkdir(parents=True)
    (first.home / "builds" / "main" / "app").write_text("in the way\n")
    first.cli("repo", "add", str(app.origin))
    wait_for(lambda: revisions(first, "app") == [(1, "failed")], 30, "v1 failed")
    reason = first.row("main", "app")["reason"]
    assert reason.startswith("FileExistsError: "), reason
    assert "\n" not in reason
    assert [line for line in events(first, "failed") if f"v1: {reason}" in line]

    second = restartable()
    settled(second, app)
    assert revisions(second, "app") == [(1, "failed")]
    assert second.row("main", "app")["reason"] == reason
    assert len(events(second, "failed")) == 1


def test_a_restart_builds_again_only_what_changed(
    restartable: Callable[[], Daemon], make_repo: Callable[..., ServiceRepo]
) -> None:
    app = make_repo("app")
    first = restartable()
    first.cli("repo", "add", str(app.origin))
    wait_for(lambda: first.answer("app"), 30, "v1 live")
    app.commit({"branchyard.yaml": "build:\n  - exit 3\n"}, "a build that fails")
    app.push()
    wait_for(lambda: revisions(first, "app") == [(2, "failed"), (1, "live")], 30, "v2 failed")

    second = restartable()
    settled(second, app)
    assert revisions(second, "app") == [(2, "failed"), (1, "live")]
    assert len(events(second, "deploy")) == 3  # v1, v2, and the probe branch's v1

    second.cli("env", "set", "app", "GREETING=again")
    wait_for(lambda: revisions(second, "app")[0] == (3, "failed"), 30, "v3, for the setting")
    assert revisions(second, "app")[1:] == [(2, "failed"), (1, "live")]


def test_a_deploy_the_daemon_stopped_is_resumed_as_the_same_revision(
    tmp_path: Path, restartable: Callable[[], Daemon], make_repo: Callable[..., ServiceRepo]
) -> None:
    app = make_repo("app", stdlib_service(**{"branchyard.yaml": "build:\n  - sleep 60\n"}))
    first = restartable()
    first.cli("repo", "add", str(app.origin))
    wait_for(lambda: revisions(first, "app") == [(1, "building")], 30, "v1 building")

    stop_cleanly(first)  # while v1 builds
    with contextlib.closing(sqlite3.connect(tmp_path / "home" / "state.db")) as store:
        after_stop = store.execute("SELECT ordinal, state, reason FROM revisions").fetchall()
    assert after_stop == [(1, "stopped", INTERRUPTED)]

    second = restartable()
    wait_for(lambda: revisions(second, "app") == [(1, "building")], 30, "v1 building again")
    assert not events(second, "failed")
