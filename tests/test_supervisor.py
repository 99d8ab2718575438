"""The process supervisor: its state table, its backoff, and its behaviour in fake time.

Most tests drive a Supervisor with fake processes (their exit is triggered from the test),
a fake clock and a fake sleep that records the delays asked for, so backoff is checked
without waiting. Two tests run real children, spawned as the product's LocalProcess, to check
the same rules hold for them.
"""

from __future__ import annotations

import asyncio
import itertools
import signal
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from branchyard.runtime import InstanceState
from branchyard.runtime.logs import Appender
from branchyard.runtime.processes import LocalProcess
from branchyard.runtime.supervisor import (
    TRANSITIONS,
    Event,
    FirstStartFailed,
    Process,
    Spawn,
    Supervisor,
    backoff_delay,
    transition,
)
from tests.test_processes import KEEPS_RUNNING, Registry, spawn_ready

S = InstanceState

ALLOWED = [
    (S.STARTING, Event.READY, S.RUNNING),
    (S.STARTING, Event.EXITED, S.BACKOFF),
    (S.STARTING, Event.GIVE_UP, S.FAILED),
    (S.STARTING, Event.STOP, S.STOPPING),
    (S.RUNNING, Event.EXITED, S.BACKOFF),
    (S.RUNNING, Event.STOP, S.STOPPING),
    (S.BACKOFF, Event.RETRY, S.STARTING),
    (S.BACKOFF, Event.GIVE_UP, S.FAILED),
    (S.BACKOFF, Event.STOP, S.STOPPING),
    (S.STOPPING, Event.EXITED, S.EXITED),
]


# --- the state table -----------------------------------------------------------------------


@pytest.mark.parametrize(("state", "event", "after"), ALLOWED)
def test_an_allowed_transition_leads_to_its_state(
    state: InstanceState, event: Event, after: InstanceState
) -> None:
    assert transition(state, event) is after


@pytest.mark.parametrize(
    ("state", "event"),
    [
        (S.RUNNING, Event.READY),  # ready twice
        (S.RUNNING, Event.RETRY),  # a retry without a backoff
        (S.RUNNING, Event.GIVE_UP),  # giving up skips the backoff
        (S.BACKOFF, Event.READY),  # ready without starting again
        (S.STOPPING, Event.STOP),  # stop is idempotent above the table, not in it
        (S.STOPPING, Event.RETRY),  # no restart while stopping
        (S.EXITED, Event.RETRY),  # exited is final
        (S.EXITED, Event.STOP),
        (S.FAILED, Event.RETRY),  # failed is final
        (S.FAILED, Event.STOP),
    ],
)
def test_a_forbidden_transition_raises(state: InstanceState, event: Event) -> None:
    with pytest.raises(ValueError, match=f"no transition from {state} on {event}"):
        transition(state, event)


def test_the_table_holds_exactly_the_allowed_transitions_and_every_other_pair_raises() -> None:
    expected = {(state, event): after for state, event, after in ALLOWED}
    assert dict(TRANSITIONS) == expected
    for state, event in itertools.product(InstanceState, Event):
        if (state, event) not in expected:
            with pytest.raises(ValueError):
                transition(state, event)


def test_final_states_have_no_way_out() -> None:
    for state, event in itertools.product([S.EXITED, S.FAILED], Event):
        assert (state, event) not in TRANSITIONS


@pytest.mark.parametrize(
    ("failures", "delay"),
    [(1, 1.0), (2, 2.0), (3, 4.0), (4, 8.0), (5, 16.0), (6, 32.0), (7, 60.0), (8, 60.0)],
)
def test_backoff_doubles_from_one_second_and_is_capped_at_sixty(
    failures: int, delay: float
) -> None:
    assert backoff_delay(failures) == delay


def test_backoff_takes_its_base_and_cap_and_survives_a_huge_count() -> None:
    assert [backoff_delay(n, base=0.5, cap=3.0) for n in range(1, 6)] == [0.5, 1.0, 2.0, 3.0, 3.0]
    assert backoff_delay(10_000) == 60.0


def test_backoff_needs_at_least_one_failure() -> None:
    with pytest.raises(ValueError):
        backoff_delay(0)


# --- fakes -----------------------------------------------------------------------------------


