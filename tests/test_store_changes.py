"""Unit tests for Store.apply: a decided change is written whole, or not at all."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from branchyard.errors import Conflict, NotFound
from branchyard.model import Revision, RevisionState
from branchyard.serving import (
    RESTARTED,
    Change,
    NewEvent,
    NewRevision,
    PinChange,
    StateChange,
    deployment,
    pinning,
    recovery,
)
from branchyard.store import Store
from tests.test_store import FakeClock, new_revision, target

SLOT = ("main", "app")


@pytest.fixture
def told() -> list[Revision]:
    return []


@pytest.fixture
def store(tmp_path: Path, told: list[Revision]) -> Iterator[Store]:
    opened = Store(tmp_path / "state.sqlite", clock=FakeClock())
    opened.listen(told.append)
    yield opened
    opened.close()


def snapshot(store: Store) -> tuple[object, ...]:
    """Every row a change may touch."""
    return (
        store.revisions(SLOT),
        store.revisions(("bugfix", "app")),
        store.pin(SLOT),
        [(e["kind"], e["message"]) for e in store.events()],
    )


def test_a_deploy_makes_its_revision_and_says_so_in_one_change(
    store: Store, told: list[Revision]
) -> None:
    (made,) = store.apply(deployment(None, target(), "first commit", "new: main@1111111"))
    assert (made.ordinal, made.state, made.subject) == (1, RevisionState.BUILDING, "first commit")
    assert store.revisions(SLOT) == [made] == told
    assert [(e["kind"], e["message"]) for e in store.events()] == [
        ("deploy", "v1 new: main@1111111")
    ]


def test_a_revision_going_live_with_its_pin_and_events_is_one_change(
    store: Store, told: list[Revision]
) -> None:
    first = new_revision(store, target(), RevisionState.STARTING)
    told.clear()
    live = Change(
        states=(StateChange(first.id, RevisionState.LIVE, port=9001),),
        events=(NewEvent("live", "v1 takes traffic", SLOT),),
    )
    (after,) = store.apply(live + pinning(first, "promote"))
    assert (after.state, after.port) == (RevisionState.LIVE, 9001)
    assert told == [after]
    assert store.pin(SLOT) == 1
    assert [e["kind"] for e in store.events()] == ["live", "promote"]
    store.apply(Change(pin=PinChange(("bugfix", "web"), 3)))
    assert store.pins() == {SLOT: 1, ("bugfix", "web"): 3}
    store.apply(Change(pin=PinChange(SLOT, None)))
    assert store.pins() == {("bugfix", "web"): 3}


def test_a_restart_stops_every_revision_it_found_active_in_one_change(store: Store) -> None:
    made = [new_revision(store, target(service=s), RevisionState.LIVE) for s in ("a", "b", "c")]
    decided = recovery(made, {})
    changed = store.apply(decided.change)
    assert [(r.id, r.state, r.reason) for r in changed] == [
        (r.id, RevisionState.STOPPED, RESTARTED) for r in made
    ]
    assert store.active_revisions() == []


@pytest.mark.parametrize(
    ("broken", "error"),
    [
        pytest.param(StateChange(999, RevisionState.LIVE), NotFound, id="unknown-revision"),
        pytest.param(None, Conflict, id="ordinal-taken"),
    ],
)
def test_a_change_that_cannot_be_written_whole_writes_nothing(
    store: Store, told: list[Revision], broken: StateChange | None, error: type[Exception]
) -> None:
    first = new_revision(store, target(), RevisionState.LIVE)
    other = new_revision(store, target("bugfix"), RevisionState.BUILDING)
    store.set_pin(SLOT, 1)
    store.event("push", "app: 1 branch heads")
    told.clear()
    before = snapshot(store)
    new = NewRevision(target(), 1 if broken is None else 2, "", RevisionState.BUILDING)
    change = Change(
        new=new,
        states=(
            StateChange(first.id, RevisionState.STOPPED, "replaced by v2"),
            StateChange(other.id, RevisionState.FAILED, "no web: line"),
            *([broken] if broken else []),
        ),
        pin=PinChange(SLOT, None),
        events=(NewEvent("live", "v2 takes traffic", SLOT),),
    )
    with pytest.raises(error):
        store.apply(change)
    assert snapshot(store) == before
    assert told == []
