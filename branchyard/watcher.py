"""The watcher: notices pushes and reports branch heads to the engine.

A repo on this machine is watched by a cheap stat of its refs (directory and
file times, no process) ten times a second, and on Linux the moment inotify
says its refs moved (a push was noticed 50 ms later on average at the tick
alone); only when the stat changes does it run ``git ls-remote``. A remote
repo is asked with ``git ls-remote`` every poll interval, which transfers only
the ref list; it is fetched only when a head moved. Either way the engine gets
a :class:`~branchyard.model.RepoHeads` when, and only when, something changed.

A repo that cannot be read is looked at again (:func:`after_error`): after a
temporary error (a remote that cannot be reached) with capped exponential
backoff, 2 s, 4 s, ... 60 s, and the error says when; after a permanent one
(not a repository) every 2 s, in case it is fixed. Never sooner than a remote
repo's poll interval. Heads the engine could not take (the store could not be
written: a full disk) are a failed look like any other: the repo's error says
why, and the same heads are handed over again until they are taken, so a push
made while the disk was full deploys once there is space.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import struct
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from branchyard.errors import is_temporary, reason_of
from branchyard.git import Sources, git_dir_of, local_path, ls_remote
from branchyard.model import Repo, RepoHeads
from branchyard.retry import BACKOFF, Backoff, Retry

log = logging.getLogger(__name__)

LOCAL_INTERVAL = 0.1
ERROR_INTERVAL = 2.0  # seconds between tries of a repo with a permanent error
OnHeads = Callable[[RepoHeads], Awaitable[None]]
Fingerprint = tuple[tuple[str, int, int, int], ...]


def next_poll(due: float, started: float, interval: float) -> float:
    """When to poll next: on the fixed cadence of the last due time, so that
    polls do not drift later by however long each took to start; one interval
    after ``started`` if that cadence has fallen behind (or there was none)."""
    cadence = due + interval
    return cadence if cadence > started else started + interval


def after_error(
    exc: Exception, failures: int, floor: float, backoff: Backoff = BACKOFF
) -> tuple[float, str]:
    """How long until a repo that failed to be read ``failures`` times in a row is looked
    at again, and the error to show: a temporary one after the backoff, saying so, a
    permanent one after :data:`ERROR_INTERVAL`; never sooner than ``floor``. Any other
    error (the store could not be written: a full disk) is permanent, shown with its
    type: ``OperationalError: database or disk is full``."""
    if is_temporary(exc):
        pending = Retry(failures, max(backoff.delay(failures), floor), exc)
        return pending.delay, pending.note("fetch")
    message = str(exc) if isinstance(exc, OSError) else reason_of(exc)
    return max(ERROR_INTERVAL, floor), message


def refs_fingerprint(git_dir: Path) -> Fingerprint:
    """Names, mtimes, sizes and inodes of every loose ref, ``packed-refs`` and ``HEAD``.

    git replaces a ref by renaming a new file over it, so the inode changes even
    when two pushes land within one tick of the file system's clock."""
    seen: list[tuple[str, int, int, int]] = []
    for name in ("HEAD", "packed-refs"):
        try:
            info = os.stat(git_dir / name)
        except FileNotFoundError:
            continue
        seen.append((name, info.st_mtime_ns, info.st_size, info.st_ino))
    stack = [git_dir / "refs" / "heads"]
    while stack:
        try:
            entries = list(os.scandir(stack.pop()))
        except FileNotFoundError:
            continue
        for entry in entries:
            if entry.is_dir(follow_symlinks=False):
                stack.append(Path(entry.path))
            elif not entry.name.endswith(".lock"):  # a push's lock: renamed away any moment
                try:
                    info = entry.stat(follow_symlinks=False)
                except FileNotFoundError:  # a ref deleted as we looked
                    continue
                seen.append((entry.path, info.st_mtime_ns, info.st_size, info.st_ino))
    return tuple(sorted(seen))


