"""How the CLI and the dashboard show things: tables fitted to the terminal, the exact
logs command of a failed revision, event times with their zone, output without escapes."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from branchyard.cli.output import event_time, shares, table
from branchyard.rollout import logs_command
from branchyard.text import without_escapes

HEADER = ["SERVICE", "STATE", "URL"]
LONG = "failed: " + "x" * 200
ROWS = [["main:app", "live", "http://app.main.localhost:7080/"], ["main:web", LONG, "http://w/"]]


@pytest.mark.parametrize(
    ("width", "lines"),
    [
        pytest.param(
            None,
            [
                "SERVICE   STATE" + " " * (len(LONG) - 5) + "  URL",
                "main:app  live" + " " * (len(LONG) - 4) + "  http://app.main.localhost:7080/",
                f"main:web  {LONG}  http://w/",
            ],
            id="piped-not-fitted",
        ),
        pytest.param(
            80,
            [
                "SERVICE   STATE" + " " * 32 + "  URL",
                "main:app  live" + " " * 33 + "  http://app.main.localhost:7080/",
                "main:web  failed: " + "x" * 28 + "…  http://w/",
            ],
            id="the-state-is-cut-to-fit",
        ),
        pytest.param(
            30,
            [
                "SERVICE   STATE  URL",
                "main:app  live   http://app.main.localhost:7080/",
                "main:web  fail…  http://w/",
            ],
            id="never-narrower-than-its-header",
        ),
    ],
)
def test_ps_fits_a_long_reason_to_the_terminal(width: int | None, lines: list[str]) -> None:
    assert table(HEADER, ROWS, width, squeeze=1).split("\n") == lines


def test_a_table_that_fits_is_left_as_it_is() -> None:
    assert table(HEADER, ROWS[:1], 200, squeeze=1) == table(HEADER, ROWS[:1])


@pytest.mark.parametrize(
    ("namespace", "build", "command"),
    [
        ("main", False, "branchyard logs app --revision 5"),
        ("main", True, "branchyard logs app --revision 5 --build"),
        ("bugfix", False, "branchyard -n bugfix logs app --revision 5"),
        ("bugfix", True, "branchyard -n bugfix logs app --revision 5 --build"),
    ],
)
def test_the_logs_command_of_a_revision_names_its_namespace_unless_the_baseline(
    namespace: str, build: bool, command: str
) -> None:
    assert logs_command(namespace, "app", 5, build) == command


@pytest.fixture
def zone(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    yield
    monkeypatch.undo()
    time.tzset()


@pytest.mark.usefixtures("zone")
@pytest.mark.parametrize(
    ("tz", "shown"),
    [
        ("UTC", "2025-11-28 22:20:41+00:00"),
        ("Europe/Paris", "2025-11-28 23:20:41+01:00"),
        ("Asia/Kolkata", "2025-11-29 03:50:41+05:30"),
    ],
)
def test_event_times_carry_their_zone(monkeypatch: pytest.MonkeyPatch, tz: str, shown: str) -> None:
    monkeypatch.setenv("TZ", tz)
    time.tzset()
    assert event_time(1764368441.5) == shown


@pytest.mark.parametrize(
    ("raw", "plain"),
    [
        ("\x1b[1;31mred\x1b[0m text", "red text"),
        ("\x1b]0;a title\x07after", "after"),
        ("\x1b]8;;http://x/\x1b\\link\x1b]8;;\x1b\\", "link"),
        ("\x1b(B\x1b7saved\x1b8", "saved"),
        ("\x1b[?25lhidden cursor\x1b[2K", "hidden cursor"),
        ("no escapes at all", "no escapes at all"),
    ],
)
def test_output_is_shown_without_terminal_escapes(raw: str, plain: str) -> None:
    assert without_escapes(raw) == plain


@pytest.mark.parametrize(
    ("weights", "shown"),
    [
        ({"1": 50, "2": 50}, "v1=50 v2=50"),
        ({"10": 10, "9": 90}, "v9=90 v10=10"),
        ({"12": 1, "3": 1, "100": 98}, "v3=1 v12=1 v100=98"),
    ],
)
def test_traffic_shares_are_shown_in_revision_order(weights: dict[str, int], shown: str) -> None:
    assert shares(weights) == shown
