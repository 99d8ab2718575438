"""The watcher: when a remote repo is polled next, the fingerprint of refs, and inotify
waking it for a local repo's pushes."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import struct
from pathlib import Path

import pytest

from branchyard import watcher
from branchyard.errors import GitError, RemoteUnreachable
from branchyard.git import Sources
from branchyard.model import Repo, RepoHeads
from branchyard.watcher import Watcher, next_poll, ref_events, refs_fingerprint
from tests.conftest import git


@pytest.mark.parametrize(
    ("due", "started", "interval", "expected"),
    [
        (0.0, 100.0, 2.0, 102.0),  # the first poll sets the cadence
        (100.0, 100.0, 2.0, 102.0),  # started on time
        (100.0, 100.08, 2.0, 102.0),  # started a little late: the cadence holds
        (100.0, 101.9, 2.0, 102.0),  # started late but before the next due time
        (100.0, 102.5, 2.0, 104.5),  # fell a whole interval behind: a new cadence
        (100.0, 102.0, 2.0, 104.0),  # exactly one interval late
    ],
)
def test_polls_keep_their_cadence(
    due: float, started: float, interval: float, expected: float
) -> None:
    assert next_poll(due, started, interval) == pytest.approx(expected)


UNREACHABLE = "fatal: unable to access 'http://git/app.git/': Could not resolve host: git"
NOT_A_REPO = "fatal: '/gone' does not appear to be a git repository"


@pytest.mark.parametrize(
    ("error", "failures", "floor", "delay", "shown"),
    [
        # temporary: backoff from 2 s, doubling to 60 s, and the error says when
        (
            RemoteUnreachable(UNREACHABLE),
            1,
            0.0,
            2,
            f"fetch failed (will retry in 2 s): {UNREACHABLE}",
        ),
        (
            RemoteUnreachable(UNREACHABLE),
            2,
            0.0,
            4,
            f"fetch failed (will retry in 4 s): {UNREACHABLE}",
        ),
        (
            RemoteUnreachable(UNREACHABLE),
            9,
            0.0,
            60,
            f"fetch failed (will retry in 60 s): {UNREACHABLE}",
        ),
        (
            ConnectionResetError("reset"),
            1,
            0.0,
            2,
            "fetch failed (will retry in 2 s): ConnectionResetError: reset",
        ),
        # never sooner than a remote repo's poll interval
        (
            RemoteUnreachable(UNREACHABLE),
            1,
            5.0,
            5,
            f"fetch failed (will retry in 5 s): {UNREACHABLE}",
        ),
        (
            RemoteUnreachable(UNREACHABLE),
            3,
            5.0,
            8,
            f"fetch failed (will retry in 8 s): {UNREACHABLE}",
        ),
        # permanent: looked at again every 2 s (or poll) in case it is fixed, as it is
        (GitError(NOT_A_REPO), 1, 0.0, 2, NOT_A_REPO),
        (GitError(NOT_A_REPO), 7, 0.0, 2, NOT_A_REPO),
        (GitError(NOT_A_REPO), 1, 30.0, 30, NOT_A_REPO),
        (PermissionError(13, "Permission denied"), 1, 0.0, 2, "[Errno 13] Permission denied"),
        # heads the engine could not take: the store could not be written
        (
            sqlite3.OperationalError("database or disk is full"),
            1,
            0.0,
            2,
            "OperationalError: database or disk is full",
        ),
        (
            sqlite3.OperationalError("attempt to write a readonly\ndatabase"),
            3,
            30.0,
            30,
            "OperationalError: attempt to write a readonly database",
        ),
    ],
)
def test_a_repo_that_cannot_be_read_is_looked_at_again_with_backoff_if_it_may_pass(
    error: GitError | OSError, failures: int, floor: float, delay: float, shown: str
) -> None:
    assert watcher.after_error(error, failures, floor) == (delay, shown)


def test_the_fingerprint_changes_with_every_ref_update_even_within_one_clock_tick(
    tmp_path: Path,
) -> None:
    git("init", "-q", "-b", "main", cwd=tmp_path)
    for subject in ("a", "b"):
        git("commit", "-q", "--allow-empty", "-m", subject, cwd=tmp_path)
    git_dir = tmp_path / ".git"
    ref = git_dir / "refs" / "heads" / "main"
    first = refs_fingerprint(git_dir)

    times = ref.stat().st_atime_ns, ref.stat().st_mtime_ns
    git("update-ref", "refs/heads/main", "HEAD~1", cwd=tmp_path)
    os.utime(ref, ns=times)  # the same size, and the same mtime as if the clock stood still
    assert refs_fingerprint(git_dir) != first

    git("branch", "feature/x", cwd=tmp_path)
    names = [entry[0] for entry in refs_fingerprint(git_dir)]
    assert str(git_dir / "refs" / "heads" / "feature" / "x") in names
    assert "HEAD" in names


def test_the_fingerprint_skips_a_push_s_lock_and_a_ref_that_goes_as_it_looks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A push writes ``main.lock`` and renames it over ``main``; inotify wakes the watcher
    right then. A lock, or a ref gone between listing and stat, must not end the watcher."""
    git("init", "-q", "-b", "main", cwd=tmp_path)
    git("commit", "-q", "--allow-empty", "-m", "a", cwd=tmp_path)
    git_dir = tmp_path / ".git"
    (git_dir / "refs" / "heads" / "main.lock").write_text("0" * 40 + "\n")
    names = [entry[0] for entry in refs_fingerprint(git_dir)]
    assert not any(name.endswith(".lock") for name in names)

    listed = os.scandir

    class Gone:
        """An entry whose file was renamed away after it was listed."""

        def __init__(self, entry: os.DirEntry[str]) -> None:
            self.name, self.path = entry.name, entry.path

        def is_dir(self, follow_symlinks: bool = True) -> bool:
            return False

        def stat(self, follow_symlinks: bool = True) -> os.stat_result:
            raise FileNotFoundError(self.path)

    def scandir(path: Path) -> list[object]:
        return [Gone(e) if e.name == "main" else e for e in listed(path)]

    monkeypatch.setattr(os, "scandir", scandir)
    names = [entry[0] for entry in refs_fingerprint(git_dir)]
    assert str(git_dir / "refs" / "heads" / "main") not in names
    assert "HEAD" in names


