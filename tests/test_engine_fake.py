"""The engine and its rollouts over the fake seams (``branchyard.runtime.fake``).

No git, no process, no socket, no sleep: the runtime and the traffic are the fakes
the package ships, time moves only when a test advances it, and the engine's other
parts are the smallest stand-ins (repos, settings and a watcher in memory; the real
store on an in-memory SQLite database, which a new engine after a crash opens again,
and the real vault in a temp directory). A test pushes by handing the engine a
repo's heads, as the watcher would, and waits for what it expects by letting the
loop run, a bounded number of turns, never by time. Each test takes milliseconds.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import NoReturn

import pytest

from branchyard.engine import BURST_SETTLE, Engine
from branchyard.errors import BuildFailed, UsageError
from branchyard.model import Overlay, Repo, RepoHeads, RevisionState
from branchyard.rollout import Rollouts
from branchyard.runtime import InstanceState, LogName
from branchyard.runtime.fake import Call, FakeInstance, FakeRuntime, FakeTime, FakeTraffic
from branchyard.settings import Change
from branchyard.status import StatusReporter
from branchyard.store import Store
from branchyard.vault import Vault

Slot = tuple[str, str]
URL = "mem://web"
SLOT = ("main", "web")
C1, C2, C3, C4 = (str(n) * 40 for n in range(1, 5))
PROCFILE = "web: python app.py --port $PORT\n"
TURNS = 1000  # loop turns a wait may take: far more than any step here needs

LIVE = RevisionState.LIVE
STOPPED = RevisionState.STOPPED
STAGED = RevisionState.STAGED
SUPERSEDED = RevisionState.SUPERSEDED
CRASHED = RevisionState.CRASHED
FAILED = RevisionState.FAILED


class MemoryRepo:
    """One repo's commits: sha -> (subject, files)."""

    def __init__(self) -> None:
        self.commits: dict[str, tuple[str, dict[str, str]]] = {}

    async def ensure(self, sha: str) -> None:
        if sha not in self.commits:
            raise BuildFailed(f"commit {sha[:7]} is not in the repo")

    async def read_file(self, sha: str, path: str) -> str | None:
        return self.commits[sha][1].get(path)

    async def subject(self, sha: str) -> str:
        return self.commits[sha][0]


class MemoryRepos:
    def __init__(self) -> None:
        self.repos: dict[str, MemoryRepo] = {}

    def __call__(self, url: str) -> MemoryRepo:
        return self.repos.setdefault(url, MemoryRepo())

    async def drop(self, url: str) -> None:
        self.repos.pop(url, None)


class StillWatcher:
    """Watches nothing: the test hands the engine each repo's heads itself."""

    def __init__(self) -> None:
        self.errors: dict[str, str] = {}

    def watch(self, repo: Repo) -> None:
        """Nothing to watch."""

    def unwatch(self, name: str) -> None:
        """Nothing watched."""

    def poke(self, name: str) -> None:
        """Nothing to look at."""

    async def first_look(self) -> None:
        """Nothing to look at first."""

    async def close(self) -> None:
        """Nothing to close."""


class MemorySettings:
    """Settings that are never written to disk; every write is a new version."""

    def __init__(self) -> None:
        self.lock = asyncio.Lock()
        self.set_aside = ""
        self.versions = 0

    async def open(self) -> dict[Slot, Overlay]:
        return {}

    async def write(
        self,
        slot: Slot,
        env: Mapping[str, str],
        author: str,
        message: str,
        secrets: Mapping[str, str] | None = None,
    ) -> Overlay:
        self.versions += 1
        return Overlay(f"s{self.versions}", dict(env), dict(secrets or {}))

    async def history(self, slot: Slot) -> list[Change]:
        return []


