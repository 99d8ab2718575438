"""Processes on this machine: spawning, stopping, ports, and leftovers (logs: see ``logs``).

Every process branchyard starts runs in a session of its own, so stopping it
signals the whole process group. Each group is reported to a
:class:`Registry` (the store, in the daemon) when it starts and when it is
reaped, so a daemon that was killed with -9 can find what it left running
(:func:`reap_leftovers`) — by process group id *and* start time, so a reused
pid is never mistaken for one of ours.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
from collections.abc import Iterable
from pathlib import Path
from typing import Protocol, TypeVar

LOOPBACK = "127.0.0.1"
T = TypeVar("T")


class Registry(Protocol):
    def add_process(self, pgid: int, started: str, what: str) -> None: ...

    def remove_process(self, pgid: int) -> None: ...


def start_time(pid: int) -> str:
    """The kernel's start time of ``pid`` (clock ticks since boot), "" if it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    return stat.rsplit(")", 1)[1].split()[19]


def signal_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


class Ports:
    """Hands out free loopback ports, never one it handed out and did not get back."""

    def __init__(self) -> None:
        self._held: set[int] = set()

    def take(self) -> int:
        while True:
            with socket.socket() as sock:
                sock.bind((LOOPBACK, 0))
                port = int(sock.getsockname()[1])
            if port not in self._held:
                self._held.add(port)
                return port

    def give_back(self, port: int) -> None:
        self._held.discard(port)


class LocalProcess:
    """One spawned process group, as :class:`~branchyard.runtime.supervisor.Process`."""

    def __init__(self, process: asyncio.subprocess.Process, registry: Registry) -> None:
        self._process = process
        self._registry = registry

    @classmethod
    async def spawn(
        cls,
        argv: list[str],
        cwd: Path,
        env: dict[str, str],
        log: Path,
        registry: Registry,
        what: str,
    ) -> LocalProcess:
        with log.open("ab") as out:
            process = await asyncio.create_subprocess_exec(
                *argv,
                cwd=cwd,
                env=env,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=out,
                stderr=asyncio.subprocess.STDOUT,
                start_new_session=True,
            )
        registry.add_process(process.pid, start_time(process.pid), what)
        return cls(process, registry)

    @property
    def pid(self) -> int:
        return self._process.pid

    @property
    def returncode(self) -> int | None:
        return self._process.returncode

    async def wait(self) -> int:
        code = await self._process.wait()
        signal_group(self.pid, signal.SIGKILL)  # whatever it left behind in its group
        self._registry.remove_process(self.pid)
        return code

    async def terminate(self, grace: float) -> None:
        if self._process.returncode is None:
            signal_group(self.pid, signal.SIGTERM)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(grace):
                    await asyncio.shield(self._process.wait())
        signal_group(self.pid, signal.SIGKILL)
        await self.wait()


async def uninterrupted(future: asyncio.Future[T]) -> T:
    """Wait for ``future`` to the end even if the caller is cancelled meanwhile, then
    raise that cancellation. For cleanup that must finish: stopping what was started."""
    cancelled = False
    while not future.done():
        try:
            await asyncio.shield(future)
        except asyncio.CancelledError:
            if future.cancelled():
                raise
            cancelled = True
    if cancelled:
        raise asyncio.CancelledError
    return future.result()


def reap_leftovers(processes: Iterable[tuple[int, str, str]]) -> list[str]:
    """Kill the process groups a dead daemon left running; what each was."""
    killed = []
    for pgid, started, what in processes:
        if started and start_time(pgid) == started:
            signal_group(pgid, signal.SIGKILL)
            killed.append(what)
    return killed
