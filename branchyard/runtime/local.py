"""The local runtime: each revision is a checkout, a cached venv and processes here.

Layout under the home::

    builds/NAMESPACE/SERVICE/vORDINAL-SHA7/    the checkout, kept until pruned: the box user's,
                                               unpacked in a box (see ``unpack``)
    builds/NAMESPACE/SERVICE/vORDINAL-SHA7.ok  written when its build succeeded: the keys of
                                               its environment (``venvs.Wanted``)
    venvs/KEY/                                 environments by what goes in and who wrote
                                               them; the baseline's read by branches (``venvs``)
    logs/NAMESPACE/SERVICE/vORDINAL.log        the processes' output (the daemon writes it), rotated
                                               at 10 MiB
    logs/NAMESPACE/SERVICE/vORDINAL.build.log  fetch, install and build output, the same
    logs/NAMESPACE/SERVICE/vORDINAL*.log.1     the older part of a rotated log (see ``logs``)
    scratch/NAMESPACE/SERVICE/vORDINAL/        the running revision's writable area (its HOME)
    uv-cache/NAMESPACE/SERVICE/                the uv cache of one service's installs in one
                                               namespace, deleted with the service

In a sandbox (see ``sandbox``) a build step sees its checkout (writable) and its
environment; a service process sees both read-only and writes only its scratch
area, which its web and workers share, and which goes when the revision stops
(and at the daemon's start: nothing runs then). Each box has an explicit
environment (see ``environment``) and, given ``cgroups``, a cgroup of its own with
the service's limits (the manifest's ``memory:``, else the defaults; see ``cgroups``).

The runtime also holds what peers and people reach services through on the router:
one peer listener per (namespace, peer), on the port the store kept for it, so a
``<PEER>_URL`` stays the same across deploys and daemon restarts; and the router's
main port for public URLs.

A build found on disk with its ``.ok`` mark is used as it is, so a rollback,
or a deploy after a daemon restart, starts without building. Every process is
supervised (see ``supervisor``); the web process is health-checked before the
instance is handed back, and again after every restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import time
from collections.abc import AsyncIterator, Callable, Collection
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Protocol

from branchyard.errors import BuildFailed
from branchyard.git import Source
from branchyard.naming import dns_label
from branchyard.router import Router
from branchyard.router.dial import Dialer
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
from branchyard.runtime import logs as logfiles
from branchyard.runtime.cgroups import Cgroups, Limits
from branchyard.runtime.environment import NOTHING_OUTSIDE, Outside
from branchyard.runtime.logs import LOG_MAX, Appender, Appenders, last_lines
from branchyard.runtime.processes import (
    LOOPBACK,
    LocalProcess,
    Ports,
    Registry,
    reap_boxes,
    reap_leftovers,
    uninterrupted,
)
from branchyard.runtime.sandbox import NOTHING, Box, Sandbox
from branchyard.runtime.supervisor import FirstStartFailed, Process, Spawn, Supervisor
from branchyard.runtime.unpack import check_out
from branchyard.runtime.venvs import VenvCache, Wanted, run_logged, wanted
from branchyard.trees import MAX_CHECKOUT

Slot = tuple[str, str]

STOP_GRACE = 10.0  # seconds between SIGTERM and SIGKILL
# Put before a process's command: its shell outlives the SIGTERM its process group gets
# (a trap, which the commands it runs do not inherit) and exits with the command, once
# that has finished. A shell that died of it at once ended its box's PID namespace (or,
# unboxed, had the rest of its group killed as it ended), so a service never had the
# grace to finish what it does on SIGTERM.
OUTLIVE_SIGTERM = "trap : TERM\n"
KEEP_LOGS = 10  # revisions per service whose logs are kept
HEALTH_INTERVAL = 0.02


async def probe(dialer: Dialer, port: int, path: str, timeout: float = 1.0) -> int | None:
    """The HTTP status ``GET path`` gets from the local port (reached as the router
    reaches it: inside the service's box), or None if no answer."""
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await dialer.open_connection((LOOPBACK, port))
            try:
                writer.write(f"GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n".encode())
                status_line = await reader.readline()
            finally:
                writer.close()
    except (OSError, TimeoutError):
        return None
    parts = status_line.split()
    return int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else None


def _prune_logs(directory: Path, up_to: int) -> None:
    """Delete the logs of revisions with an ordinal of ``up_to`` or less."""
    for log in directory.glob("v*.log*"):
        ordinal = log.name[1:].split(".", 1)[0]
        if ordinal.isdigit() and int(ordinal) <= up_to:
            log.unlink(missing_ok=True)


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink())


