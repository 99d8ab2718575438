"""Virtual environments, cached by everything that goes into them and by who wrote them.

A commit that changes only code finds its environment ready and installs
nothing. Environments are made with ``uv`` (an order of magnitude faster than
pip) and kept up to :data:`KEEP` of them, least recently used first out.

**The key** (:func:`environment_key`) covers everything an install reads: the
interpreter and the layout, the repo's URL, the dependency files and every path
of the repo they reference (``./libs/vlib``, ``-r other.txt``: see
``requirements``), and the namespace that writes it. It is computed from git's
objects, never from the checkout (pushed files, which the daemon would read
with its rights): the blob id of each file and the tree or blob id of each
referenced path. A reference that does not resolve inside the tree, or a
``pyproject.toml`` with ``dynamic`` dependencies, keys on the commit's root
tree: no reuse, always right. So a change inside a vendored package installs
again, and two repos never share an environment.

**Who may read what**, as GitHub Actions scopes its caches: an environment is
written only by the installs of one (repo, namespace). The baseline's are read
by every namespace of the repo: a branch first looks for the environment the
baseline built of the same key, and else uses or builds its own; nothing a
branch builds is used by the baseline or another branch. Each (namespace,
service) has its own uv cache (``HOME/uv-cache/NS/SERVICE``), written only by
its installs and deleted with the service: no cache is shared writable across
branches, so an install (a build backend of the repo runs in it) cannot change
what another install copies.

What is installed is compiled to bytecode there and then, as pip does and uv
does not by default: a service only reads bytecode (its environment may say
``PYTHONDONTWRITEBYTECODE``, and it should not write into a shared environment
anyway), so without it every start compiles its imports again, which made a
Flask service's cold start two to three times slower.

In a sandbox, an install sees the checkout, writes only its environment and its
uv cache, and reaches the network. Sandboxed or not, its environment is the one
``environment`` gives an install, with that cache.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import posixpath
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import uv

from branchyard.errors import BuildFailed
from branchyard.git import Source
from branchyard.naming import BASELINE
from branchyard.runtime.cgroups import Cgroups, Limits
from branchyard.runtime.environment import NOTHING_OUTSIDE, Outside
from branchyard.runtime.logs import Appender, note_command
from branchyard.runtime.processes import LocalProcess, Registry, uninterrupted
from branchyard.runtime.requirements import pyproject_references, requirement_references, resolve
from branchyard.runtime.sandbox import NOTHING, Box, Sandbox
from branchyard.trees import Tree

DEPENDENCY_FILES = ("requirements.txt", "pyproject.toml")
KEEP = 20
MAX_FILES = 100  # files of requirements followed through -r and -c, at most
_READY = ".branchyard-ready"
_LAYOUT = b"compiled"  # environments made before they held bytecode hash differently


@dataclass(frozen=True)
class Wanted:
    """The environment a revision needs: the keys of its namespace's build and of the
    baseline's build of the same (None in the baseline), and its dependency files."""

    own: str
    baseline: str | None
    files: tuple[str, ...]

    def mark(self) -> str:
        """What a build's ``.ok`` mark keeps of it, for a restart (:meth:`from_mark`)."""
        return "\n".join([self.own, self.baseline or "", *self.files]) + "\n"

    @classmethod
    def from_mark(cls, text: str) -> Wanted | None:
        lines = text.splitlines()
        if len(lines) < 2:
            return None  # an older daemon's mark: the build is made again
        return cls(lines[0], lines[1] or None, tuple(lines[2:]))


async def inputs(source: Source, sha: str, tree: Tree) -> list[tuple[str, str]] | None:
    """(path, object id) of the dependency files and of every path they reference, or
    None where only the whole tree says what goes in (see the module's docstring)."""
    pending = [name for name in DEPENDENCY_FILES if tree.kind(name) == "blob"]
    found: dict[str, str] = {}
    while pending:
        path = pending.pop()
        oid = tree.oid(path)
        if path in found or oid is None:
            continue
        if len(found) >= MAX_FILES:
            return None
        found[path] = oid
        text = await source.read_file(sha, path) or ""
        references = (
            pyproject_references(text) if path == "pyproject.toml" else requirement_references(text)
        )
        if references is None:
            return None
        for reference in references:
            bases = {posixpath.dirname(path), ""}  # pip: the file's directory; paths: the root too
            targets = [t for b in bases if (t := resolve(b, reference.path)) is not None]
            present = [t for t in targets if tree.kind(t) is not None]
            if not present and reference.certain:
                return None
            for target in present:
                if reference.nested and tree.kind(target) == "blob":
                    pending.append(target)
                else:
                    found[target] = tree.oid(target) or ""
    return sorted(found.items())


