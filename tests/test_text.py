"""Unit tests for untrusted text made printable and bounded."""

from __future__ import annotations

import pytest

from branchyard.text import clip, printable, shown


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("plain text, unicode é ✓", "plain text, unicode é ✓"),
        ("\x1b]0;title\x07", "\\x1b]0;title\\x07"),
        ("\x1b[2J\x1b[H", "\\x1b[2J\\x1b[H"),
        ("line\nbreak\r\ttab", "line\\x0abreak\\x0d\\x09tab"),
        ("nul\x00 del\x7f csi\x9b", "nul\\x00 del\\x7f csi\\x9b"),
    ],
)
def test_printable_writes_control_characters_as_escapes(text: str, expected: str) -> None:
    assert printable(text) == expected


@pytest.mark.parametrize(
    ("text", "limit", "expected"),
    [
        ("short", 10, "short"),
        ("exactly10!", 10, "exactly10!"),
        ("eleven char", 10, "eleven cha... (1 more characters)"),
        ("a" * 5000, 3, "aaa... (4997 more characters)"),
    ],
)
def test_clip_keeps_the_start_and_says_how_much_was_cut(
    text: str, limit: int, expected: str
) -> None:
    assert clip(text, limit) == expected


def test_shown_escapes_before_it_cuts() -> None:
    assert shown("\x1b" * 600) == "\\x1b" * 128 + "... (1888 more characters)"