# inotify(7): what a watch asks for, and the head of each event (wd, mask, cookie, len).
_IN_CLOSE_WRITE, _IN_MOVED_FROM, _IN_MOVED_TO = 0x8, 0x40, 0x80
_IN_CREATE, _IN_DELETE, _IN_ISDIR = 0x100, 0x200, 0x40000000
_WATCH_MASK = _IN_CLOSE_WRITE | _IN_MOVED_FROM | _IN_MOVED_TO | _IN_CREATE | _IN_DELETE
_EVENT = struct.Struct("iIII")


def ref_events(data: bytes) -> tuple[bool, bool]:
    """Whether raw inotify events say a ref may have moved, and whether a directory
    appeared (a branch named ``feature/x``: it must be watched too). A lock file, which
    git writes before renaming it over a ref, says nothing yet."""
    moved = new_directory = False
    offset = 0
    while offset + _EVENT.size <= len(data):
        _, mask, _, length = _EVENT.unpack_from(data, offset)
        name = data[offset + _EVENT.size : offset + _EVENT.size + length].rstrip(b"\0")
        offset += _EVENT.size + length
        if mask & _IN_ISDIR:
            new_directory = new_directory or bool(mask & (_IN_CREATE | _IN_MOVED_TO))
            moved = True
        elif not name.endswith(b".lock"):
            moved = True
    return moved, new_directory


class _Inotify:
    """Linux's inotify, through libc: calls ``on_move`` as soon as a watched repo's
    refs may have moved. Where there is none, :meth:`open` gives None and the
    watcher's tick alone notices."""

    def __init__(self, libc: ctypes.CDLL, fd: int, on_move: Callable[[], None]) -> None:
        self._libc = libc
        self._fd = fd
        self._on_move = on_move
        self._watches: dict[Path, set[int]] = {}
        asyncio.get_running_loop().add_reader(fd, self._read)

    @classmethod
    def open(cls, on_move: Callable[[], None]) -> _Inotify | None:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            fd = libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        except (OSError, AttributeError):
            return None
        return cls(libc, fd, on_move) if fd >= 0 else None

    def watch(self, git_dir: Path) -> None:
        """Watch ``git_dir`` (HEAD, packed-refs) and every directory of ``refs/heads``."""
        directories, stack = [git_dir], [git_dir / "refs" / "heads"]
        while stack:
            directory = stack.pop()
            directories.append(directory)
            with contextlib.suppress(OSError):
                stack += [Path(e.path) for e in os.scandir(directory) if e.is_dir()]
        for directory in directories:
            wd = self._libc.inotify_add_watch(self._fd, os.fsencode(directory), _WATCH_MASK)
            if wd >= 0:
                self._watches.setdefault(git_dir, set()).add(wd)

    def unwatch(self, git_dir: Path) -> None:
        for wd in self._watches.pop(git_dir, set()):
            self._libc.inotify_rm_watch(self._fd, wd)

    def _read(self) -> None:
        try:
            data = os.read(self._fd, 65536)
        except BlockingIOError:
            return
        moved, new_directory = ref_events(data)
        if new_directory:
            for git_dir in list(self._watches):
                self.watch(git_dir)
        if moved:
            self._on_move()

    def close(self) -> None:
        asyncio.get_running_loop().remove_reader(self._fd)
        os.close(self._fd)


@dataclass
class _Watched:
    repo: Repo
    git_dir: Path | None  # None for a remote repo
    last: RepoHeads | None = None
    fingerprint: Fingerprint | None = None
    due: float = 0.0  # loop time before which the repo is not looked at
    failures: int = 0  # checks that failed in a row
    check: asyncio.Task[None] | None = None  # an ls-remote in flight


class Watching(Protocol):
    """What the engine and the API use of a watcher (:class:`Watcher`; a stand-in that
    watches nothing in tests of the engine)."""

    @property
    def errors(self) -> Mapping[str, str]:
        """repo -> why it could not be read, while it can't."""
        ...

    def watch(self, repo: Repo) -> None: ...

    def unwatch(self, name: str) -> None: ...

    def poke(self, name: str) -> None: ...

    async def first_look(self) -> None: ...

    async def close(self) -> None: ...


