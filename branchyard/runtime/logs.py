"""Log files on this machine: kept bounded, and read as one across a rotation.

Processes write their output straight into a log file opened with O_APPEND.
:func:`rotate` keeps it bounded: past ``limit`` bytes, it picks a cut at a
block boundary near the end, copies the ``limit`` bytes before the cut to
``NAME.1`` (:func:`rotated`), and removes everything before the cut from the
file in place with ``fallocate(FALLOC_FL_COLLAPSE_RANGE)``, which the kernel
does under the lock appends take: what the processes write meanwhile stays,
after the cut, and nothing is lost. Where the file system cannot collapse a
range (tmpfs, overlayfs, btrfs; or a log under one block), it falls back to
logrotate's copytruncate, which loses what is written between the copy's end
and the truncation. What a reader calls "the log" is ``NAME.1`` followed by
``NAME``, and every reader here reads it so: :func:`tail` (the last bytes),
:func:`read` (all of it, or its last lines, in blocks, never whole in memory)
and :func:`follow` (new output as it comes, across rotations).

Rotating and following both happen in the daemon, on one event loop, so
:func:`rotate` notes where it cut each log (:data:`_cuts`) and :func:`follow`
uses that to pick up, from the end of ``NAME.1``, exactly what it had not read
yet when the cut came, and to go on in ``NAME`` where it was, less the cut.
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from branchyard.runtime import LAST_LINES
from branchyard.text import without_escapes

LOG_MAX = 10 * 1024 * 1024  # bytes a log may reach before it is rotated
BLOCK = 64 * 1024


@dataclass(frozen=True)
class _Cut:
    total: int  # bytes cut from the log's start, over every rotation
    last: int  # bytes the log had when it was last cut


_cuts: dict[Path, _Cut] = {}


def note_command(log: Path, argv: Sequence[str]) -> None:
    """Append the command a build runs next to its log, and the time, as a shell shows it."""
    with log.open("ab") as out:
        out.write(f"$ {' '.join(argv)}  [{time.strftime('%H:%M:%S')}]\n".encode())


def rotated(log: Path) -> Path:
    """Where :func:`rotate` keeps the older part of ``log``."""
    return log.with_name(log.name + ".1")


def rotate(log: Path, limit: int = LOG_MAX) -> bool:
    """Keep ``log`` bounded: past ``limit`` bytes its tail moves to ``log.1``."""
    try:
        if log.stat().st_size <= limit:
            return False
        file = log.open("r+b")
    except FileNotFoundError:
        return False
    with file, rotated(log).open("wb") as target:
        status = os.fstat(file.fileno())
        # The cut: a block boundary before the end (a collapse must leave a byte).
        end = cut = (status.st_size - 1) // status.st_blksize * status.st_blksize
        _copy(file, target, max(0, cut - limit), cut)
        if not (cut and _collapse(file, cut)):
            end = _copy(file, target, status.st_size - limit, None)
            os.truncate(log, 0)
    before = _cuts.get(log, _Cut(0, 0))
    _cuts[log] = _Cut(before.total + end, end)
    return True


def _copy(source: BinaryIO, target: BinaryIO, start: int, end: int | None) -> int:
    """Copy ``source`` from ``start`` to ``end`` (None: to its end, as it grows) over
    what ``target`` had; where the copy ended."""
    target.seek(0)
    target.truncate()
    source.seek(start)
    while chunk := source.read(BLOCK if end is None else min(BLOCK, end - source.tell())):
        target.write(chunk)
    return source.tell()


FALLOC_FL_COLLAPSE_RANGE = 0x08
_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64)


def _collapse(file: BinaryIO, length: int) -> bool:
    """Remove the first ``length`` bytes of ``file`` in place; False if its file system
    cannot."""
    if _libc.fallocate(file.fileno(), FALLOC_FL_COLLAPSE_RANGE, 0, length) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
        return False
    raise OSError(code, os.strerror(code))


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