def _event(name: bytes, mask: int) -> bytes:
    padded = name + b"\0" * (16 - len(name) % 16) if name else b""
    return struct.pack("iIII", 1, mask, 0, len(padded)) + padded


IN_CLOSE_WRITE, IN_MOVED_TO, IN_CREATE, IN_DELETE, IN_ISDIR = 0x8, 0x80, 0x100, 0x200, 0x40000000


@pytest.mark.parametrize(
    ("events", "expected"),
    [
        ([], (False, False)),
        ([(b"main.lock", IN_CREATE), (b"main.lock", IN_CLOSE_WRITE)], (False, False)),
        ([(b"main.lock", IN_CREATE), (b"main", IN_MOVED_TO)], (True, False)),
        ([(b"packed-refs", IN_MOVED_TO)], (True, False)),
        ([(b"topic", IN_DELETE)], (True, False)),
        ([(b"feature", IN_CREATE | IN_ISDIR)], (True, True)),
        ([(b"HEAD.lock", IN_CREATE), (b"HEAD", IN_MOVED_TO)], (True, False)),
    ],
)
def test_inotify_events_say_whether_a_ref_moved_and_whether_a_directory_appeared(
    events: list[tuple[bytes, int]], expected: tuple[bool, bool]
) -> None:
    assert ref_events(b"".join(_event(name, mask) for name, mask in events)) == expected


