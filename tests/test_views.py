"""The read side (:class:`branchyard.views.Views`) over the engine on the fake seams.

What the API and the dashboard read: the Kubernetes objects ``k8s render`` prints
(from the real renderer), the slots and namespaces (the baseline first), the repos,
a ``ps`` row with a failed revision's output, which log ``logs`` reads, where a
rollback goes, a repo's webhook secret. Each test runs the engine of
``test_engine_fake`` for a few milliseconds.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path

import pytest
import yaml

from branchyard.engine import Engine
from branchyard.errors import NotFound
from branchyard.model import Repo, RepoHeads
from branchyard.runtime import LogName, Reviewed, RevisionSpec
from branchyard.runtime.kube.options import KubeOptions
from branchyard.runtime.kube.review import review
from branchyard.views import Views
from tests.test_engine_fake import (
    C1,
    C2,
    FAILED,
    LIVE,
    SLOT,
    URL,
    StillWatcher,
    World,
    deployed,
    push,
    rolled_back,
    run,
    settled,
    until,
)

BUGFIX = ("bugfix", "web")


def views_of(
    world: World, engine: Engine, watcher: StillWatcher | None = None, webhook_secret: str = ""
) -> Views:
    """The read side as ``daemon`` builds it, over the world's parts and the engine's, with
    the renderer ``k8s render`` uses."""
    return Views(
        engine,
        world.store,
        world.runtime,
        engine.rollouts,
        watcher or StillWatcher(),
        engine.settings_repo,
        reviewed,
        webhook_secret,
    )


async def reviewed(spec: RevisionSpec, peers: Mapping[str, str]) -> Reviewed:
    """The renderer ``k8s render`` uses, as the daemon hands it over (without a cache)."""
    return review(KubeOptions(), spec, peers)


Setup = Callable[[World, Engine], Awaitable[None]]


def reading(tmp_path: Path, setup: Setup, check: Callable[[Views], Awaitable[None]]) -> None:
    """``check`` the views over a world that ``setup`` brought about, its engine running."""

    async def scenario(world: World, engine: Engine) -> None:
        await setup(world, engine)
        await check(views_of(world, engine))

    run(tmp_path, scenario)


async def two_branches(world: World, engine: Engine) -> None:
    """web's main at C1 and its branch bugfix at C2: a slot in each namespace."""
    await engine.on_heads(RepoHeads("web", "main", {"main": C1, "bugfix": C2}))
    await until(lambda: set(engine.targets) == {SLOT, BUGFIX}, "both slots planned")


def test_the_kubernetes_objects_are_the_newest_revisions(tmp_path: Path) -> None:
    async def setup(world: World, engine: Engine) -> None:
        await deployed(world, engine, C1)
        await push(world, engine, C2)
        await settled(world, 2, LIVE)

    async def check(views: Views) -> None:
        objects = {o["kind"]: o for o in yaml.safe_load_all((await views.kubernetes(SLOT)).text)}
        deployment = objects["Deployment"]
        assert (deployment["metadata"]["namespace"], deployment["metadata"]["name"]) == (
            "main",
            "web-v2",
        )
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert (labels["branchyard.dev/revision"], labels["branchyard.dev/commit"]) == ("2", C2)
        assert objects["ConfigMap"]["data"]["BRANCHYARD_REVISION"] == C2
        with pytest.raises(NotFound, match=r"no service 'nope' in main \(services: web\)"):
            await views.kubernetes(("main", "nope"))

    reading(tmp_path, setup, check)


def test_slots_and_namespaces_put_the_baseline_first(tmp_path: Path) -> None:
    async def check(views: Views) -> None:
        assert views.slots() == [SLOT, BUGFIX]
        assert views.slots("bugfix") == [BUGFIX]
        assert views.namespaces() == [
            {"namespace": "main", "branch": "main", "services": ["web"]},
            {"namespace": "bugfix", "branch": "bugfix", "services": ["web"]},
        ]
        with pytest.raises(NotFound, match=r"no namespace 'nope' \(namespaces: bugfix, main\)"):
            views.slots("nope")

    reading(tmp_path, two_branches, check)


def test_repo_rows_count_branches_and_say_why_a_repo_cannot_be_read(tmp_path: Path) -> None:
    async def scenario(world: World, engine: Engine) -> None:
        await two_branches(world, engine)
        watcher = StillWatcher()
        watcher.errors["web"] = "cannot reach mem://web (temporary)"
        rows = views_of(world, engine, watcher).repo_rows()
        assert rows == [
            {
                "name": "web",
                "url": URL,
                "default_branch": "main",
                "branches": 2,
                "error": "cannot reach mem://web (temporary)",
            }
        ]

    run(tmp_path, scenario)