class HealthCheck:
    """``GET path`` on the port until it answers 2xx or 3xx, the process exits,
    or ``timeout`` seconds pass; ``failure`` says which, for the message, and
    ``output`` holds the log's last lines as it gave up: what the process said
    before it was stopped, not what its shell says of the stop."""

    def __init__(self, dialer: Dialer, port: int, path: str, timeout: float, log: Path) -> None:
        self.dialer = dialer
        self.port = port
        self.path = path
        self.timeout = timeout
        self.log = log
        self.failure = ""
        self.output: list[str] = []

    async def __call__(self, process: Process) -> bool:
        deadline = time.monotonic() + self.timeout
        last: int | None = None
        while time.monotonic() < deadline:
            if process.returncode is not None:
                self.failure = f"exited with code {process.returncode}"
                return False
            last = await probe(self.dialer, self.port, self.path) or last
            if last is not None and 200 <= last < 400:
                return True
            await asyncio.sleep(HEALTH_INTERVAL)
        answer = f"last answer {last}" if last else "no answer"
        self.failure = (
            f"health check GET {self.path} on port {self.port} did not pass "
            f"within {self.timeout:g} s ({answer})"
        )
        self.output = last_lines(self.log, 3)
        return False


def _first_start_message(
    web: Supervisor, health: HealthCheck, exc: FirstStartFailed, log: Path
) -> str:
    """Why a revision did not start, with the last lines it wrote."""
    if web.state is not InstanceState.FAILED:
        message = f"a worker could not start: {exc.message}"
    elif health.failure.startswith("exited") or exc.exit_code is not None:
        code = exc.exit_code if exc.exit_code is not None else web.exit_code
        message = f"exited with code {code} before passing its health check"
    else:
        message = health.failure or exc.message
    lines = health.output or last_lines(log, 3)
    return message + (f"; last output: {' | '.join(lines)}" if lines else "")


async def _stop_all(supervisors: list[Supervisor], grace: float = 1.0) -> None:
    """Stop ``supervisors``; return once their processes are gone, even if cancelled
    meanwhile, so that a start cancelled twice in a row (a burst of deploys) cannot
    leave its processes running."""
    await uninterrupted(asyncio.gather(*(s.stopping(grace) for s in supervisors)))


class Records(Registry, Protocol):
    """What the runtime keeps in the store across daemons: the process groups it
    started, and the port of each peer listener."""

    def processes(self) -> list[tuple[int, str, str]]: ...

    def address(self, slot: Slot) -> int | None: ...

    def addresses(self) -> list[tuple[str, str, int]]: ...

    def set_address(self, slot: Slot, port: int) -> None: ...


@dataclass
class LocalBuild:
    spec: RevisionSpec
    checkout: Path
    venv: Path
    env: dict[str, str] = field(default_factory=dict)


def _local(build: Build) -> LocalBuild:
    if not isinstance(build, LocalBuild):
        raise TypeError(f"not a local build: {build!r}")
    return build


class LocalInstance:
    def __init__(
        self,
        web: Supervisor,
        workers: list[Supervisor],
        port: int,
        log: Appender,
        give_back: Callable[[], None],
    ) -> None:
        self._web = web
        self._workers = workers
        self._port = port
        self.log = log
        self._give_back = give_back
        self.last_output: tuple[str, ...] = ()

    @property
    def address(self) -> Address:
        return (LOOPBACK, self._port)

    @property
    def pid(self) -> int | None:
        return self._web.pid

    @property
    def state(self) -> InstanceState:
        return self._web.state

    @property
    def exit_code(self) -> int | None:
        return self._web.exit_code

    @property
    def restarts(self) -> int:
        return self._web.restarts

    async def stop(self, grace: float = STOP_GRACE) -> None:
        await asyncio.gather(*(s.stop(grace) for s in [self._web, *self._workers]))
        self._give_back()


