"""Unit tests for log files read as one across a rotation (``runtime.logs``)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import BinaryIO

import pytest

from branchyard.runtime import logs
from branchyard.runtime.logs import rotate


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


def test_rotate_keeps_the_last_bytes_and_empties_the_log(tmp_path: Path) -> None:
    log = tmp_path / "v1.log"
    log.write_bytes(b"0123456789")
    assert not rotate(log, 10)
    log.write_bytes(b"0123456789abc")
    assert rotate(log, 10)
    assert (logs.rotated(log).read_bytes(), log.read_bytes()) == (b"3456789abc", b"")


BIG = bytes(range(256)) * 40  # 10,240 bytes: the cut comes at 8,192 (4 KiB blocks)


def test_rotate_cuts_a_big_log_at_a_block_and_keeps_what_follows_the_cut(tmp_path: Path) -> None:
    log = tmp_path / "v1.log"
    log.write_bytes(BIG)
    assert rotate(log, 3000)
    assert (logs.rotated(log).read_bytes(), log.read_bytes()) == (BIG[5192:8192], BIG[8192:])


def test_what_a_process_writes_while_a_log_is_rotated_is_kept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    log = tmp_path / "v1.log"
    log.write_bytes(BIG)
    copy = logs._copy

    def copy_while_written(source: BinaryIO, target: BinaryIO, start: int, end: int | None) -> int:
        copied = copy(source, target, start, end)
        with log.open("ab") as process:  # as a service does, between the copy and the cut
            process.write(b"written during the copy\n")
        return copied

    monkeypatch.setattr(logs, "_copy", copy_while_written)
    assert rotate(log, 3000)
    assert logs.rotated(log).read_bytes() + log.read_bytes() == (
        BIG[5192:] + b"written during the copy\n"
    )


def test_follow_goes_on_where_it_was_when_the_cut_came_before_it(tmp_path: Path) -> None:
    log = tmp_path / "v1.log"
    log.write_bytes(BIG)

    def rotate_then_append() -> None:
        rotate(log, 3000)
        with log.open("ab") as file:
            file.write(b"next\n")

    assert asyncio.run(followed(log, None, [rotate_then_append])) == BIG + b"next\n"


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
    log.write_bytes(b"one\ntwo\n")

    def append(text: bytes) -> Callable[[], None]:
        def step() -> None:
            with log.open("ab") as file:
                file.write(text)

        return step

    steps = [
        append(b"three\n"),
        lambda: rotate(log, 4),
        append(b"four\n"),
        append(b"five\nsix\nseven\n"),
        lambda: rotate(log, 4),
        append(b"eight\n"),
    ]
    seen = asyncio.run(followed(log, 1, steps))
    assert seen == b"two\nthree\nfour\nfive\nsix\nseven\neight\n"  # nothing twice, nothing lost


def test_follow_sends_what_was_written_just_before_a_rotation(tmp_path: Path) -> None:
    log = tmp_path / "v1.log"
    log.write_bytes(b"a\n")

    def write_then_rotate() -> None:
        with log.open("ab") as file:
            file.write(b"b\nc\n")
        rotate(log, 4)
        with log.open("ab") as file:
            file.write(b"d\n")

    assert asyncio.run(followed(log, None, [write_then_rotate])) == b"a\nb\nc\nd\n"


def test_follow_after_several_rotations_between_looks_sends_the_last_rotated_part(
    tmp_path: Path,
) -> None:
    log = tmp_path / "v1.log"
    log.write_bytes(b"a\n")

    def two_rotations() -> None:
        log.write_bytes(b"a\nb\nc\n")
        rotate(log, 2)
        log.write_bytes(b"d\ne\nf\n")
        rotate(log, 4)

    assert asyncio.run(followed(log, None, [two_rotations])) == b"a\ne\nf\n"


def test_follow_reads_a_log_someone_else_emptied_from_its_start(tmp_path: Path) -> None:
    log = tmp_path / "v1.log"
    log.write_bytes(b"a long first line\n")
    steps = [lambda: log.write_bytes(b"b\n")]
    assert asyncio.run(followed(log, None, steps)) == b"a long first line\nb\n"


def test_follow_waits_for_a_log_that_is_not_there_yet(tmp_path: Path) -> None:
    log = tmp_path / "v1.log"
    steps = [lambda: None, lambda: log.write_bytes(b"late\n")]
    assert asyncio.run(followed(log, 10, steps)) == b"late\n"
