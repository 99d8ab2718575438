"""Unit tests for the serving choices: a slot's revisions, pin and traffic in, a choice
and the rows it changes out."""

from __future__ import annotations

from collections.abc import Mapping

import pytest

from branchyard.errors import NotFound, UsageError
from branchyard.model import Overlay, Revision, RevisionState, Target
from branchyard.serving import (
    DAEMON_STOPPED,
    INTERRUPTED,
    RESTARTED,
    SUPERSEDED,
    Change,
    NewEvent,
    NewRevision,
    PinChange,
    SlotView,
    StateChange,
    behind,
    cancellation,
    deployment,
    failure,
    going_back,
    heaviest,
    keep,
    landing,
    pinning,
    recovery,
    retrying,
    select,
    serving,
    split,
    switch,
    unpinning,
)

SLOT = ("main", "app")
HEAD = "2222222" + "b" * 33
OLD = "1111111" + "a" * 33

BUILDING = RevisionState.BUILDING
STAGED = RevisionState.STAGED
STARTING = RevisionState.STARTING
LIVE = RevisionState.LIVE
STOPPED = RevisionState.STOPPED
CRASHED = RevisionState.CRASHED
FAILED = RevisionState.FAILED
GONE = RevisionState.SUPERSEDED


def rev(
    ordinal: int,
    state: RevisionState,
    reason: str = "",
    sha: str = OLD,
    slot: tuple[str, str] = SLOT,
) -> Revision:
    """Revision ``ordinal`` of ``slot``; its id is 100 times its slot's number plus it."""
    return Revision(
        id=(100 if slot == SLOT else 200) + ordinal,
        namespace=slot[0],
        service=slot[1],
        ordinal=ordinal,
        repo=slot[1],
        url=f"/srv/git/{slot[1]}.git",
        branch="main",
        sha=sha,
        subject="",
        key=f"{sha}::",
        settings_version="",
        env={},
        state=state,
        reason=reason,
        port=None,
        created_at=0.0,
        changed_at=0.0,
    )


def target(sha: str = HEAD) -> Target:
    return Target("main", "app", "app", "/srv/git/app.git", "main", sha, Overlay(""), ())


def view(
    *history: Revision,
    weights: Mapping[int, int] | None = None,
    running: set[int] | None = None,
) -> SlotView:
    """A slot view with ``history`` given oldest first, as one reads a table; what has
    weight runs unless ``running`` says otherwise."""
    weights = weights or {}
    ran = frozenset(weights) if running is None else frozenset(running)
    return SlotView(SLOT, tuple(reversed(history)), dict(weights), ran)


def ordinal(revision: Revision | None) -> int | None:
    return None if revision is None else revision.ordinal


# -- which revision serves ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("weights", "chosen"),
    [
        pytest.param({}, None, id="no-traffic"),
        pytest.param({3: 100}, 3, id="one"),
        pytest.param({2: 90, 3: 10}, 2, id="most-weight"),
        pytest.param({2: 50, 3: 50}, 3, id="tie-to-the-newer"),
        pytest.param({2: 0, 3: 0}, 3, id="all-zero"),
    ],
)
def test_the_heaviest_revision_takes_the_most_traffic(
    weights: dict[int, int], chosen: int | None
) -> None:
    assert heaviest(weights) == chosen


@pytest.mark.parametrize(
    ("slot", "live"),
    [
        pytest.param(view(rev(1, LIVE)), None, id="nothing-routed"),
        pytest.param(view(rev(1, STOPPED), rev(2, LIVE), weights={2: 100}), 2, id="one-routed"),
        pytest.param(
            view(rev(1, LIVE), rev(2, LIVE), weights={1: 80, 2: 20}), 1, id="canary-keeps-older"
        ),
        pytest.param(
            view(rev(1, LIVE), rev(2, LIVE), weights={1: 80, 2: 20}, running={2}),
            2,
            id="only-what-runs",
        ),
    ],
)
def test_the_live_revision_is_the_heaviest_that_runs(slot: SlotView, live: int | None) -> None:
    assert ordinal(serving(slot)) == live