@dataclass
class World:
    """What outlives one engine: the machine (the fake runtime), the traffic, the repos,
    the store and time."""

    home: Path
    time: FakeTime = field(default_factory=FakeTime)
    journal: list[Call] = field(default_factory=list)
    repos: MemoryRepos = field(default_factory=MemoryRepos)

    def __post_init__(self) -> None:
        self.runtime = FakeRuntime(self.time.clock, self.journal)
        self.traffic = FakeTraffic(self.journal)
        self.store = Store(Path(":memory:"), clock=self.time.now)  # a file: 20-35 ms more
        self.store.add_repo(Repo("web", URL, "main"))
        for number, sha in enumerate((C1, C2, C3, C4), 1):
            self.repos(URL).commits[sha] = (f"change {number}", {"Procfile": PROCFILE})

    async def engine(self) -> Engine:
        """A new engine over this world, started (as a daemon that starts)."""
        vault = Vault(self.home / "secrets.json")
        rollouts = Rollouts(
            self.store,
            self.runtime,
            self.traffic,
            self.repos,
            vault.values,
            sleep=self.time.sleep,
        )
        engine = Engine(
            self.store,
            self.runtime,
            self.traffic,
            rollouts,
            StillWatcher(),
            self.repos,
            MemorySettings(),
            vault,
            StatusReporter(None, no_forge),
            self.time.clock,
        )
        await engine.start()
        return engine

    def states(self) -> dict[int, RevisionState]:
        """ordinal -> state of the revisions of web in main."""
        return {r.ordinal: r.state for r in self.store.revisions(SLOT)}

    def calls(self, action: str) -> list[str]:
        return [c.what for c in self.journal if c.action == action]

    def instance(self, name: str) -> FakeInstance:
        return next(i for i in self.runtime.instances if i.name == name)


def no_forge(method: str, url: str, headers: Mapping[str, str], body: bytes) -> int:
    """Statuses are off (no forge configured): nothing is ever sent."""
    raise OSError("no forge in these tests")


def run(tmp_path: Path, scenario: Callable[[World, Engine], Awaitable[None]]) -> World:
    """Run ``scenario`` with a world and a started engine; close the engine after."""

    async def main() -> World:
        world = World(tmp_path)
        engine = await world.engine()
        try:
            await scenario(world, engine)
        finally:
            await engine.close()
        return world

    return asyncio.run(main())


async def until(check: Callable[[], bool], what: str) -> None:
    """Let the loop run until ``check()`` holds (at most :data:`TURNS` turns)."""
    for _ in range(TURNS):
        if check():
            return
        await asyncio.sleep(0)
    raise AssertionError(f"never happened: {what}")


async def push(world: World, engine: Engine, sha: str) -> None:
    """A push of ``sha`` to main, as the watcher reports it; return once it is planned."""
    await engine.on_heads(RepoHeads("web", "main", {"main": sha}))
    await until(lambda: engine.targets.get(SLOT, None) is not None, "a target")
    await until(lambda: engine.targets[SLOT].sha == sha, f"{sha[:7]} planned")


async def live(world: World, ordinal: int) -> None:
    await until(lambda: world.states().get(ordinal) is LIVE, f"v{ordinal} live")


async def settled(world: World, ordinal: int, state: RevisionState) -> None:
    await until(lambda: world.states().get(ordinal) is state, f"v{ordinal} {state}")


async def deployed(world: World, engine: Engine, *shas: str) -> None:
    """Push each of ``shas`` in turn; wait until it serves alone (the one it replaced
    drained and stopped)."""
    for sha in shas:
        await push(world, engine, sha)
        await until(partial(serves_alone, world, sha), f"{sha[:7]} alone live")


def serves_alone(world: World, sha: str) -> bool:
    active = [(r.sha, r.state) for r in world.store.revisions(SLOT) if r.state.active]
    return active == [(sha, LIVE)]


async def rolled_back(world: World, engine: Engine) -> None:
    """v1 (C1) and v2 (C2) deployed, then rolled back to v1: pinned there."""
    await deployed(world, engine, C1, C2)
    await engine.rollback("main", "web", None)


async def staged(world: World, engine: Engine) -> None:
    """Rolled back to v1, then C3 pushed: v3 built and staged."""
    await rolled_back(world, engine)
    await push(world, engine, C3)
    await settled(world, 3, STAGED)


# superseding


