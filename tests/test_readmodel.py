"""Unit tests for the read model: one rule for a slot's state, as ps and the dashboard say it."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from branchyard.model import Revision, RevisionState
from branchyard.readmodel import Head, Snapshot, heading, ps_state, service_row, status

BUILDING = RevisionState.BUILDING
STARTING = RevisionState.STARTING
STAGED = RevisionState.STAGED
LIVE = RevisionState.LIVE
STOPPED = RevisionState.STOPPED
CRASHED = RevisionState.CRASHED
FAILED = RevisionState.FAILED
SUPERSEDED = RevisionState.SUPERSEDED
HEAD = Head("main", "17d8b23" + "e" * 33)


def rev(ordinal: int, state: RevisionState, reason: str = "") -> Revision:
    return Revision(
        id=100 + ordinal,
        namespace="main",
        service="app",
        ordinal=ordinal,
        repo="app",
        url="/srv/git/app.git",
        branch="main",
        sha=f"{ordinal}" * 40,
        subject=f"commit {ordinal}",
        key=f"k{ordinal}",
        settings_version="",
        env={},
        state=state,
        reason=reason,
        port=None,
        created_at=1000.0 + ordinal,
        changed_at=2000.0 + ordinal,
    )


@dataclass(frozen=True)
class Case:
    name: str
    snapshot: Snapshot
    ps: str  # the STATE column
    cell: str  # the dashboard's badge
    about: int | None  # the ordinal of the revision the badge is about
    notes: tuple[str, ...] = field(default=())
    reason: str = ""


V1 = rev(1, LIVE)
CASES = [
    Case("no revision yet", Snapshot(), "pending", "pending", None),
    Case("the first one builds", Snapshot(latest=rev(1, BUILDING)), "building", "building", 1),
    Case("one live", Snapshot(latest=V1, live=V1), "live", "live", 1),
    Case(
        "a new one builds while the old one serves",
        Snapshot(latest=rev(2, BUILDING), live=V1),
        "live (v2 building)",
        "building",
        2,
        ("v1 serves",),
    ),
    Case(
        "a new one starts while the old one serves",
        Snapshot(latest=rev(2, STARTING), live=V1),
        "live (v2 starting)",
        "starting",
        2,
        ("v1 serves",),
    ),
    Case(
        "a new one failed; the old one serves",
        Snapshot(latest=rev(2, FAILED, "exited with code 3"), live=V1),
        "live (v2 failed)",
        "failed",
        2,
        ("v1 serves",),
        "exited with code 3",
    ),
    Case(
        "a new one is staged while pinned",
        Snapshot(latest=rev(2, STAGED), live=V1, pinned=1),
        "live (v2 staged) pinned v1",
        "live",
        1,
        ("v2 staged", "pinned v1"),
    ),
    Case(
        "the live one restarts",
        Snapshot(latest=V1, live=V1, restarting=True, exit_code=3, restarts=1),
        "restarting (exit 3)",
        "restarting",
        1,
    ),
    Case(
        "the live one restarts after exiting with 0",
        Snapshot(latest=V1, live=V1, restarting=True, exit_code=0),
        "restarting (exit 0)",
        "restarting",
        1,
    ),
    Case(  # the two rules disagreed: ps hid the build, the dashboard said "v1 serves"
        "the live one restarts while a new one builds",
        Snapshot(latest=rev(2, BUILDING), live=V1, restarting=True, exit_code=3),
        "restarting (exit 3; v2 building)",
        "building",
        2,
        ("v1 restarting (exit 3)",),
    ),
    Case(
        "the only one failed",
        Snapshot(latest=rev(1, FAILED, "build step failed")),
        "failed",
        "failed",
        1,
        ("nothing serves",),
        "build step failed",
    ),
    Case(
        "the live one crashed and is out of traffic",
        Snapshot(latest=rev(2, CRASHED, "exited with code 1 after 5 restarts")),
        "crashed",
        "crashed",
        2,
        ("nothing serves",),
        "exited with code 1 after 5 restarts",
    ),
    Case(  # the two rules disagreed: the dashboard wrote the weights as percents
        "a split",
        Snapshot(latest=rev(2, LIVE), live=V1, weights={1: 3, 2: 1}, pinned=1),
        "live split v1=3 v2=1",
        "live",
        1,
        ("split v1=3 v2=1",),
    ),
    Case(
        "pinned to an older commit than the branch head",
        Snapshot(latest=rev(3, STOPPED), live=V1, pinned=1, behind=HEAD),
        "live pinned v1, behind main (17d8b23)",
        "live",
        1,
        ("pinned v1", "behind main (17d8b23)"),
    ),
    Case(
        "a newer one was superseded",
        Snapshot(latest=rev(2, SUPERSEDED), live=V1),
        "live",
        "live",
        1,
    ),
    Case("stopped, nothing serves", Snapshot(latest=rev(1, STOPPED)), "stopped", "stopped", 1),
]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_ps_and_the_dashboard_say_one_state(case: Case) -> None:
    said = status(case.snapshot)
    cell = heading(said)
    assert ps_state(said) == case.ps
    assert cell.state == case.cell
    assert (cell.revision.ordinal if cell.revision else None) == case.about
    assert cell.notes == case.notes
    assert said.reason == case.reason


def test_a_ps_row_shows_the_live_revision_and_takes_the_url_it_is_given() -> None:
    latest = rev(2, FAILED, "exited with code 3")
    snapshot = Snapshot(latest=latest, live=V1, restarts=2, weights={1: 100}, behind=HEAD)
    url = "http://app.main.localhost:7080/"
    lines = ["Traceback", "SystemExit: 3"]
    command = "branchyard logs app --revision 2"
    row = service_row("main", "app", snapshot, url, lines, command)
    assert row == {
        "namespace": "main",
        "service": "app",
        "state": "live (v2 failed), behind main (17d8b23)",
        "reason": "exited with code 3",
        "live": {
            "ordinal": 1,
            "sha": "1" * 40,
            "sha7": "1111111",
            "branch": "main",
            "state": "live",
            "reason": "",
            "subject": "commit 1",
            "settings": "",
            "created_at": 1001.0,
            "changed_at": 2001.0,
        },
        "latest": row["latest"],
        "pinned": None,
        "weights": {1: 100},
        "restarts": 2,
        "last_lines": lines,
        "logs_command": command,
        "behind": True,
        "url": url,
        "since": 2001.0,
    }
    assert row["latest"] is not None
    assert (row["latest"]["ordinal"], row["latest"]["state"]) == (2, "failed")


def test_a_slot_with_no_revision_has_an_empty_row() -> None:
    row = service_row("feature-x", "web", Snapshot(), "http://web.feature-x.localhost:7080/")
    assert (row["state"], row["live"], row["latest"], row["since"]) == ("pending", None, None, None)
    assert (row["last_lines"], row["logs_command"], row["behind"]) == ([], "", False)