# -- rollback, promote, weight ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("slot", "start", "back_to"),
    [
        pytest.param(view(), None, None, id="no-revisions"),
        pytest.param(view(rev(1, FAILED)), None, None, id="nothing-served"),
        pytest.param(view(rev(1, LIVE), weights={1: 100}), 1, None, id="nothing-before"),
        pytest.param(
            view(rev(1, STOPPED), rev(2, LIVE), weights={2: 100}), 2, 1, id="to-the-one-before"
        ),
        pytest.param(
            view(rev(1, STOPPED), rev(2, FAILED), rev(3, GONE), rev(4, LIVE), weights={4: 100}),
            4,
            1,
            id="skips-what-never-served",
        ),
        pytest.param(
            view(rev(1, STOPPED), rev(2, CRASHED), rev(3, LIVE), weights={3: 100}),
            3,
            1,
            id="skips-a-crashed-one",
        ),
        pytest.param(
            view(rev(1, STOPPED), rev(2, STAGED), rev(3, LIVE), weights={3: 100}),
            3,
            2,
            id="to-a-staged-one",
        ),
        pytest.param(
            view(rev(1, STOPPED), rev(2, LIVE), rev(3, STOPPED), weights={2: 100}),
            2,
            1,
            id="from-an-older-live-one",
        ),
        pytest.param(
            view(rev(1, STOPPED), rev(2, CRASHED), rev(3, CRASHED)),
            3,
            1,
            id="from-the-newest-crash",
        ),
        pytest.param(
            view(rev(1, STOPPED), rev(2, LIVE), rev(3, LIVE), weights={3: 100}),
            3,
            2,
            id="to-one-that-still-drains",
        ),
    ],
)
def test_a_rollback_goes_from_what_serves_to_the_newest_earlier_one_that_served(
    slot: SlotView, start: int | None, back_to: int | None
) -> None:
    assert tuple(map(ordinal, going_back(slot))) == (start, back_to)
    if back_to is not None:
        assert ordinal(select(slot, None)) == back_to


@pytest.mark.parametrize(
    ("slot", "error", "message"),
    [
        pytest.param(view(), UsageError, "app in main has no live revision to go back from"),
        pytest.param(
            view(rev(1, LIVE), weights={1: 100}),
            UsageError,
            "app in main has no revision before v1 to go back to",
        ),
    ],
)
def test_a_rollback_with_nowhere_to_go_says_why(
    slot: SlotView, error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=f"^{message}$"):
        select(slot, None)


HISTORY = view(
    rev(1, STOPPED),
    rev(2, FAILED),
    rev(3, GONE),
    rev(4, CRASHED),
    rev(5, STAGED),
    rev(6, LIVE),
    rev(7, BUILDING),
    weights={6: 100},
)


@pytest.mark.parametrize(
    ("named", "message"),
    [
        (1, None),
        (2, "v2 is failed; it cannot serve"),
        (3, "v3 is superseded; it cannot serve"),
        (4, None),
        (5, None),
        (6, None),
        (7, "v7 is building; it cannot serve"),
    ],
)
def test_a_named_revision_is_chosen_if_it_can_serve(named: int, message: str | None) -> None:
    if message is None:
        assert ordinal(select(HISTORY, named)) == named
    else:
        with pytest.raises(UsageError, match=f"^{message}$"):
            select(HISTORY, named)


def test_a_revision_that_never_was_is_not_found() -> None:
    with pytest.raises(NotFound, match=r"^app in main has no revision v9$"):
        select(HISTORY, 9)


def test_a_pin_is_one_change_with_its_event() -> None:
    assert pinning(rev(4, STOPPED), "rollback") == Change(
        pin=PinChange(SLOT, 4), events=(NewEvent("rollback", "v4 1111111 pinned", SLOT),)
    )


@pytest.mark.parametrize(
    ("percents", "message"),
    [
        ({}, "weights must be REV=PCT with at least one above 0"),
        ({1: 0, 6: 0}, "weights must be REV=PCT with at least one above 0"),
        ({1: 110, 6: -10}, "weights must be REV=PCT with at least one above 0"),
        ({2: 10, 6: 90}, "v2 is failed; it cannot serve"),
        ({1: 1_000_001, 6: 1}, "a split takes at most 16 revisions, each at most 1000000"),
        ({n: 1 for n in range(1, 18)}, "a split takes at most 16 revisions, each at most 1000000"),
    ],
)
def test_a_split_that_cannot_be_is_refused_before_anything(
    percents: dict[int, int], message: str
) -> None:
    with pytest.raises(UsageError, match=f"^{message}$"):
        split(HISTORY, percents)


