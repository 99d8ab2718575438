"""Virtual environments cached by the hash of a service's dependency files.

A commit that changes only code finds its environment ready and installs
nothing. Environments are made with ``uv`` (an order of magnitude faster than
pip) and kept up to :data:`KEEP` of them, least recently used first out.

What is installed is compiled to bytecode there and then, as pip does and uv
does not by default: a service only reads bytecode (its environment may say
``PYTHONDONTWRITEBYTECODE``, and it should not write into a shared environment
anyway), so without it every start compiles its imports again, which made a
Flask service's cold start two to three times slower.

In a sandbox, an install sees the checkout, writes only its environment and a
uv cache of the home's own (``HOME/uv-cache``), and reaches the network. Sandboxed
or not, its environment is the one ``environment`` gives an install, with that cache.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
import sys
import time
from pathlib import Path

import uv

from branchyard.errors import BuildFailed
from branchyard.runtime.cgroups import Cgroups, Limits
from branchyard.runtime.environment import NOTHING_OUTSIDE, Outside
from branchyard.runtime.processes import LocalProcess, Registry, uninterrupted
from branchyard.runtime.sandbox import NOTHING, Box, Sandbox

DEPENDENCY_FILES = ("requirements.txt", "pyproject.toml")
KEEP = 20
_READY = ".branchyard-ready"
_LAYOUT = b"compiled"  # environments made before they held bytecode hash differently


def dependency_hash(checkout: Path) -> str:
    digest = hashlib.sha256(sys.version.encode() + _LAYOUT)
    for name in DEPENDENCY_FILES:
        file = checkout / name
        if file.is_file():
            digest.update(name.encode() + b"\0" + file.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


class VenvCache:
    def __init__(
        self,
        root: Path,
        registry: Registry,
        sandbox: Sandbox | None = None,
        outside: Outside = NOTHING_OUTSIDE,
        cgroups: Cgroups | None = None,
    ) -> None:
        self.root = root
        self._outside = outside
        self._cgroups = cgroups
        self._registry = registry
        self._sandbox = sandbox
        self._cache = root.with_name("uv-cache")
        self._locks: dict[str, asyncio.Lock] = {}
        self._in_use: dict[Path, int] = {}

    async def acquire(self, checkout: Path, log: Path) -> Path:
        """The environment for ``checkout``'s dependencies, made if missing."""
        venv = self.root / dependency_hash(checkout)
        async with self._locks.setdefault(venv.name, asyncio.Lock()):
            if (venv / _READY).exists():
                os.utime(venv / _READY)
                with log.open("a") as out:
                    out.write(f"dependencies unchanged: reusing environment {venv.name}\n")
            else:
                await self._create(venv, checkout, log)
                self._prune()
        self._in_use[venv] = self._in_use.get(venv, 0) + 1
        return venv

    def release(self, venv: Path) -> None:
        left = self._in_use.get(venv, 1) - 1
        if left:
            self._in_use[venv] = left
        else:
            self._in_use.pop(venv, None)

    async def _create(self, venv: Path, checkout: Path, log: Path) -> None:
        shutil.rmtree(venv, ignore_errors=True)
        uv_bin = uv.find_uv_bin()
        interpreter = os.path.realpath(sys.executable)  # the base Python, which a box shows
        steps = [[uv_bin, "venv", "--quiet", "--python", interpreter, str(venv)]]
        python = str(venv / "bin" / "python")
        for name in DEPENDENCY_FILES:
            if (checkout / name).is_file():
                steps.append(
                    [uv_bin, "pip", "install", "--compile-bytecode", "--python", python, "-r", name]
                )
        own = {"UV_CACHE_DIR": str(self._cache), "UV_LINK_MODE": "copy"}
        env, box = self._outside.box(own, NOTHING.home, install=True), NOTHING
        if self._sandbox is not None:
            for writable in (venv, self._cache):
                writable.mkdir(exist_ok=True)
                self._sandbox.give(writable)
            box = Box((checkout, Path(uv_bin)), (venv, self._cache))
        for argv in steps:
            code = await run_logged(
                argv, checkout, log, env, self._registry, self._sandbox, box, self._cgroups
            )
            if code != 0:
                shutil.rmtree(venv, ignore_errors=True)
                what = "creating the environment" if argv[1] == "venv" else f"installing {argv[-1]}"
                raise BuildFailed(f"{what} failed (exit {code}); see: branchyard logs --build")
        (venv / _READY).touch()

    def _prune(self, keep: int = KEEP) -> int:
        """Remove the least recently used environments beyond ``keep``; how many."""
        ready = [p for p in self.root.iterdir() if (p / _READY).exists()]
        ready.sort(key=lambda p: (p / _READY).stat().st_mtime, reverse=True)
        removed = 0
        for old in ready[keep:]:
            if old not in self._in_use:
                shutil.rmtree(old, ignore_errors=True)
                removed += 1
        return removed

    def gc(self) -> int:
        """Remove every environment no kept build uses; how many."""
        return self._prune(keep=0)


async def run_logged(
    argv: list[str],
    cwd: Path,
    log: Path,
    env: dict[str, str],
    registry: Registry,
    sandbox: Sandbox | None = None,
    box: Box = NOTHING,
    cgroups: Cgroups | None = None,
    limits: Limits | None = None,
) -> int:
    """Run ``argv`` (in ``box`` if sandboxed, in a cgroup with ``limits`` given ``cgroups``)
    with its output appended to ``log``; its exit code."""
    with log.open("ab") as out:
        out.write(f"$ {' '.join(argv)}  [{time.strftime('%H:%M:%S')}]\n".encode())
    process = await LocalProcess.spawn(
        argv, cwd, env, log, registry, f"build: {argv[0]}", sandbox, box, cgroups, limits
    )
    try:
        return await process.wait()
    except asyncio.CancelledError:
        await uninterrupted(asyncio.ensure_future(process.terminate(0)))
        raise
