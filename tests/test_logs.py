"""Unit tests for log files read as one across a rotation (``runtime.logs``)."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path

import pytest

from branchyard.runtime import logs
from branchyard.runtime.logs import Appender, Pump


def write(log: Path, older: bytes | None, current: bytes | None) -> None:
    for path, content in ((logs.rotated(log), older), (log, current)):
        if content is not None:
            path.write_bytes(content)


@pytest.mark.parametrize(
    ("older", "current", "lines", "expected"),
    [
        (None, None, None, b""),
        (None, b"a\nb\nc\n", None, b"a\nb\nc\n"),
        (b"a\nb\n", b"c\n", None, b"a\nb\nc\n"),
        (b"a\nb\n", None, None, b"a\nb\n"),
        (None, b"a\nb\nc\n", 2, b"b\nc\n"),
        (None, b"a\nb\nc", 2, b"b\nc"),
        (None, b"a\nb\nc\n", 0, b""),
        (None, b"a\nb\nc\n", 3, b"a\nb\nc\n"),
        (None, b"a\nb\nc\n", 10, b"a\nb\nc\n"),
        (b"a\nb\n", b"c\nd\n", 3, b"b\nc\nd\n"),
        (b"a\nb\n", b"", 1, b"b\n"),
        (b"a\nb", b"c\n", 1, b"bc\n"),
        (b"a\n" + b"x" * 200_000 + b"\n", b"y\n", 2, b"x" * 200_000 + b"\ny\n"),
        (None, b"\n\n\n", 2, b"\n\n"),
    ],
)
def test_read_gives_the_rotated_part_then_the_log_or_their_last_lines(
    tmp_path: Path, older: bytes | None, current: bytes | None, lines: int | None, expected: bytes
) -> None:
    log = tmp_path / "v1.log"
    write(log, older, current)
    blocks = list(logs.read(log, lines))
    assert b"".join(blocks) == expected
    assert all(len(block) <= logs.BLOCK for block in blocks)


@pytest.mark.parametrize(
    ("older", "current", "size", "expected"),
    [
        (None, None, 10, b""),
        (None, b"abcdef", 3, b"def"),
        (b"abc", b"def", 4, b"cdef"),
        (b"abc", b"", 2, b"bc"),
        (b"abc", b"def", 100, b"abcdef"),
    ],
)
def test_tail_reads_across_the_rotated_part(
    tmp_path: Path, older: bytes | None, current: bytes | None, size: int, expected: bytes
) -> None:
    log = tmp_path / "v1.log"
    write(log, older, current)
    assert logs.tail(log, size) == expected


@pytest.mark.parametrize(
    ("before", "limit", "writes", "older", "current"),
    [
        (None, 10, [b"0123456789"], None, b"0123456789"),
        (None, 10, [b"0123456789", b"abc"], b"0123456789", b"abc"),
        (None, 10, [b"01234", b"56789", b"abcdefghijkl", b"m"], b"abcdefghijkl", b"m"),
        (b"old\n", 10, [b"new\n"], None, b"old\nnew\n"),
        (b"old\n", 5, [b"new\n"], b"old\n", b"new\n"),
        (None, 10, [b""], None, b""),
    ],
)
def test_an_appender_renames_its_log_before_a_write_that_would_take_it_past_its_limit(
    tmp_path: Path,
    before: bytes | None,
    limit: int,
    writes: list[bytes],
    older: bytes | None,
    current: bytes,
) -> None:
    log = tmp_path / "v1.log"
    write(log, None, before)
    with Appender(log, limit) as appender:
        for data in writes:
            appender.write(data)
    rotated = logs.rotated(log)
    found = (rotated.read_bytes() if rotated.exists() else None, log.read_bytes())
    assert found == (older, current)
    if before is None:
        assert log.stat().st_mode & 0o777 == 0o600


LINES = 20_000  # about 110 KB through a log of 4 KiB: 27 rotations


def test_what_a_process_writes_through_a_pump_reaches_its_log_whole_across_rotations(
    tmp_path: Path,
) -> None:
    log = tmp_path / "v1.log"
    code = f"import os\nfor n in range({LINES}):\n    os.write(1, b'%d\\n' % n)\n"

    async def run() -> None:
        with Appender(log, 4096) as appender:
            pump = Pump(appender)
            process = await asyncio.create_subprocess_exec(
                sys.executable, "-c", code, stdout=pump.writer
            )
            pump.started()
            await process.wait()
            pump.finish()

    asyncio.run(run())
    written = b"".join(b"%d\n" % n for n in range(LINES))
    kept = logs.rotated(log).read_bytes() + log.read_bytes()
    assert logs._cuts[log].total + log.stat().st_size == len(written)  # every byte, once
    assert written.endswith(kept) and len(kept) > 4096  # the end of it, in order


BIG = bytes(range(256)) * 40  # 10,240 bytes


def test_follow_goes_on_where_it_was_when_the_cut_came_before_it(tmp_path: Path) -> None:
    log = tmp_path / "v1.log"
    log.write_bytes(BIG)
    with Appender(log, len(BIG)) as appender:
        steps = [lambda: appender.write(b"next\n")]  # the log renamed first
        assert asyncio.run(followed(log, None, steps)) == BIG + b"next\n"


async def followed(log: Path, lines: int | None, steps: Sequence[Callable[[], object]]) -> bytes:
    """What follow yields while ``steps`` run, one before each look after the first."""
    left = iter(steps)

    async def pause() -> bool:
        step = next(left, None)
        if step is None:
            return False
        step()
        return True

    return b"".join([block async for block in logs.follow(log, lines, pause)])


def test_follow_goes_on_across_rotations(tmp_path: Path) -> None:
    log = tmp_path / "v1.log"
    with Appender(log, 8) as appender:
        appender.write(b"one\ntwo\n")
        steps = [
            partial(appender.write, text)  # each write renames the log first
            for text in (b"three\n", b"four\n", b"five\nsix\nseven\n", b"eight\n")
        ]
        seen = asyncio.run(followed(log, 1, steps))
    assert seen == b"two\nthree\nfour\nfive\nsix\nseven\neight\n"  # nothing twice, nothing lost


def test_follow_sends_what_was_written_just_before_a_rotation(tmp_path: Path) -> None:
    log = tmp_path / "v1.log"
    with Appender(log, 6) as appender:
        appender.write(b"a\n")

        def write_then_rotate() -> None:
            appender.write(b"b\nc\n")
            appender.write(b"d\n")  # a, b and c renamed first

        assert asyncio.run(followed(log, None, [write_then_rotate])) == b"a\nb\nc\nd\n"


def test_follow_after_several_rotations_between_looks_sends_the_last_rotated_part(
    tmp_path: Path,
) -> None:
    log = tmp_path / "v1.log"
    with Appender(log, 6) as appender:
        appender.write(b"a\n")

        def two_rotations() -> None:
            for text in (b"b\nc\n", b"d\ne\nf\n", b"g\n"):
                appender.write(text)

        assert asyncio.run(followed(log, None, [two_rotations])) == b"a\nd\ne\nf\ng\n"


def test_follow_reads_a_log_someone_else_emptied_from_its_start(tmp_path: Path) -> None:
    log = tmp_path / "v1.log"
    log.write_bytes(b"a long first line\n")
    steps = [lambda: log.write_bytes(b"b\n")]
    assert asyncio.run(followed(log, None, steps)) == b"a long first line\nb\n"


def test_follow_waits_for_a_log_that_is_not_there_yet(tmp_path: Path) -> None:
    log = tmp_path / "v1.log"
    steps = [lambda: None, lambda: log.write_bytes(b"late\n")]
    assert asyncio.run(followed(log, 10, steps)) == b"late\n"
