"""Fakes of the two seams, for tests of the engine: no git, no process, no socket.

As httpx ships ``MockTransport``, branchyard ships a :class:`FakeRuntime` and a
:class:`FakeTraffic` that anyone can hand to the engine and its rollouts in place of
``runtime.local`` and the router, with a :class:`FakeTime` whose sleeps wait until the
test moves time on. What the engine asked of them is recorded as :class:`Call` rows,
in order, in one list that both may share (``journal``)::

    time = FakeTime()
    journal: list[Call] = []
    runtime = FakeRuntime(time.clock, journal)
    traffic = FakeTraffic(journal)
    ...  # an Engine and its Rollouts over them (tests/test_engine_fake.py)
    gate = runtime.hold("start", sha)  # the next start of this commit blocks
    ...  # a push of sha
    await gate.reached()  # the engine is starting it
    gate.release()
    ...
    assert journal[-2:] == [
        Call("start", "web.main.v1:1"),
        Call("route", "main/web web.main.v1:1=100"),
    ]

An instance's address is its revision's name and the how-manieth instance of that
build it is (``("web.main.v1", 2)`` after a restart), written ``web.main.v1:2`` in
the calls, so what the traffic records reads without a table of ports.

A test scripts outcomes by commit: a build that fails with a reason
(:meth:`FakeRuntime.fail_build`), a start that fails (:meth:`FakeRuntime.fail_start`),
a build, start or stop that blocks until released (:meth:`FakeRuntime.hold`), and an
instance that crashes and is restarted (:meth:`FakeInstance.crash`) or whose
supervisor gives up (:meth:`FakeInstance.give_up`). Builds are kept (a rollback starts
one without building) until pruned or discarded, and the runtime outlives an engine:
one made over the same store finds what the last one left running
(:meth:`FakeRuntime.recover`).

A cancelled start stops its instance the plain way, ``await instance.stop()``, which a
second cancel would cut short: the fake holds the engine to its side of the seam (a
start is cancelled once, then waited for).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Collection, Sequence
from dataclasses import dataclass
from typing import Literal, NamedTuple

from branchyard.errors import BuildFailed
from branchyard.model import Clock
from branchyard.runtime import (
    LAST_LINES,
    Address,
    Build,
    InstanceState,
    LogName,
    OnChange,
    Pause,
    RevisionSpec,
)

Slot = tuple[str, str]
Step = Literal["build", "start", "stop"]
_ENDED = (InstanceState.EXITED, InstanceState.FAILED)


class Call(NamedTuple):
    """One thing a fake was asked: ``build``, ``start``, ``stop`` or ``recover`` of the
    runtime (what: a revision's name, an instance's address); ``route``, ``down``,
    ``remove`` or ``drain`` of the traffic (what: ``namespace/service`` and the weights
    or the reason, an address)."""

    action: str
    what: str


class FakeTime:
    """A clock that moves only when told: :meth:`sleep` waits until :meth:`advance` has
    moved :meth:`now` past its end (a sleep of 0 or less only lets others run)."""

    def __init__(self, start: float = 0.0) -> None:
        self._now = start
        self._sleepers: list[tuple[float, asyncio.Future[None]]] = []
        self._slept = asyncio.Event()

    @property
    def clock(self) -> Clock:
        """This time as the engine takes it."""
        return Clock(self.now, self.sleep)

    def now(self) -> float:
        return self._now

    async def sleep(self, seconds: float) -> None:
        if seconds <= 0:
            await asyncio.sleep(0)
            return
        woken = asyncio.get_running_loop().create_future()
        self._sleepers.append((self._now + seconds, woken))
        self._slept.set()
        try:
            await woken
        finally:
            self._sleepers = [(end, f) for end, f in self._sleepers if f is not woken]

    @property
    def sleeping(self) -> list[float]:
        """How long each pending sleep has left, soonest first."""
        return sorted(end - self._now for end, future in self._sleepers if not future.done())

    async def asleep(self, count: int = 1) -> None:
        """Return once at least ``count`` sleeps are pending."""
        while len(self.sleeping) < count:
            self._slept.clear()
            await self._slept.wait()

    def advance(self, seconds: float) -> None:
        """Move time on, waking every sleep that ends by then."""
        self._now += seconds
        for end, future in self._sleepers:
            if end <= self._now and not future.done():
                future.set_result(None)


class Gate:
    """Where one scripted build, start or stop waits until the test releases it."""

    def __init__(self) -> None:
        self._reached = asyncio.Event()
        self._released = asyncio.Event()

    async def reached(self) -> None:
        """Return once the step got here (and waits)."""
        await self._reached.wait()

    def release(self) -> None:
        self._released.set()

    async def _pass(self) -> None:
        self._reached.set()
        await self._released.wait()


@dataclass(frozen=True)
class FakeBuild:
    spec: RevisionSpec


class FakeInstance:
    """A started build. It is RUNNING once its start returned, until it is stopped
    (EXITED), crashes (BACKOFF, then STARTING and RUNNING again as its supervisor
    restarts it) or is given up on (FAILED); each change is told to the engine."""

    def __init__(self, runtime: FakeRuntime, spec: RevisionSpec, number: int) -> None:
        self.spec = spec
        self.address: Address = (spec.name, number)
        self.state = InstanceState.STARTING
        self.exit_code: int | None = None
        self.restarts = 0
        self.last_output: Sequence[str] = ()
        self._runtime = runtime
        self._on_change: OnChange | None = None  # set once its start returned
        self._exited = asyncio.Event()

    @property
    def name(self) -> str:
        """Its address as the calls write it: ``web.main.v1:1``."""
        return f"{self.address[0]}:{self.address[1]}"

    def __repr__(self) -> str:
        return f"<FakeInstance {self.name} {self.state}>"

    async def stop(self, grace: float) -> None:
        """Stop it (a scripted hold of ``stop`` waits first); EXITED at the end."""
        if self.state in _ENDED:
            return
        if self.state is InstanceState.STOPPING:
            await self._exited.wait()
            return
        self._runtime.calls.append(Call("stop", self.name))
        self._move(InstanceState.STOPPING)
        await self._runtime._step("stop", self.spec.sha)
        self._move(InstanceState.EXITED)
        self._exited.set()

    def crash(self, exit_code: int = 1) -> None:
        """It exits, and its supervisor starts it again: BACKOFF, STARTING, RUNNING."""
        self.exit_code = exit_code
        self._move(InstanceState.BACKOFF)
        self.restarts += 1
        self._move(InstanceState.STARTING)
        self._move(InstanceState.RUNNING)

    def give_up(self, exit_code: int = 1, last_output: Sequence[str] = ()) -> None:
        """It exits once too often: BACKOFF, then FAILED, having written ``last_output``."""
        self.exit_code = exit_code
        self._move(InstanceState.BACKOFF)
        self.last_output = tuple(last_output)
        self._move(InstanceState.FAILED)

    def _move(self, state: InstanceState) -> None:
        self.state = state
        if self._on_change is not None:
            self._on_change(self)


class FakeRuntime:
    """A :class:`~branchyard.runtime.Runtime` in memory. ``calls`` holds what it was
    asked, in order; ``instances`` every instance it started; ``kept`` the builds it
    keeps, as (namespace, service, ordinal); ``logs`` what a test wrote for each log."""

    def __init__(self, clock: Clock | None = None, journal: list[Call] | None = None) -> None:
        self.clock = clock or FakeTime().clock
        self.calls: list[Call] = [] if journal is None else journal
        self.instances: list[FakeInstance] = []
        self.kept: set[tuple[str, str, int]] = set()
        self.logs: dict[LogName, bytes] = {}
        self.peers: set[Slot] = set()  # the (namespace, peer) pairs last wanted
        self._build_failures: dict[str, str] = {}
        self._start_failures: dict[str, str] = {}
        self._holds: dict[tuple[Step, str], Gate] = {}

    # scripting

    def fail_build(self, sha: str, reason: str) -> None:
        """Every build of commit ``sha`` fails, saying ``reason``."""
        self._build_failures[sha] = reason

    def fail_start(self, sha: str, reason: str) -> None:
        """Every start of commit ``sha`` fails, saying ``reason``; its instance is FAILED."""
        self._start_failures[sha] = reason

    def hold(self, step: Step, sha: str) -> Gate:
        """The next ``step`` of commit ``sha`` waits at the gate returned."""
        gate = self._holds[(step, sha)] = Gate()
        return gate

    def killed(self) -> None:
        """The daemon using this runtime was killed: what it started keeps running, and
        tells no one of its changes; the next engine's :meth:`recover` finds it."""
        for instance in self.instances:
            instance._on_change = None

    def running(self) -> list[FakeInstance]:
        """The instances not stopped, exited or given up on."""
        return [i for i in self.instances if i.state not in _ENDED]

    async def _step(self, step: Step, sha: str) -> None:
        gate = self._holds.pop((step, sha), None)
        if gate is not None:
            await gate._pass()
        else:
            await self.clock.sleep(0)

    # the Runtime protocol

    async def build(self, spec: RevisionSpec) -> FakeBuild:
        self.calls.append(Call("build", spec.name))
        await self._step("build", spec.sha)
        reason = self._build_failures.get(spec.sha)
        if reason is not None:
            raise BuildFailed(reason)
        self.kept.add((spec.namespace, spec.service, spec.ordinal))
        return FakeBuild(spec)

    async def start(self, build: Build, on_change: OnChange) -> FakeInstance:
        spec = build.spec
        number = 1 + sum(i.spec.name == spec.name for i in self.instances)
        instance = FakeInstance(self, spec, number)
        self.instances.append(instance)
        self.calls.append(Call("start", instance.name))
        try:
            await self._step("start", spec.sha)
        except asyncio.CancelledError:
            await instance.stop(1.0)
            raise
        reason = self._start_failures.get(spec.sha)
        if reason is not None:
            instance.state = InstanceState.FAILED
            raise BuildFailed(reason)
        instance.state = InstanceState.RUNNING
        instance._on_change = on_change
        return instance

    def release(self, build: Build) -> None:
        """Nothing to let go of: a fake build holds nothing."""

    async def prune(self, namespace: str, service: str, keep: Collection[int]) -> int:
        dropped = {k for k in self.kept if k[:2] == (namespace, service) and k[2] not in keep}
        self.kept -= dropped
        return len(dropped)  # a byte each

    async def discard(self, namespace: str, service: str) -> None:
        self.kept = {k for k in self.kept if k[:2] != (namespace, service)}
        self.logs = {
            log: text
            for log, text in self.logs.items()
            if (log.namespace, log.service) != (namespace, service)
        }

    async def gc(self) -> dict[str, int]:
        return {}

    async def recover(self) -> int:
        """Stop what is still running (a daemon that ended left it): how many."""
        left = self.running()
        self.calls.append(Call("recover", " ".join(i.name for i in left)))
        for instance in left:
            await instance.stop(0.0)
        return len(left)

    async def peer_url(self, namespace: str, peer: str) -> str:
        return f"http://{peer}.{namespace}.peer.invalid"

    async def sync_peers(self, wanted: Collection[tuple[str, str]]) -> None:
        self.peers = set(wanted)

    def public_url(self, namespace: str, service: str) -> str:
        return f"http://{service}.{namespace}.invalid/"

    def home_url(self) -> str:
        return "http://branchyard.invalid/"

    async def has_log(self, log: LogName) -> bool:
        return log in self.logs

    async def missing_log(self, log: LogName) -> str | None:
        return None

    async def tail_log(self, log: LogName, size: int) -> bytes:
        return self.logs.get(log, b"")[-size:] if size > 0 else b""

    async def last_lines(self, log: LogName, count: int = LAST_LINES) -> list[str]:
        lines = self.logs.get(log, b"").decode(errors="replace").splitlines()
        return [line for line in lines if line.strip()][-count:]

    async def read_log(
        self, log: LogName, lines: int | None = None, pause: Pause | None = None
    ) -> AsyncIterator[bytes]:
        text = self.logs.get(log, b"")
        chunks = text.splitlines(keepends=True)
        yield text if lines is None else b"".join(chunks[max(len(chunks) - lines, 0) :])
        while pause is not None and await pause():
            now = self.logs.get(log, b"")
            if len(now) > len(text):
                yield now[len(text) :]
            text = now

    def detach(self) -> None:
        return None

    async def close(self) -> None:
        """Nothing to close."""


