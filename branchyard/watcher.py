"""The watcher: notices pushes and reports branch heads to the engine.

A repo on this machine is watched by a cheap stat of its refs (directory and
file times, no process) several times a second; only when that changes does it
run ``git ls-remote``. A remote repo is asked with ``git ls-remote`` every poll
interval, which transfers only the ref list; it is fetched only when a head
moved. Either way the engine gets a :class:`~branchyard.model.RepoHeads` when,
and only when, something changed.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Awaitable, Callable
from pathlib import Path

from branchyard.errors import BranchyardError
from branchyard.git import Sources, local_path, ls_remote
from branchyard.model import Repo, RepoHeads

log = logging.getLogger(__name__)

LOCAL_INTERVAL = 0.1
ERROR_INTERVAL = 2.0  # seconds between tries of a repo that could not be read
OnHeads = Callable[[RepoHeads], Awaitable[None]]
Fingerprint = tuple[tuple[str, int, int], ...]


def git_dir_of(path: Path) -> Path:
    dot_git = path / ".git"
    return dot_git if dot_git.is_dir() else path


def refs_fingerprint(git_dir: Path) -> Fingerprint:
    """Names, mtimes and sizes of every loose ref, ``packed-refs`` and ``HEAD``."""
    seen: list[tuple[str, int, int]] = []
    for name in ("HEAD", "packed-refs"):
        try:
            info = os.stat(git_dir / name)
        except FileNotFoundError:
            continue
        seen.append((name, info.st_mtime_ns, info.st_size))
    stack = [git_dir / "refs" / "heads"]
    while stack:
        try:
            entries = list(os.scandir(stack.pop()))
        except FileNotFoundError:
            continue
        for entry in entries:
            if entry.is_dir(follow_symlinks=False):
                stack.append(Path(entry.path))
            else:
                info = entry.stat(follow_symlinks=False)
                seen.append((entry.path, info.st_mtime_ns, info.st_size))
    return tuple(sorted(seen))


class Watcher:
    def __init__(self, sources: Sources, on_heads: OnHeads, poll_interval: float) -> None:
        self._sources = sources
        self._on_heads = on_heads
        self._poll_interval = poll_interval
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self.errors: dict[str, str] = {}  # repo -> why it could not be read, while it can't

    def watch(self, repo: Repo) -> None:
        if repo.name not in self._tasks:
            self._tasks[repo.name] = asyncio.create_task(
                self._watch(repo), name=f"watch {repo.name}"
            )

    def unwatch(self, name: str) -> None:
        task = self._tasks.pop(name, None)
        self.errors.pop(name, None)
        if task:
            task.cancel()

    async def close(self) -> None:
        tasks = list(self._tasks.values())
        self._tasks.clear()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _watch(self, repo: Repo) -> None:
        path = local_path(repo.url)
        last: RepoHeads | None = None
        fingerprint: Fingerprint | None = None
        source = self._sources(repo.url)
        while True:
            interval = self._poll_interval if path is None else LOCAL_INTERVAL
            if path is not None:
                current = refs_fingerprint(git_dir_of(path))
                changed, fingerprint = current != fingerprint, current
            else:
                changed = True
            if changed:
                try:
                    heads = await ls_remote(repo.url)
                    seen = RepoHeads(repo.name, heads.default_branch or "", heads.branches)
                    if seen != last:
                        await source.sync()
                        await self._on_heads(seen)
                        last = seen
                    self._clear_error(repo.name)
                except BranchyardError as exc:
                    self._set_error(repo.name, exc.message)
                    fingerprint = None
                    interval = max(interval, ERROR_INTERVAL)
            await asyncio.sleep(interval)

    def _set_error(self, name: str, message: str) -> None:
        if self.errors.get(name) != message:
            log.warning("watching %s: %s", name, message)
            self.errors[name] = message

    def _clear_error(self, name: str) -> None:
        if self.errors.pop(name, None) is not None:
            log.info("watching %s: reachable again", name)
