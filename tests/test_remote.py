"""Remote repos are polled with a cheap ref listing and fetched only when a head moved."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from tests.conftest import Daemon, ServiceRepo, wait_for
from tests.githttp import GitHttpServer

pytestmark = pytest.mark.integration


def test_a_repo_served_over_http_is_polled_cheaply_and_deployed(
    daemon: Daemon, make_repo: Callable[..., ServiceRepo]
) -> None:
    app = make_repo("app")
    with GitHttpServer(app.origin.parent) as server:
        done = daemon.cli("repo", "add", f"{server.url}/app.git")
        assert "added app" in done.stdout
        first = wait_for(lambda: daemon.answer("app")["env"]["BRANCHYARD_REVISION"], 60)
        fetches = server.fetches()
        listings = len(server.requests) - fetches
        wait_for(
            lambda: len(server.requests) - server.fetches() >= listings + 3,
            30,
            "the repo polled again (ref listings)",
        )
        assert server.fetches() == fetches, "an unchanged repo was fetched again"

        sha = app.commit({"x.txt": "1"}, "second")
        app.push()
        wait_for(lambda: daemon.serves("app", "main", sha), 30, "the new commit over http")
        assert sha != first
        assert server.fetches() > fetches
