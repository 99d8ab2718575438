"""Processes on this machine: spawning, stopping, ports, and leftovers (logs: see ``logs``).

A process's stdout and stderr are a pipe into its log's appender (``logs.Pump``): the
daemon writes every log, so it can rotate one without losing a line.

Every process branchyard starts runs in a session of its own, so stopping it
signals the whole process group; a boxed one (see ``sandbox``) is the session of
its box's init, which the PID namespace and ``--die-with-parent`` back up. Each
group is reported to a :class:`Registry` (the store, in the daemon) when it starts and when it is
reaped, so a daemon that was killed with -9 can find what it left running
(:func:`reap_leftovers`) — by process group id *and* start time, so a reused
pid is never mistaken for one of ours.

A process is recorded before it runs anything of its own: it starts behind a
gate (:data:`GATE`) that waits for a line on its stdin, which the daemon writes
once the group is in the registry and in a cgroup of its own (see ``cgroups``),
so nothing pushed runs before it is limited. A daemon killed before that closes the pipe
unwritten, and the gate exits. ``--die-with-parent`` alone does not cover that
moment: bwrap's init asks for its parent-death signal only once the box is set
up, so a daemon killed meanwhile left a box that ran on, recorded nowhere. A
box can also be left waiting in its set-up forever (see ``sandbox``): those are
found by the mark in bwrap's environment (:func:`reap_boxes`).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import random
import signal
import socket
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Protocol, TypeVar

from branchyard.errors import TemporaryError
from branchyard.runtime.cgroups import BOX_OOM_SCORE_ADJ, Cgroup, Cgroups, Limits, MiB
from branchyard.runtime.logs import Appender, Pump
from branchyard.runtime.sandbox import MARK, NOTHING, Attachment, Box, Sandbox

LOOPBACK = "127.0.0.1"
T = TypeVar("T")
# Raises its own oom_score_adj (the daemon raises those of the processes it finds, but a
# fork under way as it looks copies the old value unseen), says it runs (on stdout, a
# pipe: the box is set up then), runs the command once a line comes on stdin, and exits
# if the pipe closes first. The command's stdout is its stderr, the log's pipe. Fixed text: the
# command is its arguments, never part of the script.
GATE = [
    "/bin/sh",
    "-c",
    f"echo {BOX_OOM_SCORE_ADJ} >/proc/self/oom_score_adj; "
    'printf x || exit 1; read -r _ || exit 1; exec "$@" </dev/null >&2',
    "branchyard-gate",
]


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


EPHEMERAL_RANGE = Path("/proc/sys/net/ipv4/ip_local_port_range")
LOWEST_PORT = 10000
"""Service ports are picked from here up, above the ports well-known servers use."""


def service_ports(ephemeral: tuple[int, int]) -> list[int]:
    """The ports services may be given: from :data:`LOWEST_PORT` up, outside the kernel's
    ephemeral range ``(low, high)``. The kernel takes ports from that range for outgoing
    connections and for every ``bind(port 0)`` on the machine: a port picked there may be
    taken between the pick and the service's own bind (its bind then fails, while the
    health check reaches whatever holds the port, or itself: a connection from an
    ephemeral port to the same port on loopback connects to itself)."""
    low, high = ephemeral
    return [port for port in range(LOWEST_PORT, 65536) if not low <= port <= high]


def ephemeral_range() -> tuple[int, int]:
    """The kernel's ephemeral port range (Linux's default where it cannot be read)."""
    try:
        low, high = map(int, EPHEMERAL_RANGE.read_text().split())
    except (OSError, ValueError):
        return 32768, 60999
    return low, high


class Ports:
    """Hands out free loopback ports outside the ephemeral range (see
    :func:`service_ports`), never one it handed out and did not get back."""

    def __init__(self, candidates: Sequence[int] | None = None) -> None:
        self._candidates = list(candidates or service_ports(ephemeral_range()))
        self._held: set[int] = set()

    def take(self) -> int:
        start = random.randrange(len(self._candidates))  # daemons side by side start apart
        for port in itertools.chain(self._candidates[start:], self._candidates[:start]):
            if port not in self._held and _free(port):
                self._held.add(port)
                return port
        raise TemporaryError("no free loopback port is left for a service")

    def give_back(self, port: int) -> None:
        self._held.discard(port)


def _free(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind((LOOPBACK, port))
        except OSError:
            return False
    return True


async def _read_to_end(fd: int, first: bool = False) -> bytes:
    """Everything written to the pipe ``fd`` until its writers close it (with ``first``:
    only what the first write brought, or nothing at the end), without blocking."""
    loop = asyncio.get_running_loop()
    os.set_blocking(fd, False)
    chunks: list[bytes] = []
    done: asyncio.Future[bytes] = loop.create_future()

    def readable() -> None:
        try:
            chunk = os.read(fd, 4096)
        except BlockingIOError:
            return
        if chunk:
            chunks.append(chunk)
        if (first or not chunk) and not done.done():
            done.set_result(b"".join(chunks))

    loop.add_reader(fd, readable)
    try:
        return await done
    finally:
        loop.remove_reader(fd)


def _kill(process: asyncio.subprocess.Process, group: int) -> None:
    """Kill a box (or process group) that is being started, and its outer process."""
    signal_group(group, signal.SIGKILL)
    signal_group(process.pid, signal.SIGKILL)


class LocalProcess:
    """One spawned process group, as :class:`~branchyard.runtime.supervisor.Process`.

    ``group`` is the session signalled to stop it: the process's own, or in a
    sandbox, that of the box's init (the outer bwrap stays out of it, so that it
    waits for the service to exit and reports its code).
    """

    def __init__(
        self,
        process: asyncio.subprocess.Process,
        registry: Registry,
        group: int,
        log: Appender,
        pump: Pump,
    ) -> None:
        self._process = process
        self._registry = registry
        self._group = group
        self._log = log  # where an out-of-memory kill is told
        self._pump = pump  # its output, into the log
        self._cgroup: Cgroup | None = None  # its limits, removed at exit
        self._network: Attachment | None = None  # opened in the box's network, closed at exit

    @classmethod
    async def spawn(
        cls,
        argv: list[str],
        cwd: Path,
        env: dict[str, str],
        log: Appender,
        registry: Registry,
        what: str,
        sandbox: Sandbox | None = None,
        box: Box = NOTHING,
        cgroups: Cgroups | None = None,
        limits: Limits | None = None,
        keep: tuple[int, ...] = (),
    ) -> LocalProcess:
        """``argv`` started, recorded in ``registry``, put in a cgroup of its own with
        ``limits`` (see ``cgroups``), its network opened (in a box with one), then let
        through its gate. The file descriptors ``keep`` stay open in it, at the same
        numbers (``/dev/fd/N``). Its output goes to ``log``."""
        gate, opener = os.pipe()
        pump = Pump(log)
        try:
            try:
                process, group = await cls._start(
                    [*GATE, *argv], cwd, env, pump.writer, gate, sandbox, box, keep
                )
            except BaseException:
                pump.finish()
                raise
            finally:
                pump.started()
                os.close(gate)
            registry.add_process(group, start_time(group), what)
            started = cls(process, registry, group, log, pump)
            if cgroups is not None:
                try:
                    started._cgroup = cgroups.confine(sorted({process.pid, group}), limits)
                except OSError as exc:
                    await started.terminate(0)
                    raise TemporaryError(f"cannot limit {what}: {exc}") from None
            if sandbox is not None and sandbox.network is not None and group != process.pid:
                try:
                    started._network = await sandbox.network.attach(group, env)
                except BaseException:
                    await started.terminate(0)
                    raise
            with contextlib.suppress(BrokenPipeError):  # it ended already: wait() says how
                os.write(opener, b"\n")
        finally:
            os.close(opener)
        return started

    @classmethod
    async def _start(
        cls,
        argv: list[str],
        cwd: Path,
        env: dict[str, str],
        output: int,
        stdin: int,
        sandbox: Sandbox | None,
        box: Box,
        keep: tuple[int, ...],
    ) -> tuple[asyncio.subprocess.Process, int]:
        """The process running ``argv`` (in a box if sandboxed) once its gate runs (its
        box set up), and its group."""
        ready, ready_fd = os.pipe()
        try:
            if sandbox is None:
                process = await cls._exec(argv, cwd, env, output, stdin, ready_fd, *keep)
                group = process.pid
            else:
                process, group = await cls._boxed(
                    argv, cwd, env, output, stdin, ready_fd, sandbox, box, keep
                )
        finally:
            os.close(ready_fd)
        try:
            await _read_to_end(ready, first=True)  # "x"; nothing if it failed before its gate
        except BaseException:
            _kill(process, group)
            raise
        finally:
            os.close(ready)
        return process, group

    @classmethod
    async def _boxed(
        cls,
        argv: list[str],
        cwd: Path,
        env: dict[str, str],
        output: int,
        stdin: int,
        stdout: int,
        sandbox: Sandbox,
        box: Box,
        keep: tuple[int, ...],
    ) -> tuple[asyncio.subprocess.Process, int]:
        info, info_fd = os.pipe()
        try:
            boxed = sandbox.command(argv, cwd, box, info_fd)
            process = await cls._exec(
                boxed, Path("/"), sandbox.environment(env), output, stdin, stdout, info_fd, *keep
            )
        finally:
            os.close(info_fd)
        try:
            group = int(json.loads(await _read_to_end(info) or b"{}").get("child-pid", 0))
        except BaseException:
            signal_group(process.pid, signal.SIGKILL)
            raise
        finally:
            os.close(info)
        return process, group or process.pid  # no group: bwrap failed before making the box

    @staticmethod
    async def _exec(
        argv: list[str],
        cwd: Path,
        env: dict[str, str],
        output: int,
        stdin: int,
        stdout: int,
        *keep: int,
    ) -> asyncio.subprocess.Process:
        return await asyncio.create_subprocess_exec(
            *argv,
            cwd=cwd,
            env=env,
            stdin=stdin,
            stdout=stdout,
            stderr=output,
            start_new_session=True,
            pass_fds=keep,
        )

    @property
    def pid(self) -> int:
        """The process, or the box's init: killing it ends everything in the box."""
        return self._group

    @property
    def returncode(self) -> int | None:
        return self._process.returncode

    async def wait(self) -> int:
        code = await self._process.wait()
        signal_group(self._group, signal.SIGKILL)  # whatever it left behind in its group
        cgroup, self._cgroup = self._cgroup, None
        try:
            if cgroup is not None:
                out_of_memory = cgroup.out_of_memory()
                await cgroup.remove()  # and with it whatever is left in it
        finally:
            self._pump.finish()  # the box is gone: all it wrote is in the pipe
        if cgroup is not None and out_of_memory:
            self._log.note(
                f"branchyard: out of memory: the kernel killed a process of this box "
                f"at its limit of {cgroup.limits.memory // MiB} MiB"
            )
        self._registry.remove_process(self._group)
        if self._network is not None:
            network, self._network = self._network, None
            await uninterrupted(asyncio.ensure_future(network.close()))
        return code

    async def terminate(self, grace: float) -> None:
        if self._process.returncode is None:
            self._signal(signal.SIGTERM)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(grace):
                    await asyncio.shield(self._process.wait())
        self._signal(signal.SIGKILL)
        await self.wait()

    def _signal(self, sig: signal.Signals) -> None:
        """Signal the process's group. A box's init that is still setting itself up has
        no group of its own yet: it is still in the outer bwrap's, which is signalled then
        (a group id is not handed out again while a process of the group lives)."""
        try:
            os.killpg(self._group, sig)
        except ProcessLookupError:
            signal_group(self._process.pid, sig)
        except PermissionError:
            pass


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


def reap_boxes(owner: str) -> list[int]:
    """Kill every bwrap started for ``owner`` that still runs, recorded or not (by the
    mark in its environment); the pids of the boxes' inits among them, one a box."""
    mark = f"{MARK}={owner}".encode()
    inits = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if mark not in (entry / "environ").read_bytes().split(b"\0"):
                continue
            status = (entry / "status").read_text()
        except OSError:
            continue
        with contextlib.suppress(ProcessLookupError):
            os.kill(int(entry.name), signal.SIGKILL)
        nspid = next(
            (line.split()[1:] for line in status.splitlines() if line.startswith("NSpid:")), []
        )
        if nspid[1:] and nspid[-1] == "1":  # pid 1 of its namespace: the box's init
            inits.append(int(entry.name))
    return inits