class LocalRuntime:
    def __init__(
        self,
        home: Path,
        sources: Callable[[str], Source],
        records: Records,
        router: Router,
        stop_grace: float = STOP_GRACE,
        log_limit: int = LOG_MAX,
        sandbox: Sandbox | None = None,
        max_checkout: int = MAX_CHECKOUT,
        outside: Outside = NOTHING_OUTSIDE,
        cgroups: Cgroups | None = None,
    ) -> None:
        self._builds = home / "builds"
        self._logs = home / "logs"
        self._scratch = home / "scratch"
        shutil.rmtree(self._scratch, ignore_errors=True)
        self._scratch_users: dict[Path, int] = {}
        self._owner = str(home.resolve())  # marks the boxes this home's daemons start
        self._sandbox = replace(sandbox, owner=self._owner) if sandbox else None
        self._sources = sources
        self._records = records
        self._router = router
        self._peers: set[Slot] = set()  # the peer listeners this runtime opened
        self._stop_grace = stop_grace
        self._ports = Ports()
        self._running: set[LocalInstance] = set()
        self._appenders = Appenders(log_limit)  # every log's one writer, rotating it
        self._max_checkout = max_checkout
        self._outside = outside
        self._cgroups = cgroups
        self.venvs = VenvCache(home / "venvs", records, self._sandbox, outside, cgroups)
        self.venvs.root.mkdir(parents=True, exist_ok=True)

    def _log_path(self, log: LogName) -> Path:
        suffix = ".build.log" if log.build else ".log"
        return self._logs / log.namespace / log.service / f"v{log.ordinal}{suffix}"

    def _checkout(self, spec: RevisionSpec) -> Path:
        return self._builds / spec.namespace / spec.service / f"v{spec.ordinal}-{spec.sha[:7]}"

    # building

    async def build(self, spec: RevisionSpec) -> LocalBuild:
        """Build ``spec``, its output in its build log."""
        path = self._log_path(LogName(spec.namespace, spec.service, spec.ordinal, build=True))
        path.parent.mkdir(parents=True, exist_ok=True)
        _prune_logs(path.parent, spec.ordinal - KEEP_LOGS)
        with self._appenders.opened(path) as build_log:
            return await self._build(spec, build_log)

    async def _build(self, spec: RevisionSpec, build_log: Appender) -> LocalBuild:
        checkout = self._checkout(spec)
        done = checkout.with_name(checkout.name + ".ok")
        kept = Wanted.from_mark(done.read_text()) if done.exists() and checkout.is_dir() else None
        if kept is not None:
            ready = await self.venvs.acquire(
                kept, checkout, build_log, spec.namespace, spec.service
            )
            return LocalBuild(spec, checkout, ready, self._env(spec, ready))
        shutil.rmtree(checkout, ignore_errors=True)
        checkout.parent.mkdir(parents=True, exist_ok=True)
        venv: Path | None = None
        try:
            source = self._sources(spec.repo_url)
            await source.ensure(spec.sha)
            tree = await check_out(
                source,
                spec.sha,
                checkout,
                self._max_checkout,
                build_log,
                self._records,
                self._sandbox,
            )
            needed = await wanted(source, spec.sha, tree, spec.namespace)
            venv = await self.venvs.acquire(
                needed, checkout, build_log, spec.namespace, spec.service
            )
            env = self._env(spec, venv)
            for step in spec.manifest.build:
                code = await run_logged(
                    ["/bin/sh", "-c", step],
                    checkout,
                    build_log,
                    env,
                    self._records,
                    self._sandbox,
                    Box((venv,), (checkout,)),
                    self._cgroups,
                    self._limits(spec),
                )
                if code != 0:
                    raise BuildFailed(f"build step `{step}` exited {code}")
        except BaseException:
            shutil.rmtree(checkout, ignore_errors=True)
            if venv is not None:
                self.venvs.release(venv)
            raise
        done.write_text(needed.mark())
        return LocalBuild(spec, checkout, venv, env)

    def _env(self, spec: RevisionSpec, venv: Path, home: Path = NOTHING.home) -> dict[str, str]:
        """A box's whole environment: only what ``environment`` lets through of the
        daemon's, the spec's env, the environment's ``bin`` first on the search path."""
        path = f"{venv / 'bin'}{os.pathsep}{self._outside.box({}, home)['PATH']}"
        own = {**spec.env, "PATH": path, "VIRTUAL_ENV": str(venv), "PYTHONUNBUFFERED": "1"}
        return self._outside.box(own, home)

    def _limits(self, spec: RevisionSpec) -> Limits | None:
        """What each box of ``spec`` may use: the defaults, with the manifest's memory and
        CPU where it says them."""
        manifest = spec.manifest
        if self._cgroups is None or (manifest.memory is None and manifest.cpu is None):
            return None
        defaults = self._cgroups.defaults
        return replace(
            defaults, memory=manifest.memory or defaults.memory, cpu=manifest.cpu or defaults.cpu
        )

    def release(self, build: Build) -> None:
        self.venvs.release(_local(build).venv)

    async def gc(self) -> dict[str, int]:
        return {"environments_removed": self.venvs.gc()}

    async def prune(self, namespace: str, service: str, keep: Collection[int]) -> int:
        freed = 0
        for done in (self._builds / namespace / service).glob("v*.ok"):
            ordinal = done.name[1:].split("-", 1)[0]
            if ordinal.isdigit() and int(ordinal) not in keep:
                checkout = done.with_suffix("")
                freed += _size(checkout)
                done.unlink(missing_ok=True)
                shutil.rmtree(checkout, ignore_errors=True)
        return freed

    async def discard(self, namespace: str, service: str) -> None:
        for root in (self._logs, self._builds, self.venvs.caches):
            shutil.rmtree(root / namespace / service, ignore_errors=True)
            with contextlib.suppress(OSError):
                (root / namespace).rmdir()  # only if no other service is left there

    # running

    async def start(self, build: Build, on_change: OnChange) -> LocalInstance:
        build = _local(build)
        spec = build.spec
        path = self._log_path(LogName(spec.namespace, spec.service, spec.ordinal))
        path.parent.mkdir(parents=True, exist_ok=True)
        log = self._appenders.open(path)
        scratch = self._take_scratch(spec)
        box = Box((build.checkout, build.venv), (scratch,), home=scratch)
        port = self._ports.take()
        env = {**build.env, "HOME": str(scratch)}
        web_env = {**env, "HOST": LOOPBACK, "PORT": str(port)}
        instance: LocalInstance | None = None

        def changed(web: Supervisor) -> None:
            if instance is not None:
                if web.state is InstanceState.FAILED:
                    instance.last_output = tuple(last_lines(path))
                on_change(instance)

        def spawner(command: str, env: dict[str, str], what: str) -> Spawn:
            async def spawn() -> LocalProcess:
                return await LocalProcess.spawn(
                    ["/bin/sh", "-c", OUTLIVE_SIGTERM + command],
                    build.checkout,
                    env,
                    log,
                    self._records,
                    f"{spec.name} {what}",
                    self._sandbox,
                    box,
                    self._cgroups,
                    self._limits(spec),
                )

            return spawn

        health = HealthCheck(
            self._router.dialer,
            port,
            spec.manifest.health_path,
            spec.manifest.health_timeout,
            path,
        )
        web = Supervisor(
            f"{spec.name} web",
            spawner(spec.manifest.web, web_env, "web"),
            health,
            grace=self._stop_grace,
            on_change=changed,
        )
        workers = [
            Supervisor(f"{spec.name} {name}", spawner(command, env, name), grace=self._stop_grace)
            for name, command in spec.manifest.workers
        ]
        supervisors = [web, *workers]
        try:
            await web.start()
            for worker in workers:
                await worker.start()
        except BaseException as exc:
            try:
                await _stop_all(supervisors)
            finally:
                self._ports.give_back(port)
                self._drop_scratch(scratch)
                self._appenders.close(log)
            if isinstance(exc, FirstStartFailed):
                raise BuildFailed(_first_start_message(web, health, exc, path)) from None
            raise

        def give_back() -> None:
            self._ports.give_back(port)
            self._drop_scratch(scratch)
            self._appenders.close(log)
            if instance is not None:
                self._running.discard(instance)

        instance = LocalInstance(web, workers, port, log, give_back)
        self._running.add(instance)
        return instance

    def _take_scratch(self, spec: RevisionSpec) -> Path:
        """The revision's scratch area: made empty for its first instance, shared by a
        restart's new one while the old one drains."""
        scratch = self._scratch / spec.namespace / spec.service / f"v{spec.ordinal}"
        if not self._scratch_users.get(scratch):
            shutil.rmtree(scratch, ignore_errors=True)
            scratch.mkdir(parents=True)
            if self._sandbox is not None:
                self._sandbox.give(scratch)
        self._scratch_users[scratch] = self._scratch_users.get(scratch, 0) + 1
        return scratch

    def _drop_scratch(self, scratch: Path) -> None:
        """One instance less; the area goes with the revision's last."""
        left = self._scratch_users.pop(scratch, 1) - 1
        if left:
            self._scratch_users[scratch] = left
        else:
            shutil.rmtree(scratch, ignore_errors=True)

    # after a daemon ended

    async def recover(self) -> int:
        """Kill the boxes and process groups a dead daemon left running (how many), and
        listen again on the peer ports it had handed out (a port taken meanwhile is given up)."""
        leftovers = self._records.processes()
        boxes = reap_boxes(self._owner)
        killed = reap_leftovers(left for left in leftovers if left[0] not in boxes)
        for pgid, _, _ in leftovers:
            self._records.remove_process(pgid)
        if self._cgroups is not None:
            await self._cgroups.clear()  # the boxes' cgroups it left, and what is in them
        for namespace, service, port in self._records.addresses():
            with contextlib.suppress(OSError):
                await self._router.open_peer_listener(namespace, service, port=port)
                self._peers.add((namespace, service))
        return len(boxes) + len(killed)

    # addresses

    async def peer_url(self, namespace: str, peer: str) -> str:
        return f"http://{LOOPBACK}:{await self._peer_port((namespace, peer))}"

    async def _peer_port(self, slot: Slot) -> int:
        """The stable loopback port through which peers reach ``slot``: the one the store
        kept for it if it can be had again, else a new one, which the store keeps."""
        port = self._router.peer_port(*slot)
        if port is not None:
            return port
        self._peers.add(slot)
        stored = self._records.address(slot)
        try:
            port = await self._router.open_peer_listener(*slot, port=stored or 0)
        except OSError:
            port = await self._router.open_peer_listener(*slot)
        if port != stored:
            self._records.set_address(slot, port)
        return port

    async def sync_peers(self, wanted: Collection[Slot]) -> None:
        for slot in self._peers - set(wanted):
            await self._router.close_peer_listener(*slot)
        self._peers &= set(wanted)

    def public_url(self, namespace: str, service: str) -> str:
        return f"http://{dns_label(service)}.{namespace}.localhost:{self._router.main_port}/"

    def home_url(self) -> str:
        return f"http://localhost:{self._router.main_port}/"

    # logs

    async def has_log(self, log: LogName) -> bool:
        return self._log_path(log).exists()

    async def missing_log(self, log: LogName) -> str | None:
        return None  # files are kept: one not yet written may yet be

    async def tail_log(self, log: LogName, size: int) -> bytes:
        try:
            return logfiles.tail(self._log_path(log), size)
        except OSError:
            return b""

    async def last_lines(self, log: LogName, count: int = LAST_LINES) -> list[str]:
        return logfiles.last_lines(self._log_path(log), count)

    def read_log(
        self, log: LogName, lines: int | None = None, pause: Pause | None = None
    ) -> AsyncIterator[bytes]:
        path = self._log_path(log)
        if pause is None:
            return logfiles.read_in_thread(path, lines)
        return logfiles.follow(path, lines, pause)

    def detach(self) -> None:
        return None  # processes here end with the daemon: the engine stops them

    async def close(self) -> None:
        if self._cgroups is not None:
            await self._cgroups.close()