NO_SPLIT = "weights need the Gateway API"


@pytest.mark.parametrize(
    ("percents", "message"),
    [
        ({1: 90, 6: 10}, NO_SPLIT),
        ({1: 100, 6: 0}, NO_SPLIT),
        ({1: 0}, "weights must be REV=PCT with at least one above 0"),
    ],
)
def test_a_split_the_traffic_layer_cannot_make_is_refused_before_anything(
    percents: dict[int, int], message: str
) -> None:
    with pytest.raises(UsageError, match=f"^{message}$"):
        split(HISTORY, percents, cannot_split=NO_SPLIT)


def test_one_revision_at_a_weight_is_a_pin_even_where_nothing_splits() -> None:
    chosen = split(HISTORY, {1: 100}, cannot_split=NO_SPLIT)
    assert chosen.weights == {1: 100} and chosen.heaviest.ordinal == 1


@pytest.mark.parametrize(
    ("percents", "top", "shares"),
    [
        ({6: 90, 1: 10}, 6, "v1=10, v6=90"),
        ({1: 50, 6: 50}, 6, "v1=50, v6=50"),
        ({1: 100, 6: 0}, 1, "v1=100, v6=0"),
        ({1: 1_000_000, 6: 1}, 1, "v1=1000000, v6=1"),
    ],
)
def test_a_split_pins_the_heaviest_and_says_the_shares(
    percents: dict[int, int], top: int, shares: str
) -> None:
    chosen = split(HISTORY, percents)
    assert sorted(chosen.revisions) == sorted(percents)
    assert chosen.heaviest.ordinal == top
    assert chosen.weights == percents
    assert chosen.change == Change(
        pin=PinChange(SLOT, top), events=(NewEvent("weight", shares, SLOT),)
    )


# -- going live ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("slot", "weights", "after", "retire"),
    [
        pytest.param(view(rev(1, BUILDING)), None, {1: 100}, (), id="first"),
        pytest.param(
            view(rev(1, LIVE), rev(2, STARTING), weights={1: 100}),
            None,
            {2: 100},
            (1,),
            id="replaces",
        ),
        pytest.param(
            view(rev(1, LIVE), rev(2, LIVE), rev(3, STARTING), weights={1: 50, 2: 50}),
            None,
            {3: 100},
            (1, 2),
            id="replaces-a-split",
        ),
        pytest.param(
            view(rev(1, LIVE), rev(2, STARTING), weights={1: 100}),
            {1: 80, 2: 20},
            {1: 80, 2: 20},
            (),
            id="split-keeps-both",
        ),
        pytest.param(
            view(rev(1, LIVE), rev(2, LIVE), rev(3, STARTING), weights={1: 50, 2: 50}),
            {2: 10, 3: 90},
            {2: 10, 3: 90},
            (1,),
            id="split-drops-one",
        ),
        pytest.param(view(rev(1, LIVE), weights={1: 100}), None, {1: 100}, (), id="already-live"),
    ],
)
def test_going_live_takes_the_traffic_and_retires_what_had_it(
    slot: SlotView,
    weights: dict[int, int] | None,
    after: dict[int, int],
    retire: tuple[int, ...],
) -> None:
    newest = slot.history[0]
    decided = switch(slot, newest, weights, 4001)
    assert dict(decided.weights) == after
    assert decided.retire == retire
    assert decided.reason == f"replaced by v{newest.ordinal}"
    assert decided.change == Change(
        states=(StateChange(newest.id, LIVE, port=4001),),
        events=(NewEvent("live", f"v{newest.ordinal} 1111111 takes traffic", SLOT),),
    )


