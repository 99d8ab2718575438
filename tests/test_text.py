"""Unit tests for untrusted text made printable and bounded."""

from __future__ import annotations

import pytest

from branchyard.text import clip, printable, redacted_url, shown


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


@pytest.mark.parametrize(
    ("url", "shown_as"),
    [
        (
            "https://user:TOKEN@forge.example/team/app.git",
            "https://user:***@forge.example/team/app.git",
        ),
        (
            "http://oauth2:glpat-x@127.0.0.1:8080/app.git",
            "http://oauth2:***@127.0.0.1:8080/app.git",
        ),
        ("https://ghp_TOKEN@github.com/acme/app.git", "https://***@github.com/acme/app.git"),
        ("https://u:p%40ss@h/x", "https://u:***@h/x"),
        ("https://u:p@ss@h/x", "https://u:***@h/x"),  # an unescaped @ in the password
        ("HTTPS://u:p@h", "HTTPS://u:***@h"),
        ("ssh://git:pw@host/app.git", "ssh://git:***@host/app.git"),
        ("ssh://git@host/app.git", "ssh://git@host/app.git"),  # a user is no secret there
        ("git@host:team/app.git", "git@host:team/app.git"),
        ("/srv/git/app.git", "/srv/git/app.git"),
        ("file:///srv/git/a@b.git", "file:///srv/git/a@b.git"),
        ("https://forge.example/a@b.git", "https://forge.example/a@b.git"),
        (
            "https://h/app.git?access_token=T&ref=main&private_token=P",
            "https://h/app.git?access_token=***&ref=main&private_token=***",
        ),
        ("https://h/x?Token=T&tokens=1", "https://h/x?Token=***&tokens=1"),
        ("https://forge.example/team/app.git", "https://forge.example/team/app.git"),
    ],
)
def test_a_url_is_shown_without_its_credentials(url: str, shown_as: str) -> None:
    assert redacted_url(url) == shown_as