def environment_key(
    repo_url: str,
    writer: str,
    found: list[tuple[str, str]] | None,
    tree: Tree,
    interpreter: bytes = sys.version.encode() + _LAYOUT,
) -> str:
    """The name of the environment ``writer`` (a namespace) builds from ``found`` with
    ``interpreter`` (this one's version and the layout; a pod's install says its own)."""
    digest = hashlib.sha256(interpreter)
    digest.update(f"\0{repo_url}\0{writer}\0".encode())
    for path, oid in found if found is not None else [("", tree.root)]:
        digest.update(f"{path}\0{oid}\0".encode(errors="surrogateescape"))
    return digest.hexdigest()[:16]


async def wanted(source: Source, sha: str, tree: Tree, namespace: str) -> Wanted:
    """The environment a revision of ``sha`` in ``namespace`` needs."""
    found = await inputs(source, sha, tree)
    own = environment_key(source.url, namespace, found, tree)
    baseline = environment_key(source.url, BASELINE, found, tree)
    files = tuple(name for name in DEPENDENCY_FILES if tree.kind(name) == "blob")
    return Wanted(own, None if namespace == BASELINE else baseline, files)


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
        self.caches = root.with_name("uv-cache")
        self._locks: dict[str, asyncio.Lock] = {}
        self._in_use: dict[Path, int] = {}

    def cache(self, namespace: str, service: str) -> Path:
        """The uv cache of one service's installs in one namespace."""
        return self.caches / namespace / service

    async def acquire(
        self, wanted: Wanted, checkout: Path, log: Appender, namespace: str, service: str
    ) -> Path:
        """The environment ``wanted`` names: the baseline's if it built it, else this
        namespace's own, made if missing (its install sees ``checkout``)."""
        if wanted.baseline is not None and (self.root / wanted.baseline / _READY).exists():
            venv, whose = self.root / wanted.baseline, f" (built in {BASELINE})"
        else:
            venv, whose = self.root / wanted.own, ""
        async with self._locks.setdefault(venv.name, asyncio.Lock()):
            if (venv / _READY).exists():
                os.utime(venv / _READY)
                log.note(f"dependencies unchanged: reusing environment {venv.name}{whose}")
            else:
                await self._create(
                    venv, wanted.files, checkout, log, self.cache(namespace, service)
                )
                self._prune()
        self._in_use[venv] = self._in_use.get(venv, 0) + 1
        return venv

    def release(self, venv: Path) -> None:
        left = self._in_use.get(venv, 1) - 1
        if left:
            self._in_use[venv] = left
        else:
            self._in_use.pop(venv, None)

    async def _create(
        self, venv: Path, files: tuple[str, ...], checkout: Path, log: Appender, cache: Path
    ) -> None:
        shutil.rmtree(venv, ignore_errors=True)
        uv_bin = uv.find_uv_bin()
        interpreter = os.path.realpath(sys.executable)  # the base Python, which a box shows
        steps = [[uv_bin, "venv", "--quiet", "--python", interpreter, str(venv)]]
        python = str(venv / "bin" / "python")
        for name in files:
            steps.append(
                [uv_bin, "pip", "install", "--compile-bytecode", "--python", python, "-r", name]
            )
        own = {"UV_CACHE_DIR": str(cache), "UV_LINK_MODE": "copy"}
        env, box = self._outside.box(own, NOTHING.home, install=True), NOTHING
        cache.mkdir(parents=True, exist_ok=True)
        venv.mkdir()
        if self._sandbox is not None:
            for writable in (venv, cache):
                self._sandbox.give(writable)
            box = Box((checkout, Path(uv_bin)), (venv, cache))
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
    log: Appender,
    env: dict[str, str],
    registry: Registry,
    sandbox: Sandbox | None = None,
    box: Box = NOTHING,
    cgroups: Cgroups | None = None,
    limits: Limits | None = None,
) -> int:
    """Run ``argv`` (in ``box`` if sandboxed, in a cgroup with ``limits`` given ``cgroups``)
    with its output appended to ``log``; its exit code."""
    note_command(log, argv)
    process = await LocalProcess.spawn(
        argv, cwd, env, log, registry, f"build: {argv[0]}", sandbox, box, cgroups, limits
    )
    try:
        return await process.wait()
    except asyncio.CancelledError:
        await uninterrupted(asyncio.ensure_future(process.terminate(0)))
        raise