def test_a_push_to_a_local_repo_wakes_the_watcher_without_waiting_for_its_tick(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(watcher, "LOCAL_INTERVAL", 3600.0)  # only inotify can wake it
    real = watcher.refs_fingerprint
    looked = asyncio.Event()  # the watcher looked at the refs since its last check

    def fingerprint(git_dir: Path) -> watcher.Fingerprint:
        looked.set()
        return real(git_dir)

    monkeypatch.setattr(watcher, "refs_fingerprint", fingerprint)
    origin = tmp_path / "app.git"
    git("init", "-q", "--bare", "-b", "main", str(origin))
    work = tmp_path / "work"
    git("clone", "-q", str(origin), str(work))

    def push(branch: str, subject: str) -> str:
        git("commit", "-q", "--allow-empty", "-m", subject, cwd=work)
        git("push", "-q", "origin", f"HEAD:refs/heads/{branch}", cwd=work)
        return git("rev-parse", "HEAD", cwd=work)

    async def scenario() -> None:
        seen: asyncio.Queue[RepoHeads] = asyncio.Queue()

        async def on_heads(heads: RepoHeads) -> None:
            looked.clear()
            await seen.put(heads)

        async def pushed(branch: str, subject: str) -> None:
            async with asyncio.timeout(10):
                # A check wakes the watcher as it ends; once the watcher looked at the refs
                # after the last one, it sleeps until its tick in an hour or inotify wakes it.
                await looked.wait()
                sha = await asyncio.to_thread(push, branch, subject)
                while (await seen.get()).branches.get(branch) != sha:
                    pass

        first = push("main", "first")
        watching = Watcher(Sources(tmp_path / "mirrors"), on_heads, poll_interval=3600)
        watching.watch(Repo("app", str(origin)))
        try:
            async with asyncio.timeout(10):
                assert (await seen.get()).branches == {"main": first}
            await pushed("main", "second")
            await pushed("feature/x", "a branch in a new directory")
            await pushed("feature/x", "and a push to it")
        finally:
            await watching.close()

    asyncio.run(scenario())


def pushed_origin(tmp_path: Path) -> tuple[Path, str]:
    """A bare repo with one commit pushed to main: (its path, the commit)."""
    origin = tmp_path / "app.git"
    git("init", "-q", "--bare", "-b", "main", str(origin))
    work = tmp_path / "work"
    git("clone", "-q", str(origin), str(work))
    git("commit", "-q", "--allow-empty", "-m", "first", cwd=work)
    git("push", "-q", "origin", "HEAD:refs/heads/main", cwd=work)
    return origin, git("rev-parse", "HEAD", cwd=work)


def test_refs_that_cannot_be_read_for_a_moment_do_not_end_the_watcher(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    origin, _ = pushed_origin(tmp_path)
    real = watcher.refs_fingerprint
    calls = []

    def flaky(git_dir: Path) -> watcher.Fingerprint:
        calls.append(git_dir)
        if len(calls) == 1:
            raise PermissionError(13, "Permission denied", str(git_dir / "refs"))
        return real(git_dir)

    monkeypatch.setattr(watcher, "refs_fingerprint", flaky)

    async def scenario() -> None:
        seen: asyncio.Queue[RepoHeads] = asyncio.Queue()

        async def on_heads(heads: RepoHeads) -> None:
            await seen.put(heads)

        watching = Watcher(Sources(tmp_path / "mirrors"), on_heads, poll_interval=3600)
        watching.watch(Repo("app", str(origin)))
        try:
            async with asyncio.timeout(10):
                assert "main" in (await seen.get()).branches
        finally:
            await watching.close()

    asyncio.run(scenario())


def test_heads_the_engine_could_not_take_are_handed_over_again_and_the_error_shown(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A push made while the store could not be written (a full disk): the refs were
    looked at, but the heads were not taken, so they are handed over again."""
    monkeypatch.setattr(watcher, "ERROR_INTERVAL", 0.01)  # the wait after a permanent error
    origin, sha = pushed_origin(tmp_path)

    async def scenario() -> None:
        offered: list[RepoHeads] = []
        taken: asyncio.Queue[RepoHeads] = asyncio.Queue()
        errors: list[str] = []

        async def on_heads(heads: RepoHeads) -> None:
            offered.append(heads)
            if len(offered) == 1:
                errors.append(watching.errors.get("app", ""))
                raise sqlite3.OperationalError("database or disk is full")
            errors.append(watching.errors.get("app", ""))
            await taken.put(heads)

        watching = Watcher(Sources(tmp_path / "mirrors"), on_heads, poll_interval=3600)
        watching.watch(Repo("app", str(origin)))
        try:
            async with asyncio.timeout(10):
                assert (await taken.get()).branches == {"main": sha}
            assert offered[0] == offered[1]
            assert errors == ["", "OperationalError: database or disk is full"]
            async with asyncio.timeout(10):
                while "app" in watching.errors:  # cleared once the heads were taken
                    await asyncio.sleep(0.01)
        finally:
            await watching.close()

    asyncio.run(scenario())