class Watcher:
    """One loop for every repo: it wakes ten times a second, when inotify says a
    local repo's refs moved, and when a check ends; it stats local repos, and
    starts a check (``ls-remote``, then a fetch if heads moved) for each repo
    whose refs changed or whose poll interval is up. Checks run concurrently,
    at most one per repo."""

    def __init__(self, sources: Sources, on_heads: OnHeads, poll_interval: float) -> None:
        self._sources = sources
        self._on_heads = on_heads
        self._poll_interval = poll_interval
        self._watched: dict[str, _Watched] = {}
        self._loop: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._inotify: _Inotify | None = None
        self.errors: dict[str, str] = {}  # repo -> why it could not be read, while it can't

    def watch(self, repo: Repo) -> None:
        path = local_path(repo.url)
        watched = self._watched.setdefault(
            repo.name, _Watched(repo, git_dir_of(path) if path is not None else None)
        )
        if watched.git_dir is not None:
            self._inotify = self._inotify or _Inotify.open(self._wake.set)
            if self._inotify is not None:
                self._inotify.watch(watched.git_dir)
        if self._loop is None:
            self._loop = asyncio.create_task(self._run(), name="watcher")

    def unwatch(self, name: str) -> None:
        watched = self._watched.pop(name, None)
        self.errors.pop(name, None)
        if watched and watched.git_dir is not None and self._inotify is not None:
            self._inotify.unwatch(watched.git_dir)
        if watched and watched.check:
            watched.check.cancel()

    async def close(self) -> None:
        tasks = [w.check for w in self._watched.values() if w.check]
        if self._loop:
            tasks.append(self._loop)
        self._watched.clear()
        self._loop = None
        if self._inotify is not None:
            self._inotify.close()
            self._inotify = None
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def poke(self, name: str) -> None:
        """Look at a repo now, whatever its interval (a webhook said so)."""
        watched = self._watched.get(name)
        if watched is not None:
            watched.due = 0.0
            watched.fingerprint = None
            self._wake.set()

    async def first_look(self) -> None:
        """Return once every watched repo has been looked at (read, or failed) once."""
        while any(
            w.last is None and w.repo.name not in self.errors for w in self._watched.values()
        ):
            await asyncio.sleep(LOCAL_INTERVAL / 2)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            now = loop.time()
            for watched in list(self._watched.values()):
                if watched.check is None and now >= watched.due and self._changed(watched):
                    watched.check = asyncio.create_task(self._check(watched, now))
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._pause(loop.time())):
                    await self._wake.wait()
            self._wake.clear()

    def _pause(self, now: float) -> float:
        """Until the next tick, or sooner if a poll falls due before it."""
        dues = [w.due - now for w in self._watched.values() if w.check is None and w.due > now]
        return min([LOCAL_INTERVAL, *dues])

    def _changed(self, watched: _Watched) -> bool:
        if watched.git_dir is None:
            return True
        try:
            current: Fingerprint | None = refs_fingerprint(watched.git_dir)
        except OSError:  # unreadable refs: let the check run, and say why it fails
            current = None
        changed, watched.fingerprint = current is None or current != watched.fingerprint, current
        return changed

    async def _check(self, watched: _Watched, now: float) -> None:
        name = watched.repo.name
        try:
            heads = await ls_remote(watched.repo.url)
            seen = RepoHeads(name, heads.default_branch or "", heads.branches, heads.dangling_head)
            if seen != watched.last:
                await self._sources(watched.repo.url).sync()
                await self._on_heads(seen)
                watched.last = seen
            self._clear_error(name)
            watched.failures = 0
            if watched.git_dir is None:
                watched.due = next_poll(watched.due, now, self._poll_interval)
        except Exception as exc:  # whatever failed, the heads are looked at again
            watched.failures += 1
            floor = self._poll_interval if watched.git_dir is None else 0.0
            delay, message = after_error(exc, watched.failures, floor)
            self._set_error(name, message)
            watched.fingerprint = None
            watched.due = asyncio.get_running_loop().time() + delay  # "will retry in" from now
        finally:
            watched.check = None
            self._wake.set()  # refs that moved while it ran are looked at now

    def _set_error(self, name: str, message: str) -> None:
        if self.errors.get(name) != message:
            log.warning("watching %s: %s", name, message)
            self.errors[name] = message

    def _clear_error(self, name: str) -> None:
        if self.errors.pop(name, None) is not None:
            log.info("watching %s: reachable again", name)