@pytest.mark.parametrize(
    ("slot", "goes_live"),
    [
        pytest.param(view(rev(1, LIVE), weights={1: 100}), None, id="head-never-built"),
        pytest.param(
            view(rev(1, LIVE, sha=HEAD), weights={1: 100}), None, id="head-has-all-traffic"
        ),
        pytest.param(
            view(rev(1, LIVE), rev(2, STAGED, sha=HEAD), weights={1: 100}),
            2,
            id="staged-head",
        ),
        pytest.param(
            view(rev(1, STOPPED, sha=HEAD), rev(2, LIVE), weights={2: 100}),
            1,
            id="promoted-older-back-to-head",
        ),
        pytest.param(
            view(rev(1, LIVE, sha=HEAD), rev(2, LIVE), weights={1: 50, 2: 50}),
            1,
            id="head-in-a-split",
        ),
        pytest.param(
            view(rev(1, STOPPED, sha=HEAD), rev(2, STOPPED, sha=HEAD), rev(3, LIVE)),
            2,
            id="newest-of-the-head",
        ),
        pytest.param(
            view(rev(1, LIVE), rev(2, FAILED, sha=HEAD), rev(3, CRASHED, sha=HEAD)),
            None,
            id="head-failed-or-crashed",
        ),
        pytest.param(view(rev(1, LIVE), rev(2, BUILDING, sha=HEAD)), None, id="head-building"),
    ],
)
def test_unpin_sends_traffic_to_the_newest_ready_revision_of_the_head(
    slot: SlotView, goes_live: int | None
) -> None:
    decided = unpinning(slot, target().key)
    assert ordinal(decided.to) == goes_live
    assert decided.change == Change(
        pin=PinChange(SLOT, None),
        events=(NewEvent("unpin", "traffic follows new commits again", SLOT),),
    )


# -- retention -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("slot", "kept"),
    [
        pytest.param(view(), set(), id="nothing"),
        pytest.param(
            view(*(rev(o, STOPPED) for o in range(1, 9))), {4, 5, 6, 7, 8}, id="last-five"
        ),
        pytest.param(
            view(*(rev(o, STOPPED) for o in range(1, 8)), rev(8, LIVE), weights={8: 100}),
            {3, 4, 5, 6, 7, 8},
            id="what-runs-is-beside-the-last-five",
        ),
        pytest.param(
            view(*(rev(o, s) for o, s in enumerate([LIVE, STOPPED, STOPPED, CRASHED], 1))),
            {1, 2, 3, 4},
            id="live-stopped-crashed-count",
        ),
        pytest.param(
            view(
                rev(1, STOPPED),
                rev(2, STOPPED),
                *(rev(o, s) for o in range(3, 9) for s in [FAILED]),
                rev(9, GONE),
                rev(10, BUILDING),
            ),
            {1, 2},
            id="never-served-are-not-kept",
        ),
        pytest.param(
            view(
                rev(1, LIVE),
                *(rev(o, STOPPED) for o in range(2, 9)),
                rev(9, STAGED),
                weights={1: 100},
            ),
            {1, 4, 5, 6, 7, 8, 9},
            id="pinned-old-and-staged-beside-the-last-five",
        ),
        pytest.param(
            view(*(rev(o, STOPPED) for o in range(1, 8)), running={1}),
            {1, 3, 4, 5, 6, 7},
            id="running-without-traffic",
        ),
    ],
)
def test_pruning_keeps_what_runs_what_is_staged_and_the_last_few(
    slot: SlotView, kept: set[int]
) -> None:
    assert keep(slot) == kept


def test_the_number_of_builds_kept_can_be_given() -> None:
    assert keep(view(*(rev(o, STOPPED) for o in range(1, 5))), keep_builds=1) == {4}


# -- deploys ---------------------------------------------------------------------------------


def new(ordinal: int, reason: str = "new commit") -> Change:
    return Change(
        new=NewRevision(target(), ordinal, "subject", BUILDING),
        events=(NewEvent("deploy", f"v{ordinal} {reason}", SLOT),),
    )


def again(revision: Revision, reason: str = "new commit") -> Change:
    return Change(
        states=(StateChange(revision.id, BUILDING),),
        events=(NewEvent("deploy", f"v{revision.ordinal} {reason}", SLOT),),
    )