def test_three_pushes_within_the_burst_settle_start_only_the_newest(tmp_path: Path) -> None:
    async def scenario(world: World, engine: Engine) -> None:
        await deployed(world, engine, C1)
        building = world.runtime.hold("build", C2)
        await push(world, engine, C2)
        await building.reached()
        await push(world, engine, C3)  # cancels the build of C2, then waits to settle
        await world.time.asleep()
        await push(world, engine, C4)  # within the settle: C3 is never built
        await world.time.asleep()
        world.time.advance(BURST_SETTLE)
        await live(world, 3)
        await settled(world, 1, STOPPED)

    world = run(tmp_path, scenario)
    revisions = {r.ordinal: (r.sha, r.state) for r in world.store.revisions(SLOT)}
    assert revisions == {1: (C1, STOPPED), 2: (C2, SUPERSEDED), 3: (C4, STOPPED)}
    assert world.calls("build") == ["web.main.v1", "web.main.v2", "web.main.v3"]
    assert world.calls("start") == ["web.main.v1:1", "web.main.v3:1"]
    assert world.runtime.running() == []  # the engine closed: everything stopped


def test_a_start_cancelled_twice_in_a_burst_still_stops_its_instance(tmp_path: Path) -> None:
    """The superseded-deploy leak: C1's start is cancelled by C2's deploy, which is
    itself cancelled by C3's while C1 is still stopping what it started."""
    leftover: list[FakeInstance] = []

    async def scenario(world: World, engine: Engine) -> None:
        starting = world.runtime.hold("start", C1)
        stopping = world.runtime.hold("stop", C1)
        await push(world, engine, C1)
        await starting.reached()
        await push(world, engine, C2)  # cancels C1's start, which stops its instance
        await stopping.reached()
        await push(world, engine, C3)  # cancels C2's deploy, which waits for C1's
        stopping.release()
        await world.time.asleep()
        world.time.advance(BURST_SETTLE)
        await live(world, 2)
        leftover.extend(world.runtime.running())

    world = run(tmp_path, scenario)
    assert world.states() == {1: SUPERSEDED, 2: STOPPED}
    assert [i.name for i in leftover] == ["web.main.v2:1"]
    assert world.calls("start") == ["web.main.v1:1", "web.main.v2:1"]
    assert world.calls("stop") == ["web.main.v1:1", "web.main.v2:1"]
    assert [i.state for i in world.runtime.instances] == [InstanceState.EXITED] * 2


def test_closing_waits_for_a_superseded_deploy_still_stopping_what_it_started(
    tmp_path: Path,
) -> None:
    """The deploy that superseded C1's is cancelled by the close and ends at once; the
    close still waits for C1's, which is stopping its instance and then records it."""

    async def scenario(world: World, engine: Engine) -> None:
        starting = world.runtime.hold("start", C1)
        stopping = world.runtime.hold("stop", C1)
        await push(world, engine, C1)
        await starting.reached()
        await push(world, engine, C2)  # cancels C1's start, which stops its instance
        await stopping.reached()
        closing = asyncio.create_task(engine.close())
        await until(lambda: not engine._deploys, "C2's deploy cancelled")
        for _ in range(TURNS):
            await asyncio.sleep(0)
        assert not closing.done()  # C1's deploy has not ended yet
        stopping.release()
        await closing
        assert world.states() == {1: STOPPED}  # interrupted: C2 had not begun
        assert world.runtime.running() == []

    world = World(tmp_path)

    async def main() -> None:
        await scenario(world, await world.engine())

    asyncio.run(main())


# failures


@pytest.mark.parametrize(
    ("fail", "reason", "starts"),
    [
        (FakeRuntime.fail_build, "build step `make` exited 2", ["web.main.v1:1"]),
        (
            FakeRuntime.fail_start,
            "exited with code 1 before passing its health check",
            ["web.main.v1:1", "web.main.v2:1"],
        ),
    ],
    ids=["build", "start"],
)
def test_a_revision_that_fails_leaves_the_live_one_serving(
    tmp_path: Path, fail: Callable[[FakeRuntime, str, str], None], reason: str, starts: list[str]
) -> None:
    async def scenario(world: World, engine: Engine) -> None:
        await deployed(world, engine, C1)
        fail(world.runtime, C2, reason)
        await push(world, engine, C2)
        await settled(world, 2, FAILED)
        assert world.store.revisions(SLOT)[0].reason == reason
        assert world.traffic.serving(*SLOT) == {"web.main.v1:1": 100}
        assert [i.name for i in world.runtime.running()] == ["web.main.v1:1"]

    world = run(tmp_path, scenario)
    assert world.calls("start") == starts


