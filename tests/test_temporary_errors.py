"""Temporary errors against a real daemon: a remote that cannot be reached is a 503 and
says so, and one that refuses fetches for a while is retried, shown, and then deployed."""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable

import pytest

from tests.conftest import Daemon, ServiceRepo, git, start_daemon, stop_cleanly, wait_for
from tests.githttp import GitHttpServer
from tests.test_api import call, token_of

pytestmark = pytest.mark.integration

NOWHERE = "http://127.0.0.1:9/nothing.git"  # the discard port: nothing listens there


def repos(daemon: Daemon) -> list[dict[str, object]]:
    status, body = call(
        daemon, "GET", "/api/repos", headers={"Authorization": f"Bearer {token_of(daemon)}"}
    )
    assert status == 200
    return list(body)


def test_a_remote_that_cannot_be_reached_is_a_temporary_error_503_and_nothing_is_added(
    daemon: Daemon,
) -> None:
    status, body = call(
        daemon,
        "POST",
        "/api/repos",
        json.dumps({"url": NOWHERE}).encode(),
        {"Authorization": f"Bearer {token_of(daemon)}", "Content-Type": "application/json"},
    )
    assert (status, body["error"]) == (503, "remote_unreachable")
    assert body["message"].startswith(f"cannot reach {NOWHERE} now (temporary; try again): ")

    done = daemon.cli("repo", "add", NOWHERE, check=False)
    assert done.returncode == 1
    assert done.stderr.startswith(
        f"error: cannot reach {NOWHERE} now (temporary; try again): fatal: unable to access"
    )
    assert repos(daemon) == []


def test_a_remote_repo_that_is_not_there_stays_a_bad_request(
    daemon: Daemon, make_repo: Callable[..., ServiceRepo]
) -> None:
    app = make_repo("app")
    with GitHttpServer(app.origin.parent) as server:
        status, body = call(
            daemon,
            "POST",
            "/api/repos",
            json.dumps({"url": f"{server.url}/nothing.git"}).encode(),
            {"Authorization": f"Bearer {token_of(daemon)}", "Content-Type": "application/json"},
        )
    assert (status, body["error"]) == (400, "bad_request")
    assert "not a git repository I can read" in body["message"]


def test_fetches_refused_for_a_while_are_retried_and_shown_then_deployed_without_a_push(
    daemon: Daemon, make_repo: Callable[..., ServiceRepo]
) -> None:
    app = make_repo("app")
    sha = git("rev-parse", "HEAD", cwd=app.clone)
    with GitHttpServer(app.origin.parent) as server:
        server.refusing_fetches = True
        daemon.cli("repo", "add", f"{server.url}/app.git")  # its refs are listed

        shown = wait_for(lambda: str(repos(daemon)[0]["error"]), 30, "the fetch's error in repo ls")
        assert re.match(r"fetch failed \(will retry in \d+ s\): .*returned error: 503", shown)
        status = daemon.cli("repo", "ls").stdout
        assert "fetch failed (will retry in" in status
        assert not daemon.serves("app", "main", sha)

        wait_for(lambda: server.refused >= 2, 30, "the fetch tried again")
        server.refusing_fetches = False
        wait_for(lambda: daemon.serves("app", "main", sha), 60, "the deploy once fetches work")
        assert repos(daemon)[0]["error"] == ""


def revisions(daemon: Daemon) -> list[dict[str, object]]:
    """The revisions of main:app, newest first."""
    return list(json.loads(daemon.cli("revisions", "app", "--format", "json").stdout))


def retries(daemon: Daemon) -> list[str]:
    return [line for line in daemon.cli("events").stdout.splitlines() if "  retry " in line]


def test_a_restore_whose_mirror_is_gone_is_fetched_again_retried_while_refused_then_serves(
    daemon: Daemon, make_repo: Callable[..., ServiceRepo]
) -> None:
    app = make_repo("app")
    with GitHttpServer(app.origin.parent) as server:
        daemon.cli("repo", "add", f"{server.url}/app.git")
        first = git("rev-parse", "HEAD", cwd=app.clone)
        wait_for(lambda: daemon.serves("app", "main", first), 60, "v1 live")
        sha = app.commit({"v2.txt": "2"}, "v2")
        app.push("main")
        wait_for(lambda: daemon.serves("app", "main", sha), 60, "v2 live")
        stop_cleanly(daemon)
        shutil.rmtree(daemon.home / "mirrors")
        server.refusing_fetches = True

        again = start_daemon(daemon.home, "--poll-interval", "1")
        try:
            # No namespace is planned before the repo's heads are fetched: the events say it.
            retry = wait_for(lambda: retries(again), 30, "a retry event")
            assert re.search(
                r"main:app.*v2: build failed \(will retry in 2 s\): .*error: 503", retry[0]
            )
            wait_for(lambda: server.refused >= 3, 30, "the fetch tried again")
            server.refusing_fetches = False
            wait_for(lambda: again.serves("app", "main", sha), 60, "v2 restored once fetches work")
            assert [(r["ordinal"], r["state"]) for r in revisions(again)] == [
                (2, "live"),
                (1, "stopped"),
            ]
        finally:
            stop_cleanly(again)