@pytest.mark.parametrize(
    ("latest", "change"),
    [
        pytest.param(None, new(1), id="first"),
        pytest.param(rev(3, LIVE), new(4), id="another-commit"),
        pytest.param(rev(3, STOPPED, RESTARTED, sha=HEAD), again(rev(3, STOPPED)), id="restarted"),
        pytest.param(
            rev(3, STOPPED, DAEMON_STOPPED, sha=HEAD), again(rev(3, STOPPED)), id="daemon-stopped"
        ),
        pytest.param(
            rev(3, STOPPED, INTERRUPTED, sha=HEAD), again(rev(3, STOPPED)), id="interrupted"
        ),
        pytest.param(rev(3, STAGED, "pinned", sha=HEAD), again(rev(3, STAGED)), id="staged"),
        pytest.param(rev(3, STOPPED, RESTARTED), new(4), id="restarted-other-commit"),
        pytest.param(rev(3, STOPPED, "replaced by v4", sha=HEAD), new(4), id="replaced"),
        pytest.param(rev(3, FAILED, "build failed", sha=HEAD), new(4), id="failed"),
        pytest.param(rev(3, GONE, SUPERSEDED, sha=HEAD), new(4), id="superseded"),
        pytest.param(rev(3, CRASHED, "exited", sha=HEAD), new(4), id="crashed"),
    ],
)
def test_a_deploy_resumes_an_interrupted_revision_of_its_target_or_makes_a_new_one(
    latest: Revision | None, change: Change
) -> None:
    assert deployment(latest, target(), "subject", "new commit") == change


@pytest.mark.parametrize(
    ("pin", "serves", "staged", "restore"),
    [
        pytest.param(None, True, False, False, id="unpinned"),
        pytest.param(None, False, False, False, id="unpinned-first"),
        pytest.param(2, True, False, False, id="pinned-to-it"),
        pytest.param(2, False, False, False, id="pinned-to-it-restarted"),
        pytest.param(1, True, True, False, id="pinned-elsewhere"),
        pytest.param(1, False, True, True, id="pinned-elsewhere-nothing-serves"),
    ],
)
def test_a_built_revision_goes_live_unless_the_slot_is_pinned_to_another(
    pin: int | None, serves: bool, staged: bool, restore: bool
) -> None:
    staging = landing(pin, rev(2, BUILDING), serves)
    if not staged:
        assert staging is None
        return
    assert staging is not None
    assert (staging.pin, staging.restore) == (1, restore)
    reason = "pinned to v1: promote or unpin to use it"
    assert staging.change == Change(states=(StateChange(102, STAGED, reason),))


def says(state: RevisionState, reason: str, *event: str) -> Change:
    """Revision v2 (id 102) in ``state`` for ``reason``, with an event (kind, message)."""
    events = (NewEvent(event[0], event[1], SLOT),) if event else ()
    return Change(states=(StateChange(102, state, reason),), events=events)


V2 = rev(2, BUILDING)


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        pytest.param(
            failure(V2, "no web: line"),
            says(FAILED, "no web: line", "failed", "v2: no web: line"),
            id="failed",
        ),
        pytest.param(
            retrying(V2, "in 2s", first=True),
            says(BUILDING, "in 2s", "retry", "v2: in 2s"),
            id="retrying-first",
        ),
        pytest.param(retrying(V2, "in 4s", first=False), says(BUILDING, "in 4s"), id="retrying"),
        pytest.param(cancellation(V2, closing=False), says(GONE, SUPERSEDED), id="superseded"),
        pytest.param(cancellation(V2, closing=True), says(STOPPED, INTERRUPTED), id="interrupted"),
    ],
)
def test_a_deploy_that_fails_waits_or_goes_no_further_says_why(
    change: Change, expected: Change
) -> None:
    assert change == expected


