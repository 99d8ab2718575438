"""Supervision of one process: an explicit state machine, restarts with capped backoff.

A :class:`Supervisor` starts one process through an injected factory, waits until it is
ready, and restarts it when it crashes, waiting longer after each failure in a row
(1 s, 2 s, 4 s, ... capped at 60 s). After too many failures in a row it gives up and
the process is FAILED. The states and the events that move between them::

                           READY
              STARTING ──────────────> RUNNING
               │  │  ▲                    │
               │  │  │ RETRY              │ EXITED (it crashed)
       GIVE_UP │  │  │                    │
    (the first │  │  └──── BACKOFF <──────┘
        start) │  │ EXITED   ▲  │
               │  └──────────┘  │ GIVE_UP (too many failures in a row)
               ▼                ▼
              FAILED <──────────┘

    STARTING, RUNNING, BACKOFF ──STOP──> STOPPING ──EXITED──> EXITED

A new Supervisor is STARTING; EXITED and FAILED are final. The first start never
retries: a new revision that cannot start fails fast (:class:`FirstStartFailed`), so the
revision it was to replace keeps serving. Only a process that was RUNNING once is
restarted. A process that stayed RUNNING for ``stable_after`` seconds clears the count of
failures in a row, so an occasional crash of a long-lived process never adds up to FAILED.

Every state change goes through :func:`transition` and the literal :data:`TRANSITIONS`
table, so an impossible change is a bug that raises instead of a state nobody drew.
The clock, the sleep and the process factory are constructor arguments: tests drive the
machine with fake processes and fake time and never sleep.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Protocol

from branchyard.errors import BuildFailed
from branchyard.runtime import InstanceState

log = logging.getLogger(__name__)


class Event(enum.StrEnum):
    READY = "ready"  # started (and, for a web process, its health check passed)
    EXITED = "exited"  # the process ended
    RETRY = "retry"  # the backoff delay is over
    GIVE_UP = "give_up"  # too many failures in a row
    STOP = "stop"  # asked to stop


TRANSITIONS: Mapping[tuple[InstanceState, Event], InstanceState] = {
    (InstanceState.STARTING, Event.READY): InstanceState.RUNNING,
    # a restart that exited or was not ready:
    (InstanceState.STARTING, Event.EXITED): InstanceState.BACKOFF,
    # the first start, which is never retried:
    (InstanceState.STARTING, Event.GIVE_UP): InstanceState.FAILED,
    (InstanceState.STARTING, Event.STOP): InstanceState.STOPPING,
    (InstanceState.RUNNING, Event.EXITED): InstanceState.BACKOFF,
    (InstanceState.RUNNING, Event.STOP): InstanceState.STOPPING,
    (InstanceState.BACKOFF, Event.RETRY): InstanceState.STARTING,
    (InstanceState.BACKOFF, Event.GIVE_UP): InstanceState.FAILED,
    (InstanceState.BACKOFF, Event.STOP): InstanceState.STOPPING,
    (InstanceState.STOPPING, Event.EXITED): InstanceState.EXITED,
}


def transition(state: InstanceState, event: Event) -> InstanceState:
    """The state that ``event`` leads to from ``state``; ValueError if the table has none."""
    try:
        return TRANSITIONS[(state, event)]
    except KeyError:
        raise ValueError(f"no transition from {state} on {event}") from None


def backoff_delay(failures: int, base: float = 1.0, cap: float = 60.0) -> float:
    """Seconds to wait before the next start after ``failures`` failures in a row (>= 1)."""
    if failures < 1:
        raise ValueError(f"failures must be at least 1, not {failures}")
    return min(cap, base * 2.0 ** min(failures - 1, 64))


class Process(Protocol):
    @property
    def pid(self) -> int: ...

    @property
    def returncode(self) -> int | None: ...

    async def wait(self) -> int: ...

    async def terminate(self, grace: float) -> None:
        """SIGTERM, then SIGKILL after ``grace`` seconds; return once the process has exited."""
        ...


Spawn = Callable[[], Awaitable[Process]]
Ready = Callable[[Process], Awaitable[bool]]  # False if it did not become ready (or exited)


class FirstStartFailed(BuildFailed):
    """A start of a process ended before it was ready. The first start is not retried;
    a restart that ends so counts as one more failure in a row."""

    def __init__(self, message: str, exit_code: int | None = None) -> None:
        super().__init__(message)
        self.exit_code = exit_code  # None if it did not exit by itself


class Supervisor:
    """Starts one process, restarts it when it crashes, and stops it on request.

    ``grace`` is how long a process that did not become ready gets between SIGTERM and
    SIGKILL; :meth:`stop` takes its own. ``restarts`` counts the starts after the first;
    ``failures`` counts the failures in a row; ``exit_code`` is the last process's.
    """

    def __init__(
        self,
        name: str,
        spawn: Spawn,
        ready: Ready | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        max_failures: int = 5,
        stable_after: float = 30.0,
        base_delay: float = 1.0,
        max_delay: float = 60.0,
        grace: float = 10.0,
        on_change: Callable[[Supervisor], None] | None = None,
    ) -> None:
        self.name = name
        self.state = InstanceState.STARTING
        self.pid: int | None = None
        self.exit_code: int | None = None
        self.restarts = 0
        self.failures = 0
        self._spawn = spawn
        self._ready = ready
        self._clock = clock
        self._sleep = sleep
        self._max_failures = max_failures
        self._stable_after = stable_after
        self._base_delay = base_delay
        self._max_delay = max_delay
        self._grace = grace
        self._on_change = on_change
        self._process: Process | None = None
        self._running_since = 0.0
        self._task: asyncio.Task[None] | None = None
        self._stopping: asyncio.Task[None] | None = None
        self._failed = asyncio.Event()

    def __repr__(self) -> str:
        return f"<Supervisor {self.name} {self.state} pid={self.pid} exit_code={self.exit_code}>"

    async def start(self) -> None:
        """Start the process and return once it is ready; supervise it from then on.

        Raises :class:`FirstStartFailed` (and the state is FAILED) if it exits or is not
        ready. Cancelling ``start`` does not stop the process: :meth:`stop` does.
        """
        if self._task is not None or self.state is not InstanceState.STARTING:
            raise RuntimeError(f"{self.name} was already started")
        started: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        started.add_done_callback(_retrieve)
        self._task = asyncio.create_task(self._run(started), name=f"supervise {self.name}")
        self._task.add_done_callback(self._log_crash)
        await asyncio.shield(started)

    async def stop(self, grace: float) -> None:
        """Stop supervising and terminate the process; EXITED at the end. Idempotent.

        A FAILED supervisor has nothing left to stop and stays FAILED. Cancelling
        ``stop`` does not cancel the stopping, which :meth:`stopping` began.
        """
        await asyncio.shield(self.stopping(grace))

    def stopping(self, grace: float) -> asyncio.Future[None]:
        """Begin to stop now, not at the caller's next step; what finishes the stop.

        A coroutine that is cancelled before its first step never runs, so cleanup
        written as ``await stop()`` can be lost; this begins it synchronously.
        """
        if self._stopping is None:
            if self.state in (InstanceState.EXITED, InstanceState.FAILED):
                done = asyncio.get_running_loop().create_future()
                done.set_result(None)
                return done
            self._move(Event.STOP)
            if self._task is not None:
                self._task.cancel()
            self._stopping = asyncio.create_task(self._stop(grace), name=f"stop {self.name}")
        return self._stopping

    async def wait_failed(self) -> None:
        """Return once the state is FAILED (which may be never)."""
        await self._failed.wait()

    async def _stop(self, grace: float) -> None:
        if self._task is not None:
            await asyncio.wait([self._task])  # its cancellation is not ours to raise
        process, self._process = self._process, None
        if process is not None:
            if process.returncode is None:
                await process.terminate(grace)
            self.exit_code = process.returncode
        self.pid = None
        self._move(Event.EXITED)

    async def _run(self, started: asyncio.Future[None]) -> None:
        try:
            process = await self._launch()
        except FirstStartFailed as failure:
            self._move(Event.GIVE_UP)
            started.set_exception(failure)
            return
        except asyncio.CancelledError:
            started.set_exception(FirstStartFailed("was stopped before it was ready"))
            raise
        except Exception as error:
            started.set_exception(error)
            raise
        self._move(Event.READY)
        started.set_result(None)
        await self._supervise(process)

    async def _supervise(self, process: Process) -> None:
        """Wait for the process to exit, then restart it until it stays up or we give up."""
        while True:
            self._running_since = self._clock()
            self.exit_code = await process.wait()
            self._process, self.pid = None, None
            if self._clock() - self._running_since >= self._stable_after:
                self.failures = 0
            self.failures += 1
            self._move(Event.EXITED)
            while True:
                if self.failures > self._max_failures:
                    self._move(Event.GIVE_UP)
                    return
                await self._sleep(backoff_delay(self.failures, self._base_delay, self._max_delay))
                self._move(Event.RETRY)
                self.restarts += 1
                try:
                    process = await self._launch()
                except FirstStartFailed:
                    self.failures += 1
                    self._move(Event.EXITED)
                    continue
                self._move(Event.READY)
                break

    async def _launch(self) -> Process:
        """Spawn the process and wait until it is ready; if it is not, none of it is left."""
        try:
            process = await self._spawn_tracked()
        except Exception as error:
            raise FirstStartFailed(f"could not be started: {error}", None) from error
        reason = "was not ready"
        try:
            ready = await self._ready(process) if self._ready is not None else True
        except Exception as error:
            ready, reason = False, f"was not ready: {error}"
        code = process.returncode
        if ready and code is None:
            return process
        if code is None:
            await process.terminate(self._grace)
        self._process, self.pid = None, None
        self.exit_code = process.returncode
        if code is not None:
            raise FirstStartFailed(f"exited with code {code} before it was ready", code)
        raise FirstStartFailed(reason, None)

    async def _spawn_tracked(self) -> Process:
        spawning = asyncio.ensure_future(self._spawn())
        try:
            process = await asyncio.shield(spawning)
        except asyncio.CancelledError:
            # Stopped while spawning: the process may still appear; keep hold of it so
            # that stop() terminates it rather than leaving it behind.
            with contextlib.suppress(Exception):
                self._process = await spawning
                self.pid = self._process.pid
            raise
        self._process, self.pid = process, process.pid
        return process

    def _move(self, event: Event) -> None:
        self.state = transition(self.state, event)
        if self.state is InstanceState.FAILED:
            self._failed.set()
        if self._on_change is not None:
            self._on_change(self)

    def _log_crash(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and (error := task.exception()) is not None:
            log.error("supervising %s failed", self.name, exc_info=error)


def _retrieve(future: asyncio.Future[None]) -> None:
    """Mark the outcome as seen, so an abandoned start() logs no "never retrieved"."""
    if not future.cancelled():
        future.exception()
