"""Retries of temporary errors: the backoff schedule, the retry helper with fake sleep, and
a deploy's build tried again while its repo cannot be fetched."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

import pytest

from branchyard.errors import BuildFailed, ManifestError, RemoteUnreachable
from branchyard.git import Sources
from branchyard.model import Overlay, Revision, Target
from branchyard.retry import Backoff, Retry, retry
from branchyard.rollout import Rollouts
from branchyard.router import LocalTraffic, Router, RouteTable
from branchyard.runtime import RevisionSpec
from branchyard.store import Store
from tests.conftest import ServiceRepo, git
from tests.test_store import new_revision

UNREACHABLE = "fatal: unable to access 'http://git/app.git/': The requested URL returned error: 503"


@pytest.mark.parametrize(
    ("backoff", "delays"),
    [
        (Backoff(), [2, 4, 8, 16, 32, 60, 60, 60]),
        (Backoff(first=1, factor=3, cap=10), [1, 3, 9, 10, 10, 10, 10, 10]),
        (Backoff(first=5, factor=1, cap=60), [5, 5, 5, 5, 5, 5, 5, 5]),
    ],
)
def test_backoff_doubles_up_to_its_cap(backoff: Backoff, delays: list[float]) -> None:
    assert [backoff.delay(failures) for failures in range(1, 9)] == delays


def test_a_pending_retry_says_what_failed_when_it_is_tried_again_and_why() -> None:
    pending = Retry(2, 4.0, RemoteUnreachable(UNREACHABLE))
    assert pending.note("fetch") == f"fetch failed (will retry in 4 s): {UNREACHABLE}"
    pending = Retry(1, 0.5, ConnectionResetError("reset by peer"))
    assert pending.note("build") == (
        "build failed (will retry in 0.5 s): ConnectionResetError: reset by peer"
    )


class FakeSleep:
    def __init__(self) -> None:
        self.delays: list[float] = []

    async def __call__(self, delay: float) -> None:
        self.delays.append(delay)


def failing(errors: Sequence[Exception], result: str = "done") -> Callable[[], Awaitable[str]]:
    """An attempt that raises each of ``errors`` in turn, then returns ``result``."""
    remaining = list(errors)

    async def attempt() -> str:
        if remaining:
            raise remaining.pop(0)
        return result

    return attempt


def test_temporary_errors_are_retried_with_backoff_until_the_attempt_succeeds() -> None:
    sleep, told = FakeSleep(), list[Retry]()
    errors = [RemoteUnreachable(UNREACHABLE), ConnectionRefusedError(), TimeoutError()]
    done = asyncio.run(retry(failing(errors), told.append, sleep=sleep))
    assert done == "done"
    assert sleep.delays == [2, 4, 8]
    assert [(p.failures, p.delay, type(p.error)) for p in told] == [
        (1, 2, RemoteUnreachable),
        (2, 4, ConnectionRefusedError),
        (3, 8, TimeoutError),
    ]


@pytest.mark.parametrize(
    "error", [BuildFailed("build step `make` exited 2"), ManifestError("no web"), KeyError("x")]
)
def test_a_permanent_error_is_raised_at_once_and_never_retried(error: Exception) -> None:
    sleep, told = FakeSleep(), list[Retry]()
    with pytest.raises(type(error)):
        asyncio.run(retry(failing([error]), told.append, sleep=sleep))
    assert sleep.delays == [] and told == []


def test_a_permanent_error_after_temporary_ones_ends_the_retries() -> None:
    sleep, told = FakeSleep(), list[Retry]()
    errors = [RemoteUnreachable(UNREACHABLE), BuildFailed("commit 3f2c1ab is not in the repo")]
    with pytest.raises(BuildFailed):
        asyncio.run(retry(failing(errors), told.append, sleep=sleep))
    assert sleep.delays == [2]


def test_cancelling_a_retry_while_it_waits_ends_it() -> None:
    async def scenario() -> None:
        waiting = asyncio.Event()

        async def sleep(delay: float) -> None:
            waiting.set()
            await asyncio.Event().wait()

        task = asyncio.create_task(
            retry(failing([RemoteUnreachable(UNREACHABLE)]), lambda _: None, sleep=sleep)
        )
        await waiting.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(scenario())


class FakeBuild:
    def __init__(self, spec: RevisionSpec) -> None:
        self.spec = spec


class UnreachableRuntime:
    """A runtime whose builds fail ``failures`` times with ``error``, then succeed."""

    def __init__(self, failures: int, error: Exception) -> None:
        self.failures = failures
        self.error = error
        self.builds = 0

    async def build(self, spec: RevisionSpec) -> FakeBuild:
        self.builds += 1
        if self.builds <= self.failures:
            raise self.error
        return FakeBuild(spec)


def rollouts_with(
    tmp_path: Path, runtime: UnreachableRuntime, sleep: Callable[[float], Awaitable[None]]
) -> Rollouts:
    table = RouteTable()
    return Rollouts(
        Store(tmp_path / "state.db"),
        runtime,  # type: ignore[arg-type]  # only builds
        LocalTraffic(table, Router(table)),
        Sources(tmp_path / "mirrors"),
        secrets=lambda slot: {},
        sleep=sleep,
    )


def building(rollouts: Rollouts, repo: ServiceRepo) -> Revision:
    """A new revision of the head of ``repo``, building."""
    sha = git("rev-parse", "HEAD", cwd=repo.clone)
    target = Target("main", "app", "app", str(repo.origin), "main", sha, Overlay(""), ())
    return new_revision(rollouts.store, target)


def test_a_deploy_whose_repo_cannot_be_fetched_stays_building_says_when_and_then_builds(
    tmp_path: Path, make_repo: Callable[..., ServiceRepo]
) -> None:
    runtime = UnreachableRuntime(2, RemoteUnreachable(UNREACHABLE))
    seen: list[tuple[float, str, str]] = []

    async def sleep(delay: float) -> None:
        now = rollouts.store.revision(revision.id)
        seen.append((delay, now.state.value, now.reason))

    rollouts = rollouts_with(tmp_path, runtime, sleep)
    revision = building(rollouts, make_repo("app"))
    build = asyncio.run(rollouts.build_retrying(revision))

    assert build.spec.sha == revision.sha and runtime.builds == 3
    assert seen == [
        (2, "building", f"build failed (will retry in 2 s): {UNREACHABLE}"),
        (4, "building", f"build failed (will retry in 4 s): {UNREACHABLE}"),
    ]
    retries = [e["message"] for e in rollouts.store.events() if e["kind"] == "retry"]
    assert retries == [f"v1: build failed (will retry in 2 s): {UNREACHABLE}"]


def test_a_deploy_that_fails_for_good_is_not_retried(
    tmp_path: Path, make_repo: Callable[..., ServiceRepo]
) -> None:
    sleep = FakeSleep()
    runtime = UnreachableRuntime(1, BuildFailed("build step `make` exited 2"))
    rollouts = rollouts_with(tmp_path, runtime, sleep)
    revision = building(rollouts, make_repo("app"))
    with pytest.raises(BuildFailed):
        asyncio.run(rollouts.build_retrying(revision))
    assert runtime.builds == 1 and sleep.delays == []
    assert not [e for e in rollouts.store.events() if e["kind"] == "retry"]