def test_a_deploy_ended_by_a_bug_is_logged_with_its_reason(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async def scenario(world: World, engine: Engine) -> None:
        def broken(*args: object, **kwargs: object) -> NoReturn:
            raise RuntimeError("the store broke")

        world.store.apply = broken  # type: ignore[method-assign]
        await push(world, engine, C1)
        await until(lambda: "the store broke" in caplog.text, "the bug logged")

    run(tmp_path, scenario)
    assert "deploy of main:web failed: RuntimeError: the store broke" in caplog.text
    assert "never retrieved" not in caplog.text


@pytest.mark.parametrize("part", ["set_namespaces", "apply"], ids=["plan", "deploy"])
def test_a_push_whose_plan_or_deploy_a_store_fault_ended_deploys_after_a_backoff(
    tmp_path: Path, part: str
) -> None:
    """The disk was full as the push came: planning it (``set_namespaces``) or recording
    its revision (``apply``) failed once, and nothing else will come to try again."""

    async def scenario(world: World, engine: Engine) -> None:
        real = getattr(world.store, part)
        faults: list[str] = []

        def full(*args: object, **kwargs: object) -> object:
            if not faults:
                faults.append(part)
                raise sqlite3.OperationalError("database or disk is full")
            return real(*args, **kwargs)

        setattr(world.store, part, full)
        await engine.on_heads(RepoHeads("web", "main", {"main": C1}))
        await until(lambda: bool(faults), "the fault met")
        await world.time.asleep()
        assert world.time.sleeping == [2.0]  # the first backoff
        assert world.states() == {}
        world.time.advance(2.0)
        await live(world, 1)

    world = run(tmp_path, scenario)
    assert world.calls("start") == ["web.main.v1:1"]


def test_a_crash_takes_the_revision_out_of_traffic_until_it_restarts(tmp_path: Path) -> None:
    async def scenario(world: World, engine: Engine) -> None:
        await deployed(world, engine, C1)
        instance = world.instance("web.main.v1:1")
        instance.crash(exit_code=3)
        assert world.states() == {1: LIVE}
        assert world.calls("down")[-1] == "main/web: v1 exited with code 3; restarting"
        assert world.journal[-1] == Call("route", "main/web web.main.v1:1=100")
        events = [e["message"] for e in world.store.events() if e["kind"] == "restarting"]
        assert events == ["v1 exited with code 3; restarting"]

    run(tmp_path, scenario)


# pin, stage, rollback, promote, unpin


def test_a_rollback_goes_to_the_previous_revision_and_pins_it(tmp_path: Path) -> None:
    async def scenario(world: World, engine: Engine) -> None:
        await deployed(world, engine, C1, C2)
        before = len(world.journal)
        back = await engine.rollback("main", "web", None)
        assert back.ordinal == 1 and world.store.pin(SLOT) == 1
        await settled(world, 2, STOPPED)
        # v1's build was kept: started again, not built; routed before v2 stops
        assert world.journal[before:] == [
            Call("start", "web.main.v1:2"),
            Call("route", "main/web web.main.v1:2=100"),
            Call("drain", "web.main.v2:1"),
            Call("stop", "web.main.v2:1"),
        ]
        assert world.states() == {1: LIVE, 2: STOPPED}

    run(tmp_path, scenario)


def test_a_rollback_while_the_replaced_revision_still_drains_goes_back_to_it(
    tmp_path: Path,
) -> None:
    async def scenario(world: World, engine: Engine) -> None:
        await deployed(world, engine, C1)
        stopping = world.runtime.hold("stop", C1)  # v1 drains, and its stop waits
        await push(world, engine, C2)
        await stopping.reached()
        assert world.states() == {1: LIVE, 2: LIVE}  # v1 is stopped only once it is gone
        try:
            back = await engine.rollback("main", "web", None)
        finally:
            stopping.release()
        assert back.ordinal == 1 and world.store.pin(SLOT) == 1
        await settled(world, 2, STOPPED)
        await until(lambda: world.instance("web.main.v1:1").state is InstanceState.EXITED, "v1:1")
        # the old v1 instance ended after the rollback: v1 serves on, as a new instance
        assert world.states() == {1: LIVE, 2: STOPPED}
        assert world.traffic.serving(*SLOT) == {"web.main.v1:2": 100}

    run(tmp_path, scenario)


def test_a_rollback_after_the_live_revision_crashed_goes_to_the_one_before(
    tmp_path: Path,
) -> None:
    async def scenario(world: World, engine: Engine) -> None:
        await deployed(world, engine, C1, C2)
        world.instance("web.main.v2:1").give_up(exit_code=1, last_output=["Traceback"])
        await settled(world, 2, CRASHED)
        assert world.traffic.downs[SLOT].startswith("v2 crashed (exited with code 1")
        back = await engine.rollback("main", "web", None)
        assert back.ordinal == 1
        assert world.traffic.serving(*SLOT) == {"web.main.v1:2": 100}
        assert world.states() == {1: LIVE, 2: CRASHED}

    run(tmp_path, scenario)


def test_a_pinned_slot_builds_new_commits_as_staged_without_traffic(tmp_path: Path) -> None:
    async def scenario(world: World, engine: Engine) -> None:
        await staged(world, engine)
        assert world.store.revisions(SLOT)[0].reason == ("pinned to v1: promote or unpin to use it")
        assert world.traffic.serving(*SLOT) == {"web.main.v1:2": 100}
        assert "web.main.v3" in world.calls("build")
        assert [s for s in world.calls("start") if s.startswith("web.main.v3")] == []

    run(tmp_path, scenario)


def test_promoting_a_staged_revision_starts_its_kept_build_and_pins_it(tmp_path: Path) -> None:
    async def scenario(world: World, engine: Engine) -> None:
        await staged(world, engine)
        promoted = await engine.promote("main", "web", 3)
        assert promoted.ordinal == 3 and world.store.pin(SLOT) == 3
        assert world.traffic.serving(*SLOT) == {"web.main.v3:1": 100}
        await settled(world, 1, STOPPED)

    world = run(tmp_path, scenario)
    assert world.calls("build").count("web.main.v3") == 1


def test_unpinning_sends_traffic_back_to_the_built_branch_head(tmp_path: Path) -> None:
    async def scenario(world: World, engine: Engine) -> None:
        await rolled_back(world, engine)
        revision, building = await engine.unpin("main", "web")
        assert revision is not None and revision.ordinal == 2 and not building
        assert world.store.pin(SLOT) is None
        assert world.traffic.serving(*SLOT) == {"web.main.v2:2": 100}
        await settled(world, 1, STOPPED)

    run(tmp_path, scenario)


def test_unpinning_while_the_head_builds_sends_traffic_to_it_once_built(tmp_path: Path) -> None:
    async def scenario(world: World, engine: Engine) -> None:
        await rolled_back(world, engine)
        building = world.runtime.hold("build", C3)
        await push(world, engine, C3)
        await building.reached()
        assert await engine.unpin("main", "web") == (None, True)
        assert world.traffic.serving(*SLOT) == {"web.main.v1:2": 100}
        building.release()
        await live(world, 3)
        assert world.traffic.serving(*SLOT) == {"web.main.v3:1": 100}

    run(tmp_path, scenario)


# weights and restarts


def test_weights_split_traffic_between_revisions_and_pin_the_heaviest(tmp_path: Path) -> None:
    async def scenario(world: World, engine: Engine) -> None:
        await deployed(world, engine, C1, C2)
        await engine.weight("main", "web", {1: 90, 2: 10})
        assert world.traffic.serving(*SLOT) == {"web.main.v1:2": 90, "web.main.v2:1": 10}
        assert world.store.pin(SLOT) == 1
        assert world.states() == {1: LIVE, 2: LIVE}
        await engine.weight("main", "web", {2: 100, 1: 0})
        assert world.traffic.serving(*SLOT) == {"web.main.v1:2": 0, "web.main.v2:1": 100}
        assert world.store.pin(SLOT) == 2

    run(tmp_path, scenario)


def test_weights_the_traffic_layer_cannot_split_start_and_pin_nothing(tmp_path: Path) -> None:
    async def scenario(world: World, engine: Engine) -> None:
        await deployed(world, engine, C1, C2)
        world.traffic.split_refusal = "weights need the Gateway API"
        before = list(world.journal)
        with pytest.raises(UsageError, match=r"^weights need the Gateway API$"):
            await engine.weight("main", "web", {1: 90, 2: 10})
        assert world.journal == before  # nothing built, started or routed
        assert world.store.pin(SLOT) is None
        assert world.states() == {1: STOPPED, 2: LIVE}
        assert world.traffic.serving(*SLOT) == {"web.main.v2:1": 100}
        assert [e for e in world.store.events() if e["kind"] == "weight"] == []

    run(tmp_path, scenario)


def test_a_revision_spec_says_which_of_its_env_are_secrets(tmp_path: Path) -> None:
    async def scenario(world: World, engine: Engine) -> None:
        await deployed(world, engine, C1)
        await engine.set_secrets("main", "web", {"API_TOKEN": "t0ken"}, "tess")
        await live(world, 2)
        first, second = (i.spec for i in world.runtime.instances)
        assert (first.secret_keys, second.secret_keys) == (frozenset(), frozenset({"API_TOKEN"}))
        assert second.env["API_TOKEN"] == "t0ken"

    run(tmp_path, scenario)


def test_a_restart_routes_the_new_instance_before_the_old_one_stops(tmp_path: Path) -> None:
    async def scenario(world: World, engine: Engine) -> None:
        await deployed(world, engine, C1)
        before = len(world.journal)
        await engine.restart("main", "web")
        await until(lambda: len(world.runtime.running()) == 1, "the old instance stopped")
        assert world.journal[before:] == [
            Call("start", "web.main.v1:2"),
            Call("route", "main/web web.main.v1:2=100"),
            Call("drain", "web.main.v1:1"),
            Call("stop", "web.main.v1:1"),
        ]
        assert world.states() == {1: LIVE}

    run(tmp_path, scenario)


# recovery


def test_a_new_engine_after_a_crash_stops_leftovers_and_brings_back_what_served(
    tmp_path: Path,
) -> None:
    async def main() -> World:
        world = World(tmp_path)
        first = await world.engine()
        await deployed(world, first, C1, C2)
        await settled(world, 1, STOPPED)
        world.runtime.logs[LogName("main", "web", 2)] = b"serving\n"
        world.runtime.killed()  # the engine never closes; its instance stays running
        second = await world.engine()
        assert world.calls("recover")[-1] == "web.main.v2:1"
        assert world.traffic.serving(*SLOT) == {"web.main.v2:2": 100}
        assert world.states() == {1: STOPPED, 2: LIVE}
        assert [i.name for i in world.runtime.running()] == ["web.main.v2:2"]
        await second.close()
        return world

    world = asyncio.run(main())
    assert world.calls("stop") == ["web.main.v1:1", "web.main.v2:1", "web.main.v2:2"]


# the fake's logs


def test_the_fake_runtime_serves_the_logs_a_test_wrote() -> None:
    log = LogName("main", "web", 1)
    runtime = FakeRuntime()
    runtime.logs[log] = b"one\n\ntwo\nthree\n"
    pauses = [b"four\n"]

    async def pause() -> bool:
        if not pauses:
            return False
        runtime.logs[log] += pauses.pop()
        return True

    async def scenario() -> None:
        assert await runtime.has_log(log)
        assert not await runtime.has_log(LogName("main", "web", 1, build=True))
        assert await runtime.tail_log(log, 6) == b"three\n"
        assert await runtime.last_lines(log, 2) == ["two", "three"]
        assert [chunk async for chunk in runtime.read_log(log, 0)] == [b""]
        assert [chunk async for chunk in runtime.read_log(log, 2)] == [b"two\nthree\n"]
        followed = [chunk async for chunk in runtime.read_log(log, 1, pause)]
        assert followed == [b"three\n", b"four\n"]

    asyncio.run(scenario())
