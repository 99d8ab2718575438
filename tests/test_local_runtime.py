"""The local runtime's start under cancellation, and its recovery, with real child processes.

A burst of deploys cancels a start, then cancels it again while it is cleaning up
(the deploy that cancelled it is itself superseded). Wherever the second cancel
lands, the start must end with every process it spawned gone. And whatever a
killed daemon left running, the next one's recovery stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
from dataclasses import replace
from pathlib import Path

import pytest

from branchyard.errors import BuildFailed
from branchyard.git import Sources
from branchyard.manifest import Manifest
from branchyard.router import Router, RouteTable
from branchyard.runtime import RevisionSpec
from branchyard.runtime.local import LocalBuild, LocalRuntime
from branchyard.runtime.logs import Appender, Pump
from branchyard.runtime.processes import LocalProcess
from branchyard.runtime.sandbox import NOTHING, detect
from tests.conftest import wait_for


class Registry:
    """Records the process groups the runtime reports, and its peer ports, as the store does."""

    def __init__(self) -> None:
        self.alive: dict[int, str] = {}
        self.ports: dict[tuple[str, str], int] = {}

    def add_process(self, pgid: int, started: str, what: str) -> None:
        self.alive[pgid] = what

    def remove_process(self, pgid: int) -> None:
        self.alive.pop(pgid, None)

    def processes(self) -> list[tuple[int, str, str]]:
        return [(pgid, "", what) for pgid, what in self.alive.items()]

    def address(self, slot: tuple[str, str]) -> int | None:
        return self.ports.get(slot)

    def addresses(self) -> list[tuple[str, str, int]]:
        return [(*slot, port) for slot, port in self.ports.items()]

    def set_address(self, slot: tuple[str, str], port: int) -> None:
        self.ports[slot] = port


def group_alive(pgid: int) -> bool:
    """Whether a process of group ``pgid`` still runs (zombies waiting for init do not)."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z" and int(fields[2]) == pgid:
            return True
    return False


def never_healthy(home: Path, registry: Registry) -> tuple[LocalRuntime, LocalBuild]:
    """A runtime and a build whose web process runs but never answers its health check."""
    runtime = LocalRuntime(home, Sources(home / "mirrors"), registry, Router(RouteTable()))
    spec = RevisionSpec(
        "main", "app", 1, str(home), "0" * 40, Manifest("sleep 60", health_timeout=60), {}
    )
    checkout = home / "checkout"
    checkout.mkdir(parents=True)
    env = {"PATH": os.environ["PATH"]}
    return runtime, LocalBuild(spec, checkout, home / "venv", env)


async def spawned(registry: Registry) -> None:
    async with asyncio.timeout(10):
        while not registry.alive:
            await asyncio.sleep(0.01)


@pytest.mark.parametrize("steps_between", [0, 1, 2, 3, 5, 8, 13])
def test_a_start_cancelled_twice_leaves_no_process_whatever_the_gap(
    tmp_path: Path, steps_between: int
) -> None:
    async def scenario() -> None:
        registry = Registry()
        runtime, build = never_healthy(tmp_path, registry)
        start = asyncio.create_task(runtime.start(build, lambda _: None))
        await spawned(registry)
        pgids = list(registry.alive)
        start.cancel()
        for _ in range(steps_between):
            await asyncio.sleep(0)
        start.cancel()
        with pytest.raises(asyncio.CancelledError):
            await start
        assert registry.alive == {}
        assert not any(group_alive(pgid) for pgid in pgids)
        await runtime.close()

    asyncio.run(scenario())


def test_a_start_that_fails_its_health_check_stops_its_process_and_says_why(
    tmp_path: Path,
) -> None:
    async def scenario() -> None:
        registry = Registry()
        runtime, build = never_healthy(tmp_path, registry)
        quick = Manifest("sleep 60", health_timeout=0.2)
        build.spec = RevisionSpec("main", "app", 1, str(tmp_path), "0" * 40, quick, {})
        expected = r"health check GET / on port \d+ did not pass within 0.2 s"
        with pytest.raises(BuildFailed, match=expected):
            await runtime.start(build, lambda _: None)
        assert registry.alive == {}
        await runtime.close()

    asyncio.run(scenario())


def test_a_box_whose_daemon_died_while_setting_it_up_is_stopped_by_the_next_recovery(
    tmp_path: Path,
) -> None:
    """bwrap's init waits in its set-up for the outer bwrap's go-ahead, before it leads a
    session of its own and before the daemon has recorded it. A daemon killed then takes
    the outer bwrap with it (``--die-with-parent``), and the init waits forever."""
    home = tmp_path / "home"
    home.mkdir()
    sandbox = detect()
    runtime = LocalRuntime(
        home, Sources(home / "mirrors"), Registry(), Router(RouteTable()), sandbox=sandbox
    )
    boxed = replace(sandbox, owner=str(home.resolve()))  # as the runtime starts its boxes
    info, info_fd = os.pipe()
    go_ahead, never_written = os.pipe()
    command = boxed.command(["sleep", "60"], Path("/"), NOTHING, info_fd)
    command[1:1] = ["--block-fd", str(go_ahead)]  # the set-up waits on it, as on the go-ahead
    env = boxed.environment({"PATH": os.environ["PATH"]})
    with subprocess.Popen(
        command, env=env, pass_fds=(info_fd, go_ahead), start_new_session=True
    ) as outer:
        os.close(info_fd)
        os.close(go_ahead)
        with os.fdopen(info, "rb") as report:
            init = int(json.loads(report.read())["child-pid"])
        outer.kill()  # as its parent-death signal does
    try:
        assert group_alive(outer.pid)  # the init, in the outer bwrap's group, left waiting
        assert asyncio.run(runtime.recover()) == 1
        wait_for(lambda: not group_alive(outer.pid), 10, "the box stopped")
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(init, signal.SIGKILL)
        os.close(never_written)


def test_a_box_stopped_while_it_sets_itself_up_is_stopped_at_once(tmp_path: Path) -> None:
    """A daemon that stops (or a deploy cancelled) right after a box was started: its
    init has no group of its own yet (it is still in the outer bwrap's), so signalling
    the init's group reached nothing, and the stop waited for as long as the box ran."""
    sandbox = detect()
    info, info_fd = os.pipe()
    go_ahead, never_written = os.pipe()
    command = sandbox.command(["sleep", "60"], Path("/"), NOTHING, info_fd)
    command[1:1] = ["--block-fd", str(go_ahead)]  # its set-up waits on it, never released
    env = sandbox.environment({"PATH": os.environ["PATH"]})

    async def start_then_stop() -> int:
        outer = await asyncio.create_subprocess_exec(
            *command, env=env, pass_fds=(info_fd, go_ahead), start_new_session=True
        )
        os.close(info_fd)
        os.close(go_ahead)
        with os.fdopen(info, "rb") as report:
            init = int(json.loads(report.read())["child-pid"])
        assert not group_alive(init) and group_alive(outer.pid)  # the init makes none yet
        log = Appender(tmp_path / "box.log")
        process = LocalProcess(outer, Registry(), init, log, Pump(log))
        async with asyncio.timeout(20):
            await process.terminate(0.5)
        return init

    try:
        init = asyncio.run(start_then_stop())
        wait_for(lambda: not group_alive(init) and not alive(init), 10, "the init gone")
    finally:
        os.close(never_written)


def alive(pid: int) -> bool:
    """Whether process ``pid`` runs (a zombie does not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False