@pytest.mark.parametrize(
    ("own", "daemon", "signed_with"),
    [("mine", "global", "mine"), ("", "global", "global"), ("", "", "")],
    ids=["own", "the daemon's", "none"],
)
def test_a_repos_webhooks_are_signed_with_its_own_secret_else_the_daemons(
    tmp_path: Path, own: str, daemon: str, signed_with: str
) -> None:
    async def scenario(world: World, engine: Engine) -> None:
        views = views_of(world, engine, webhook_secret=daemon)
        assert views.webhook_secret(Repo("web", URL, "main", own)) == signed_with

    run(tmp_path, scenario)


@pytest.mark.parametrize(
    ("build", "ordinal", "log"),
    [
        (False, None, LogName("main", "web", 1)),  # the live one (pinned v1)
        (True, None, LogName("main", "web", 2, build=True)),  # the newest one's build
        (False, 2, LogName("main", "web", 2)),
        (True, 1, LogName("main", "web", 1, build=True)),
    ],
    ids=["live", "newest build", "named", "named build"],
)
def test_logs_reads_the_named_revision_else_the_live_one_else_the_newest(
    tmp_path: Path, build: bool, ordinal: int | None, log: LogName
) -> None:
    async def check(views: Views) -> None:
        assert views.log_of(SLOT, build, ordinal) == log

    reading(tmp_path, rolled_back, check)


@pytest.mark.parametrize(
    ("slot", "ordinal", "message"),
    [
        (SLOT, 9, "web in main has no revision v9"),
        (("main", "api"), None, "api in main has no revision yet"),
    ],
    ids=["no such revision", "no revision yet"],
)
def test_logs_of_a_revision_that_is_not_there_is_not_found(
    tmp_path: Path, slot: tuple[str, str], ordinal: int | None, message: str
) -> None:
    async def check(views: Views) -> None:
        with pytest.raises(NotFound, match=message):
            views.log_of(slot, False, ordinal)

    reading(tmp_path, rolled_back, check)


def test_a_rollback_with_no_revision_named_goes_to_the_one_before_the_live_one(
    tmp_path: Path,
) -> None:
    async def two_deployed(world: World, engine: Engine) -> None:
        await deployed(world, engine, C1, C2)

    async def check(views: Views) -> None:
        back_to = views.rollback_to(SLOT)
        assert back_to is not None and back_to.ordinal == 1

    reading(tmp_path, two_deployed, check)


def test_a_ps_row_of_a_failed_newest_revision_ends_with_its_output(tmp_path: Path) -> None:
    async def failed_start(world: World, engine: Engine) -> None:
        await deployed(world, engine, C1)
        world.runtime.fail_start(C2, "exited with code 1 before passing its health check")
        world.runtime.logs[LogName("main", "web", 2)] = b"Traceback\nKeyError: 'DB_URL'\n"
        await push(world, engine, C2)
        await settled(world, 2, FAILED)

    async def check(views: Views) -> None:
        row = await views.row(SLOT)
        assert row["state"] == "live (v2 failed)"
        assert row["reason"] == "exited with code 1 before passing its health check"
        assert row["last_lines"] == ["Traceback", "KeyError: 'DB_URL'"]
        assert row["logs_command"] == "branchyard logs web --revision 2"
        assert row["url"] == "http://web.main.invalid/"
        assert await views.rows() == [row]

    reading(tmp_path, failed_start, check)


def test_a_ps_row_of_a_failed_build_ends_with_the_build_output(tmp_path: Path) -> None:
    async def failed_build(world: World, engine: Engine) -> None:
        await deployed(world, engine, C1)
        world.runtime.fail_build(C2, "build step 1 failed (exit 1): make")
        world.runtime.logs[LogName("main", "web", 2, build=True)] = b"make: *** [all] Error 1\n"
        await push(world, engine, C2)
        await settled(world, 2, FAILED)

    async def check(views: Views) -> None:
        row = await views.row(SLOT)
        assert row["last_lines"] == ["make: *** [all] Error 1"]
        assert row["logs_command"] == "branchyard logs web --revision 2 --build"

    reading(tmp_path, failed_build, check)