class FakeTraffic:
    """A :class:`~branchyard.runtime.Traffic` in memory: ``routes`` holds each service's
    instances and weights, ``downs`` why a service is down, and ``calls`` what it was
    told, in order (the journal it shares with a :class:`FakeRuntime`, if given)."""

    def __init__(self, journal: list[Call] | None = None) -> None:
        self.calls: list[Call] = [] if journal is None else journal
        self.routes: dict[Slot, tuple[tuple[Address, int], ...]] = {}
        self.downs: dict[Slot, str] = {}
        self.split_refusal = ""
        """Why it cannot split by weight, where a test says so (as a cluster without
        the Gateway API); by default it can."""

    def serving(self, namespace: str, service: str) -> dict[str, int]:
        """Address (as the calls write it) -> weight of what serves a service."""
        return {_text(a): w for a, w in self.routes.get((namespace, service), ())}

    def route(self, namespace: str, service: str, weights: Sequence[tuple[Address, int]]) -> None:
        self.routes[(namespace, service)] = tuple(weights)
        self.downs.pop((namespace, service), None)
        shares = " ".join(f"{_text(a)}={w}" for a, w in weights)
        self.calls.append(Call("route", f"{namespace}/{service} {shares}"))

    def down(self, namespace: str, service: str, why: str = "") -> None:
        self.routes.pop((namespace, service), None)
        self.downs[(namespace, service)] = why
        self.calls.append(Call("down", f"{namespace}/{service}" + (f": {why}" if why else "")))

    def remove(self, namespace: str, service: str) -> None:
        self.routes.pop((namespace, service), None)
        self.downs.pop((namespace, service), None)
        self.calls.append(Call("remove", f"{namespace}/{service}"))

    def cannot_split(self) -> str:
        return self.split_refusal

    async def drain(self, backend: Address, grace: float) -> None:
        """No request is ever in flight here: recorded, and over at once."""
        self.calls.append(Call("drain", _text(backend)))
        await asyncio.sleep(0)


def _text(address: Address) -> str:
    return f"{address[0]}:{address[1]}"
