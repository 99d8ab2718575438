"""The local runtime: each revision is a checkout, a cached venv and processes here.

Layout under the home::

    builds/NAMESPACE/SERVICE/vORDINAL-SHA7/   the checkout, removed when the revision stops
    venvs/HASH/                               shared environments (see ``venvs``)
    logs/NAMESPACE/SERVICE/vORDINAL.log       the processes' output
    logs/NAMESPACE/SERVICE/vORDINAL.build.log fetch, install and build output

Every process runs in its own session, so stopping a revision signals the
whole process group: SIGTERM, then SIGKILL after the grace period.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import time
from collections.abc import Callable
from pathlib import Path

from branchyard.errors import BuildFailed
from branchyard.git import Source
from branchyard.runtime import Address, RevisionSpec
from branchyard.runtime.venvs import VenvCache, run_logged

STOP_GRACE = 10.0
KEEP_LOGS = 10  # revisions per service whose logs are kept
HEALTH_INTERVAL = 0.02
LOOPBACK = "127.0.0.1"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


async def probe(port: int, path: str, timeout: float = 1.0) -> int | None:
    """The HTTP status ``GET path`` gets from the local port, or None if no answer."""
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(LOOPBACK, port)
            try:
                writer.write(f"GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n".encode())
                status_line = await reader.readline()
            finally:
                writer.close()
    except (OSError, TimeoutError):
        return None
    parts = status_line.split()
    return int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else None


def _signal_group(process: asyncio.subprocess.Process, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, sig)


async def _terminate(process: asyncio.subprocess.Process, grace: float) -> None:
    if process.returncode is None:
        _signal_group(process, signal.SIGTERM)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(process.wait(), grace)
    _signal_group(process, signal.SIGKILL)
    await process.wait()


def _prune_logs(directory: Path, up_to: int) -> None:
    """Delete the logs of revisions with an ordinal of ``up_to`` or less."""
    for log in directory.glob("v*.log"):
        ordinal = log.name[1:].split(".", 1)[0]
        if ordinal.isdigit() and int(ordinal) <= up_to:
            log.unlink(missing_ok=True)


class LocalInstance:
    def __init__(
        self,
        web: asyncio.subprocess.Process,
        workers: list[asyncio.subprocess.Process],
        port: int,
        checkout: Path,
        release: Callable[[], None],
    ) -> None:
        self._web = web
        self._workers = workers
        self._port = port
        self._checkout = checkout
        self._release = release
        self._stopped = False

    @property
    def address(self) -> Address:
        return (LOOPBACK, self._port)

    @property
    def pid(self) -> int | None:
        return self._web.pid

    async def wait(self) -> int:
        return await self._web.wait()

    async def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        await asyncio.gather(*(_terminate(p, STOP_GRACE) for p in [self._web, *self._workers]))
        shutil.rmtree(self._checkout, ignore_errors=True)
        self._release()


class LocalRuntime:
    def __init__(self, home: Path, sources: Callable[[str], Source]) -> None:
        self._builds = home / "builds"
        self._logs = home / "logs"
        self._sources = sources
        self.venvs = VenvCache(home / "venvs")
        self.venvs.root.mkdir(parents=True, exist_ok=True)

    def log_path(self, namespace: str, service: str, ordinal: int, build: bool) -> Path:
        suffix = ".build.log" if build else ".log"
        return self._logs / namespace / service / f"v{ordinal}{suffix}"

    def discard(self, namespace: str, service: str) -> None:
        for root in (self._logs, self._builds):
            shutil.rmtree(root / namespace / service, ignore_errors=True)
            with contextlib.suppress(OSError):
                (root / namespace).rmdir()  # only if no other service is left there

    async def deploy(self, spec: RevisionSpec) -> LocalInstance:
        build_log = self.log_path(spec.namespace, spec.service, spec.ordinal, build=True)
        build_log.parent.mkdir(parents=True, exist_ok=True)
        _prune_logs(build_log.parent, spec.ordinal - KEEP_LOGS)
        checkout = self._builds / spec.namespace / spec.service / f"v{spec.ordinal}-{spec.sha[:7]}"
        shutil.rmtree(checkout, ignore_errors=True)
        checkout.parent.mkdir(parents=True, exist_ok=True)
        venv: Path | None = None
        processes: list[asyncio.subprocess.Process] = []
        try:
            source = self._sources(spec.repo_url)
            await source.ensure(spec.sha)
            await source.checkout(spec.sha, checkout)
            venv = await self.venvs.acquire(checkout, build_log)
            env = self._env(spec, venv)
            for step in spec.manifest.build:
                code = await run_logged(["/bin/sh", "-c", step], checkout, build_log, env)
                if code != 0:
                    raise BuildFailed(
                        f"build step `{step}` exited {code}; see: branchyard logs --build"
                    )
            port = free_port()
            log = self.log_path(spec.namespace, spec.service, spec.ordinal, build=False)
            web = await self._spawn(spec.manifest.web, checkout, {**env, "PORT": str(port)}, log)
            processes.append(web)
            for _, command in spec.manifest.workers:
                processes.append(await self._spawn(command, checkout, env, log))
            await self._wait_healthy(spec, web, port)
        except BaseException:
            await asyncio.gather(*(_terminate(p, 1.0) for p in processes))
            shutil.rmtree(checkout, ignore_errors=True)
            if venv is not None:
                self.venvs.release(venv)
            raise
        held = venv
        return LocalInstance(web, processes[1:], port, checkout, lambda: self.venvs.release(held))

    def _env(self, spec: RevisionSpec, venv: Path) -> dict[str, str]:
        base = {k: v for k, v in os.environ.items() if not k.startswith("BRANCHYARD_")}
        path = f"{venv / 'bin'}{os.pathsep}{base.get('PATH', os.defpath)}"
        base.pop("PYTHONHOME", None)
        return {**base, **spec.env, "PATH": path, "VIRTUAL_ENV": str(venv), "PYTHONUNBUFFERED": "1"}

    async def _spawn(
        self, command: str, cwd: Path, env: dict[str, str], log: Path
    ) -> asyncio.subprocess.Process:
        with log.open("ab") as out:
            return await asyncio.create_subprocess_exec(
                "/bin/sh",
                "-c",
                command,
                cwd=cwd,
                env=env,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=out,
                stderr=asyncio.subprocess.STDOUT,
                start_new_session=True,
            )

    async def _wait_healthy(
        self, spec: RevisionSpec, web: asyncio.subprocess.Process, port: int
    ) -> None:
        path = spec.manifest.health_path
        deadline = time.monotonic() + spec.manifest.health_timeout
        last: int | None = None
        while time.monotonic() < deadline:
            if web.returncode is not None:
                raise BuildFailed(
                    f"exited with code {web.returncode} before passing its health check; "
                    "see: branchyard logs"
                )
            last = await probe(port, path) or last
            if last is not None and 200 <= last < 400:
                return
            await asyncio.sleep(HEALTH_INTERVAL)
        answer = f"last answer {last}" if last else "no answer"
        raise BuildFailed(
            f"health check GET {path} did not pass within "
            f"{spec.manifest.health_timeout:g} s ({answer})"
        )

    async def close(self) -> None:
        """Nothing to close: instances are stopped by the engine."""