class FakeProcess:
    """A process whose exit the test triggers; terminate() records its grace and exits -15."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None
        self.terminations: list[float] = []
        self._exited = asyncio.Event()

    def exit(self, code: int) -> None:
        self.returncode = code
        self._exited.set()

    async def wait(self) -> int:
        await self._exited.wait()
        assert self.returncode is not None
        return self.returncode

    async def terminate(self, grace: float) -> None:
        self.terminations.append(grace)
        if self.returncode is None:
            self.exit(-signal.SIGTERM)


class FakeSpawn:
    """The process factory: hands out FakeProcesses with pids 101, 102, ..."""

    def __init__(self) -> None:
        self.spawned: list[FakeProcess] = []

    async def __call__(self) -> Process:
        process = FakeProcess(101 + len(self.spawned))
        self.spawned.append(process)
        return process

    @property
    def last(self) -> FakeProcess:
        return self.spawned[-1]


class FakeReady:
    """The readiness check: answers from a script of results (True once it runs out).

    A result of an int makes the process exit with that code during the check.
    """

    def __init__(self, *results: bool | int) -> None:
        self.results = list(results)
        self.gate: asyncio.Event | None = None  # if set, the check waits for it

    async def __call__(self, process: Process) -> bool:
        if self.gate is not None:
            await self.gate.wait()
        result = self.results.pop(0) if self.results else True
        if isinstance(result, bool):
            return result
        assert isinstance(process, FakeProcess)
        process.exit(result)
        return False


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class FakeSleep:
    """Records every delay; returns at once, or waits for ``gate`` when one is set."""

    def __init__(self) -> None:
        self.delays: list[float] = []
        self.gate: asyncio.Event | None = None

    async def __call__(self, delay: float) -> None:
        self.delays.append(delay)
        if self.gate is not None:
            await self.gate.wait()
        else:
            await asyncio.sleep(0)


class Rig:
    """A Supervisor wired to fakes, with every state it went through."""

    def __init__(self, ready: FakeReady | None = None, **options: Any) -> None:
        self.spawn = FakeSpawn()
        self.ready = ready
        self.clock = FakeClock()
        self.sleep = FakeSleep()
        self.seen: list[InstanceState] = []
        self.pids: list[int | None] = []  # the pid at each change
        self.supervisor = Supervisor(
            "app.main.v1",
            self.spawn,
            ready,
            clock=self.clock,
            sleep=self.sleep,
            on_change=self.changed,
            **options,
        )

    def changed(self, supervisor: Supervisor) -> None:
        self.seen.append(supervisor.state)
        self.pids.append(supervisor.pid)


async def until(check: Callable[[], bool], what: str = "condition") -> None:
    """Let the event loop run until ``check()`` holds (no real time passes)."""
    for _ in range(1000):
        if check():
            return
        await asyncio.sleep(0)
    raise AssertionError(f"never reached: {what}")


async def running_again(rig: Rig, spawned: int) -> None:
    await until(
        lambda: len(rig.spawn.spawned) == spawned and rig.supervisor.state is S.RUNNING,
        f"process {spawned} running",
    )


def run(test: Callable[[], Awaitable[None]]) -> None:
    """Run one scenario in a fresh event loop; no scenario may hang the suite."""

    async def bounded() -> None:
        await asyncio.wait_for(test(), 5)

    asyncio.run(bounded())


# --- the first start -------------------------------------------------------------------------


def test_a_first_start_that_becomes_ready_is_running() -> None:
    async def scenario() -> None:
        rig = Rig(FakeReady(True))
        await rig.supervisor.start()
        assert rig.supervisor.state is S.RUNNING
        assert rig.supervisor.pid == 101
        assert (rig.supervisor.restarts, rig.supervisor.failures) == (0, 0)
        assert rig.seen == [S.RUNNING]
        await rig.supervisor.stop(1.0)

    run(scenario)


def test_a_first_start_without_a_ready_check_is_running_once_spawned() -> None:
    async def scenario() -> None:
        rig = Rig()
        await rig.supervisor.start()
        assert rig.supervisor.state is S.RUNNING
        await rig.supervisor.stop(1.0)

    run(scenario)


def test_a_first_start_that_exits_fails_with_its_code_and_is_not_restarted() -> None:
    async def scenario() -> None:
        rig = Rig(FakeReady(4))
        with pytest.raises(FirstStartFailed) as failure:
            await rig.supervisor.start()
        assert failure.value.exit_code == 4
        assert str(failure.value) == failure.value.message
        assert failure.value.message == "exited with code 4 before it was ready"
        assert rig.supervisor.state is S.FAILED
        assert rig.supervisor.exit_code == 4
        assert rig.seen == [S.FAILED]
        await asyncio.wait_for(rig.supervisor.wait_failed(), 1)
        for _ in range(10):
            await asyncio.sleep(0)
        assert len(rig.spawn.spawned) == 1
        assert rig.sleep.delays == []
        assert rig.spawn.last.terminations == []  # it had exited already

    run(scenario)


def test_a_first_start_that_is_not_ready_fails_and_its_process_is_terminated() -> None:
    async def scenario() -> None:
        rig = Rig(FakeReady(False), grace=7.0)
        with pytest.raises(FirstStartFailed, match=r"^was not ready$") as failure:
            await rig.supervisor.start()
        assert failure.value.exit_code is None
        assert rig.spawn.last.terminations == [7.0]
        assert rig.supervisor.state is S.FAILED
        assert rig.supervisor.pid is None
        assert rig.supervisor.exit_code == -signal.SIGTERM
        assert len(rig.spawn.spawned) == 1

    run(scenario)


def test_a_ready_check_that_raises_counts_as_not_ready() -> None:
    async def scenario() -> None:
        async def broken(process: Process) -> bool:
            raise OSError("connection refused")

        supervisor = Supervisor("app", FakeSpawn(), broken)
        with pytest.raises(FirstStartFailed, match=r"^was not ready: connection refused$"):
            await supervisor.start()
        assert supervisor.state is S.FAILED

    run(scenario)


def test_a_process_that_cannot_be_spawned_fails_the_first_start() -> None:
    async def scenario() -> None:
        async def spawn() -> Process:
            raise FileNotFoundError("no such command: gunicorn")

        supervisor = Supervisor("app", spawn)
        with pytest.raises(FirstStartFailed, match="could not be started: no such command"):
            await supervisor.start()
        assert supervisor.state is S.FAILED

    run(scenario)


def test_start_cannot_be_called_twice() -> None:
    async def scenario() -> None:
        rig = Rig()
        await rig.supervisor.start()
        with pytest.raises(RuntimeError, match="already started"):
            await rig.supervisor.start()
        await rig.supervisor.stop(1.0)

    run(scenario)


# --- restarts --------------------------------------------------------------------------------


def test_a_crash_while_running_backs_off_and_starts_again() -> None:
    async def scenario() -> None:
        rig = Rig(FakeReady())
        await rig.supervisor.start()
        rig.spawn.last.exit(1)
        await running_again(rig, 2)
        assert rig.seen == [S.RUNNING, S.BACKOFF, S.STARTING, S.RUNNING]
        assert rig.sleep.delays == [1.0]
        assert rig.supervisor.restarts == 1
        assert rig.supervisor.failures == 1
        assert rig.supervisor.exit_code == 1
        assert rig.supervisor.pid == 102
        await rig.supervisor.stop(1.0)

    run(scenario)


def test_repeated_crashes_back_off_longer_each_time_then_fail_with_the_last_exit_code() -> None:
    async def scenario() -> None:
        rig = Rig(FakeReady(), max_failures=5)
        await rig.supervisor.start()
        for crash in range(1, 6):
            rig.spawn.last.exit(10 + crash)
            await running_again(rig, crash + 1)
        rig.spawn.last.exit(16)
        await asyncio.wait_for(rig.supervisor.wait_failed(), 1)
        assert rig.sleep.delays == [1.0, 2.0, 4.0, 8.0, 16.0]
        assert rig.supervisor.state is S.FAILED
        assert rig.supervisor.exit_code == 16
        assert rig.supervisor.failures == 6
        assert rig.supervisor.restarts == 5
        assert rig.supervisor.pid is None
        assert len(rig.spawn.spawned) == 6
        assert rig.seen[-2:] == [S.BACKOFF, S.FAILED]
        await rig.supervisor.stop(1.0)  # nothing left to stop: it stays FAILED
        assert rig.supervisor.state is S.FAILED

    run(scenario)


def test_the_delays_follow_base_delay_and_max_delay() -> None:
    async def scenario() -> None:
        rig = Rig(max_failures=4, base_delay=0.25, max_delay=1.0)
        await rig.supervisor.start()
        for crash in range(1, 5):
            rig.spawn.last.exit(1)
            await running_again(rig, crash + 1)
        assert rig.sleep.delays == [0.25, 0.5, 1.0, 1.0]
        await rig.supervisor.stop(1.0)

    run(scenario)


@pytest.mark.parametrize(("uptime", "failures"), [(30.0, 1), (45.0, 1), (29.9, 2)])
def test_a_process_that_stayed_up_for_stable_after_seconds_clears_its_failures(
    uptime: float, failures: int
) -> None:
    async def scenario() -> None:
        rig = Rig(stable_after=30.0)
        await rig.supervisor.start()
        rig.spawn.last.exit(1)
        await running_again(rig, 2)
        rig.clock.now += uptime
        rig.spawn.last.exit(1)
        await running_again(rig, 3)
        assert rig.supervisor.failures == failures
        assert rig.sleep.delays == [1.0, backoff_delay(failures)]
        assert rig.supervisor.restarts == 2
        await rig.supervisor.stop(1.0)

    run(scenario)


def test_a_restart_that_is_not_ready_counts_as_a_failure_and_is_terminated() -> None:
    async def scenario() -> None:
        rig = Rig(FakeReady(True, False, True), grace=3.0)
        await rig.supervisor.start()
        rig.spawn.last.exit(1)
        await running_again(rig, 3)
        unready = rig.spawn.spawned[1]
        assert unready.terminations == [3.0]
        assert rig.seen == [
            S.RUNNING,
            S.BACKOFF,
            S.STARTING,
            S.BACKOFF,
            S.STARTING,
            S.RUNNING,
        ]
        assert rig.sleep.delays == [1.0, 2.0]
        assert (rig.supervisor.failures, rig.supervisor.restarts) == (2, 2)
        await rig.supervisor.stop(1.0)

    run(scenario)


def test_restarts_that_keep_exiting_before_ready_end_failed() -> None:
    async def scenario() -> None:
        rig = Rig(FakeReady(True, 5, 6), max_failures=2)
        await rig.supervisor.start()
        rig.spawn.last.exit(1)
        await asyncio.wait_for(rig.supervisor.wait_failed(), 1)
        assert rig.sleep.delays == [1.0, 2.0]
        assert rig.supervisor.exit_code == 6
        assert len(rig.spawn.spawned) == 3

    run(scenario)


def test_on_change_sees_each_state_as_it_happens() -> None:
    async def scenario() -> None:
        rig = Rig()
        await rig.supervisor.start()
        rig.spawn.last.exit(2)
        await running_again(rig, 2)
        await rig.supervisor.stop(1.0)
        assert list(zip(rig.seen, rig.pids, strict=True)) == [
            (S.RUNNING, 101),
            (S.BACKOFF, None),
            (S.STARTING, None),
            (S.RUNNING, 102),
            (S.STOPPING, 102),
            (S.EXITED, None),
        ]

    run(scenario)


# --- stopping --------------------------------------------------------------------------------


def test_stop_while_running_terminates_with_the_grace_and_ends_exited() -> None:
    async def scenario() -> None:
        rig = Rig()
        await rig.supervisor.start()
        await rig.supervisor.stop(5.0)
        assert rig.spawn.last.terminations == [5.0]
        assert rig.supervisor.state is S.EXITED
        assert rig.supervisor.exit_code == -signal.SIGTERM
        assert rig.supervisor.pid is None
        assert rig.seen == [S.RUNNING, S.STOPPING, S.EXITED]
        for _ in range(10):
            await asyncio.sleep(0)
        assert len(rig.spawn.spawned) == 1  # the exit it caused is not a crash

    run(scenario)


def test_stop_during_backoff_cancels_the_restart_and_ends_exited() -> None:
    async def scenario() -> None:
        rig = Rig()
        rig.sleep.gate = asyncio.Event()  # never set: the backoff lasts until stopped
        await rig.supervisor.start()
        rig.spawn.last.exit(1)
        await until(lambda: rig.sleep.delays == [1.0], "backing off")
        assert rig.seen == [S.RUNNING, S.BACKOFF]
        await rig.supervisor.stop(5.0)
        assert rig.supervisor.state is S.EXITED
        assert rig.supervisor.exit_code == 1  # the crash's: nothing ran to terminate
        assert rig.spawn.last.terminations == []
        assert rig.seen == [S.RUNNING, S.BACKOFF, S.STOPPING, S.EXITED]
        rig.sleep.gate.set()
        for _ in range(10):
            await asyncio.sleep(0)
        assert len(rig.spawn.spawned) == 1

    run(scenario)


def test_stop_during_the_first_start_terminates_the_process_and_fails_the_start() -> None:
    async def scenario() -> None:
        ready = FakeReady(True)
        ready.gate = asyncio.Event()  # the health check hangs
        rig = Rig(ready)
        starting = asyncio.create_task(rig.supervisor.start())
        await until(lambda: len(rig.spawn.spawned) == 1, "spawned")
        await rig.supervisor.stop(2.0)
        with pytest.raises(FirstStartFailed, match="stopped before it was ready"):
            await starting
        assert rig.spawn.last.terminations == [2.0]
        assert rig.supervisor.state is S.EXITED
        assert rig.seen == [S.STOPPING, S.EXITED]

    run(scenario)


def test_stop_while_a_process_is_being_spawned_still_terminates_it() -> None:
    async def scenario() -> None:
        spawned = asyncio.Event()
        release = asyncio.Event()
        process = FakeProcess(7)

        async def slow_spawn() -> Process:
            spawned.set()
            await release.wait()
            return process

        supervisor = Supervisor("app", slow_spawn)
        starting = asyncio.create_task(supervisor.start())
        await spawned.wait()
        stopping = asyncio.create_task(supervisor.stop(2.0))
        await until(lambda: supervisor.state is S.STOPPING, "stopping")
        release.set()
        await stopping
        assert process.terminations == [2.0]
        assert supervisor.state is S.EXITED
        with pytest.raises(FirstStartFailed):
            await starting

    run(scenario)


def test_stop_is_idempotent() -> None:
    async def scenario() -> None:
        rig = Rig()
        await rig.supervisor.start()
        await asyncio.gather(rig.supervisor.stop(5.0), rig.supervisor.stop(9.0))
        await rig.supervisor.stop(1.0)
        assert rig.spawn.last.terminations == [5.0]
        assert rig.seen == [S.RUNNING, S.STOPPING, S.EXITED]
        assert rig.supervisor.state is S.EXITED

    run(scenario)


def test_stop_before_start_ends_exited_and_start_then_refuses() -> None:
    async def scenario() -> None:
        rig = Rig()
        await rig.supervisor.stop(1.0)
        assert rig.supervisor.state is S.EXITED
        with pytest.raises(RuntimeError):
            await rig.supervisor.start()
        assert rig.spawn.spawned == []

    run(scenario)


# --- real processes --------------------------------------------------------------------------


def local(code: str, log: Path, registry: Registry) -> Spawn:
    """Spawn ``code`` under Python as the product's own :class:`LocalProcess`."""

    async def spawn() -> Process:
        argv = [sys.executable, "-c", code]
        return await LocalProcess.spawn(argv, Path("/"), {}, Appender(log), registry, "child")

    return spawn


def test_a_real_process_that_keeps_exiting_is_restarted_then_fails(tmp_path: Path) -> None:
    registry = Registry()

    async def scenario() -> None:
        crasher = local("raise SystemExit(3)", tmp_path / "log", registry)
        supervisor = Supervisor("crasher", crasher, max_failures=2, base_delay=0.01)
        await supervisor.start()
        await supervisor.wait_failed()
        assert supervisor.state is S.FAILED
        assert supervisor.exit_code == 3
        assert (supervisor.restarts, supervisor.failures) == (2, 3)
        assert registry.live == set()

    run(scenario)


def test_a_real_process_that_carries_on_after_sigterm_is_killed_once_the_grace_is_over(
    tmp_path: Path,
) -> None:
    log, registry = tmp_path / "log", Registry()

    async def scenario() -> None:
        stubborn = Supervisor("stubborn", lambda: spawn_ready(KEEPS_RUNNING, log, registry, None))
        await stubborn.start()
        await stubborn.stop(1.0)
        assert stubborn.state is S.EXITED
        assert stubborn.exit_code == -signal.SIGKILL
        assert registry.live == set()

    run(scenario)
    assert log.read_text() == "ready\ngot SIGTERM\n"  # it had the SIGTERM and the grace, then -9