@pytest.mark.parametrize(
    ("head", "live", "latest", "is_behind"),
    [
        pytest.param(None, rev(1, LIVE), rev(1, LIVE), False, id="no-target"),
        pytest.param(target(), None, rev(1, FAILED, sha=HEAD), False, id="nothing-serves"),
        pytest.param(target(), rev(1, LIVE, sha=HEAD), rev(1, LIVE, sha=HEAD), False, id="head"),
        pytest.param(target(), rev(1, LIVE), rev(2, STOPPED, sha=HEAD), True, id="rolled-back"),
        pytest.param(target(), rev(1, LIVE), rev(1, LIVE), True, id="head-not-built"),
        pytest.param(target(), rev(1, LIVE), rev(2, BUILDING, sha=HEAD), False, id="building"),
        pytest.param(target(), rev(1, LIVE), rev(2, STARTING, sha=HEAD), False, id="starting"),
        pytest.param(target(), rev(1, LIVE), rev(2, STAGED, sha=HEAD), False, id="staged"),
        pytest.param(target(), rev(1, LIVE), rev(2, FAILED, sha=HEAD), False, id="failed"),
        pytest.param(target(), rev(1, LIVE), rev(2, CRASHED, sha=HEAD), True, id="crashed"),
    ],
)
def test_ps_says_behind_when_an_older_commit_serves_and_nothing_else_says_so(
    head: Target | None, live: Revision | None, latest: Revision | None, is_behind: bool
) -> None:
    assert behind(head, live, latest) == (head if is_behind else None)


# -- a daemon's start ------------------------------------------------------------------------

WEB = ("main", "web")


def web(ordinal: int, state: RevisionState, reason: str = "") -> Revision:
    return rev(ordinal, state, reason, slot=WEB)


def stops(*revisions: Revision) -> Change:
    return Change(states=tuple(StateChange(r.id, STOPPED, RESTARTED) for r in revisions))


@pytest.mark.parametrize(
    ("left", "pins", "restored", "stopped"),
    [
        pytest.param([], {}, [], [], id="nothing"),
        pytest.param(
            [web(1, LIVE), rev(2, LIVE)], {}, [rev(2, LIVE), web(1, LIVE)], [102, 201], id="killed"
        ),
        pytest.param(
            [rev(1, STOPPED, DAEMON_STOPPED), rev(2, STOPPED, DAEMON_STOPPED)],
            {},
            [rev(2, STOPPED, DAEMON_STOPPED)],
            [],
            id="stopped-cleanly-newest",
        ),
        pytest.param(
            [rev(1, STOPPED, DAEMON_STOPPED), rev(2, STOPPED, DAEMON_STOPPED)],
            {SLOT: 1},
            [rev(1, STOPPED, DAEMON_STOPPED)],
            [],
            id="stopped-cleanly-pinned",
        ),
        pytest.param(
            [rev(1, LIVE), rev(2, LIVE), rev(3, BUILDING)],
            {SLOT: 1},
            [rev(1, LIVE)],
            [101, 102, 103],
            id="killed-pinned-in-a-split",
        ),
        pytest.param(
            [rev(1, LIVE), rev(2, STARTING), rev(3, BUILDING)],
            {},
            [rev(1, LIVE)],
            [101, 102, 103],
            id="killed-mid-deploy",
        ),
        pytest.param([rev(1, LIVE)], {SLOT: 4}, [], [101], id="pinned-one-gone-restores-nothing"),
        pytest.param(
            [rev(1, STOPPED, "replaced by v2"), rev(2, FAILED), rev(3, STOPPED, RESTARTED)],
            {},
            [],
            [],
            id="other-stops-ignored",
        ),
    ],
)
def test_a_restart_brings_back_what_served_when_the_last_daemon_ended(
    left: list[Revision],
    pins: dict[tuple[str, str], int],
    restored: list[Revision],
    stopped: list[int],
) -> None:
    decided = recovery(left, pins)
    assert list(decided.restore) == restored
    assert decided.change == Change(
        states=tuple(StateChange(rid, STOPPED, RESTARTED) for rid in stopped)
    )


def test_changes_add_up_into_one() -> None:
    live = switch(view(rev(1, STARTING)), rev(1, STARTING), None, None).change
    both = live + pinning(rev(1, LIVE), "promote")
    assert both.states == live.states
    assert both.pin == PinChange(SLOT, 1)
    assert [e.kind for e in both.events] == ["live", "promote"]
    assert (Change() + stops(rev(1, LIVE))).states == stops(rev(1, LIVE)).states
