"""Log files on this machine: written by the daemon alone, kept bounded, read as one.

No process writes its log itself. Its stdout and stderr are a pipe (:class:`Pump`)
the daemon reads on its event loop, and every byte of a log, the daemon's own
notes included, goes through the log's one :class:`Appender` (shared by every
process writing it: a revision's web and workers, the old and new processes of a
restart). So the appender rotates between two writes: past ``limit`` bytes it
renames ``NAME`` to ``NAME.1`` (:func:`rotated`, replacing the one before) and
opens a new ``NAME``. Nothing written is lost or copied, on any file system.
(When a process wrote the file itself, the daemon could only cut a file it did not
own the writes to: logrotate's copytruncate loses what comes between the copy and
the truncation, and a renamed file goes on growing under the process's open
descriptor.) The price is the daemon's reads and writes of every service's output,
kept low by reading each pipe in large chunks, at most every 10 ms (see :class:`Pump`;
docs/commands.md says what it measured). A process writing faster than the daemon
reads waits on the full pipe, as it would on a slow terminal.

What a reader calls "the log" is ``NAME.1`` followed by ``NAME``, and every reader
here reads it so: :func:`tail` (the last bytes), :func:`read` (all of it, or its last
lines, in blocks, never whole in memory) and :func:`follow` (new output as it comes,
across rotations).

Rotating and following both happen in the daemon, on one event loop, so the
appender notes where it cut each log (:data:`_cuts`) and :func:`follow` uses that
to pick up, from ``NAME.1``, exactly what it had not read yet when the cut came,
and to go on in the new ``NAME`` from its start.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import BinaryIO

from branchyard.runtime import LAST_LINES
from branchyard.text import without_escapes

LOG_MAX = 10 * 1024 * 1024  # bytes a log may reach before it is rotated
BLOCK = 64 * 1024
logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Cut:
    total: int  # bytes cut from the log's start, over every rotation
    last: int  # bytes the log had when it was last cut


_cuts: dict[Path, _Cut] = {}


def rotated(log: Path) -> Path:
    """Where the older part of ``log`` is kept once it is rotated."""
    return log.with_name(log.name + ".1")


def _open_for_append(log: Path) -> int:
    return os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)


class Appender:
    """The one writer of a log: appends, and keeps the log under ``limit`` bytes by
    rotating it before a write that would take it past (see the module's docstring).

    A write the file system refuses (a full disk, a home made read-only) is dropped,
    and said once in the daemon's log until a write succeeds again: the service goes
    on, and its output resumes when there is room.
    """

    def __init__(self, log: Path, limit: int = LOG_MAX) -> None:
        self.path = log
        self._limit = limit
        self._fd = _open_for_append(log)
        self._size = os.fstat(self._fd).st_size
        self._refused = False
        self.users = 0  # see Appenders

    def write(self, data: bytes) -> None:
        try:
            if self._size and self._size + len(data) > self._limit:
                self._rotate()
            view = memoryview(data)
            while view:
                view = view[os.write(self._fd, view) :]
        except OSError as exc:
            if not self._refused:
                logger.warning("output dropped: cannot write %s: %s", self.path, exc.strerror)
            self._refused = True
            return
        self._size += len(data)
        self._refused = False

    def note(self, text: str) -> None:
        """Write a line of the daemon's own into the log."""
        self.write(text.encode() + b"\n")

    def _rotate(self) -> None:
        os.replace(self.path, rotated(self.path))
        fd, self._fd = self._fd, _open_for_append(self.path)
        os.close(fd)
        before = _cuts.get(self.path, _Cut(0, 0))
        _cuts[self.path] = _Cut(before.total + self._size, self._size)
        self._size = 0

    def close(self) -> None:
        os.close(self._fd)

    def __enter__(self) -> Appender:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


class Appenders:
    """The open appenders of one daemon, one per log, whoever writes it."""

    def __init__(self, limit: int = LOG_MAX) -> None:
        self._limit = limit
        self._open: dict[Path, Appender] = {}

    def open(self, log: Path) -> Appender:
        """``log``'s appender, opened if no one has it open; :meth:`close` it after."""
        appender = self._open.get(log)
        if appender is None:
            appender = self._open[log] = Appender(log, self._limit)
        appender.users += 1
        return appender

    def close(self, appender: Appender) -> None:
        appender.users -= 1
        if appender.users <= 0 and self._open.get(appender.path) is appender:
            del self._open[appender.path]
            appender.close()

    @contextlib.contextmanager
    def opened(self, log: Path) -> Iterator[Appender]:
        appender = self.open(log)
        try:
            yield appender
        finally:
            self.close(appender)


PIPE_SIZE = 1024 * 1024  # bytes a pump's pipe holds (Linux's pipe-max-size by default)
PUMP_PAUSE = 0.01  # seconds a pump waits after a read, so that the next one reads much


class Pump:
    """A pipe whose write end a process gets as its stdout and stderr (:attr:`writer`),
    read on the event loop into an :class:`Appender` as its output comes.

    After each read it waits :data:`PUMP_PAUSE` before it looks again: a process that
    writes line by line would otherwise wake the daemon for every line (a service
    printing 290,000 lines a second took half of a core). Its pipe holds
    :data:`PIPE_SIZE` meanwhile, so that up to 100 MB/s go through without making the
    process wait; output reaches the log within the pause.
    """

    def __init__(self, appender: Appender) -> None:
        self._appender = appender
        self._read, self.writer = os.pipe()
        os.set_blocking(self._read, False)
        with contextlib.suppress(OSError):  # over the limit: the kernel's default, 64 KiB
            fcntl.fcntl(self._read, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(self._read, self._readable)
        self._again: asyncio.TimerHandle | None = None
        self._open = True

    def started(self) -> None:
        """The process has its copy of the write end: the daemon's is closed, so the pipe
        ends when the process and what it started are gone."""
        if self.writer >= 0:
            os.close(self.writer)
            self.writer = -1

    def _readable(self) -> None:
        try:
            chunk = os.read(self._read, PIPE_SIZE)
        except BlockingIOError:
            return
        self._loop.remove_reader(self._read)
        if chunk:  # else its end: finish() closes it
            self._appender.write(chunk)
            self._again = self._loop.call_later(PUMP_PAUSE, self._look_again)

    def _look_again(self) -> None:
        self._again = None
        self._loop.add_reader(self._read, self._readable)

    def finish(self) -> None:
        """Write what is left in the pipe, then close it. For after the process ended
        (and its box, so nothing more comes): what a process that escaped still writes
        is not waited for."""
        if not self._open:
            return
        self._open = False
        self.started()
        if self._again is not None:
            self._again.cancel()
        self._loop.remove_reader(self._read)
        with contextlib.suppress(BlockingIOError):
            while chunk := os.read(self._read, PIPE_SIZE):
                self._appender.write(chunk)
        os.close(self._read)


def note_command(log: Appender, argv: Sequence[str]) -> None:
    """Note the command a build runs next in its log, and the time, as a shell shows it."""
    log.note(f"$ {' '.join(argv)}  [{time.strftime('%H:%M:%S')}]")


Part = tuple[Path, BinaryIO, int]


def _open(stack: ExitStack, log: Path) -> list[Part]:
    """``log.1`` and ``log`` opened, each with its size now (missing ones left out)."""
    parts: list[Part] = []
    for path in (rotated(log), log):
        try:
            file = stack.enter_context(path.open("rb"))
        except FileNotFoundError:
            continue
        parts.append((path, file, os.fstat(file.fileno()).st_size))
    return parts


def _start_of_last_lines(parts: list[Part], lines: int) -> tuple[int, int]:
    """(part, offset) where the last ``lines`` lines begin; a final newline ends a line."""
    if lines <= 0:
        return len(parts), 0
    wanted = lines
    final = True  # the log's very last byte is not looked at: a newline there ends a line
    for index in reversed(range(len(parts))):
        _, file, end = parts[index]
        while end > 0:
            start = max(0, end - BLOCK)
            file.seek(start)
            block = file.read(end - start)
            at = len(block) - 1 if final else len(block)
            final = False
            while (at := block.rfind(b"\n", 0, at)) != -1:
                wanted -= 1
                if wanted == 0:
                    return index, start + at + 1
            end = start
    return 0, 0


def _blocks(parts: list[Part], first: int, offset: int) -> Iterator[bytes]:
    for _, file, size in parts[first:]:
        file.seek(offset)
        left, offset = size - offset, 0
        while left > 0 and (block := file.read(min(BLOCK, left))):
            left -= len(block)
            yield block


def read(log: Path, lines: int | None = None) -> Iterator[bytes]:
    """The log (``log.1``, then ``log``) as it is now, in blocks; only its last
    ``lines`` lines if given. Output written meanwhile is not included."""
    with ExitStack() as stack:
        parts = _open(stack, log)
        yield from _blocks(parts, *_start(parts, lines))


async def read_in_thread(log: Path, lines: int | None = None) -> AsyncIterator[bytes]:
    """:func:`read`, each block read in a worker thread, off the event loop."""
    blocks = read(log, lines)
    while block := await asyncio.to_thread(next, blocks, b""):
        yield block


def _start(parts: list[Part], lines: int | None) -> tuple[int, int]:
    return (0, 0) if lines is None else _start_of_last_lines(parts, lines)


def tail(log: Path, size: int) -> bytes:
    """The last ``size`` bytes of the log, across ``log.1`` and ``log``."""
    with ExitStack() as stack:
        kept = b""
        for _, file, length in reversed(_open(stack, log)):
            file.seek(max(0, length - (size - len(kept))))
            kept = file.read(length - file.tell()) + kept
            if len(kept) >= size:
                break
        return kept


def last_lines(log: Path, count: int = LAST_LINES) -> list[str]:
    """The last ``count`` lines of a log that are not blank (read from its last 64 KiB),
    without terminal escapes."""
    try:
        text = without_escapes(tail(log, BLOCK).decode(errors="replace"))
    except OSError:
        return []
    return [line for line in text.splitlines() if line.strip()][-count:]


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _missed(log: Path, seen: _Cut, now: _Cut, position: int) -> bytes:
    """What was written to ``log`` after ``position`` and before the cuts since ``seen``:
    the end of ``log.1``, all of it if more than one cut came (output in between is gone)."""
    single = now.total - seen.total == now.last
    if single and position >= now.last:
        return b""  # it had read past the cut already
    try:
        with rotated(log).open("rb") as file:
            if single:
                file.seek(max(0, os.fstat(file.fileno()).st_size - (now.last - position)))
            return file.read()
    except FileNotFoundError:
        return b""


async def follow(
    log: Path, lines: int | None, pause: Callable[[], Awaitable[bool]]
) -> AsyncIterator[bytes]:
    """The log (its last ``lines`` lines if given), then new output as it is written,
    across rotations, until ``pause()`` (the wait between looks) says to stop.

    A log cut by someone else than :func:`rotate` (it shrank) is read again from
    its start.
    """
    seen = _cuts.get(log, _Cut(0, 0))
    with ExitStack() as stack:
        parts = _open(stack, log)
        position = next((size for path, _, size in parts if path == log), 0)
        for block in _blocks(parts, *_start(parts, lines)):
            yield block
    while await pause():
        now = _cuts.get(log, _Cut(0, 0))
        if now != seen:
            missed = _missed(log, seen, now, position)
            single = now.total - seen.total == now.last
            seen, position = now, max(0, position - now.last) if single else 0
            if missed:
                yield missed
        elif _size(log) < position:
            position = 0
        try:
            with log.open("rb") as file:
                file.seek(position)
                while block := file.read(BLOCK):
                    position += len(block)
                    yield block
        except FileNotFoundError:
            continue
