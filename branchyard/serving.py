"""Serving: which revision of a slot serves, and what each change of it writes. Pure.

The rollouts and the engine act; this module decides for them, as the planner
decides what should run. Each choice is a function over what is known at one
moment: of one slot (a :class:`SlotView`: its revisions newest first, its
traffic, what runs), or of the whole store when a daemon starts. Each state
change comes out as one :class:`Change`, the rows that change together (a
revision going live and its event, a pin and its event, every revision a
restart stops), which :meth:`branchyard.store.Store.apply` writes in one
transaction. Nothing here touches the store, processes or the clock.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from branchyard.errors import NotFound, UsageError
from branchyard.model import Revision, RevisionState, Target

Slot = tuple[str, str]  # (namespace, service)

KEEP_BUILDS = 5  # revisions per slot whose builds are kept for instant rollbacks
# The bounds of a split: the Gateway API's (an HTTPRoute's backendRefs and their weight), so
# a weight the local router takes is one a cluster takes.
MAX_SPLIT = 16
MAX_WEIGHT = 1_000_000
DAEMON_STOPPED = "daemon stopped"
RESTARTED = "daemon restarted"
INTERRUPTED = "the daemon stopped before it went live"
SUPERSEDED = "a newer target arrived"

# A deploy of the same target resumes its revision if it ended for one of these reasons.
RESUMABLE = (RESTARTED, DAEMON_STOPPED, INTERRUPTED)
# What may go live again: a rollback, a promote or a weight cannot name any other.
CANNOT_SERVE = (RevisionState.FAILED, RevisionState.SUPERSEDED, RevisionState.BUILDING)
# What `unpin` sends traffic to, if it is the branch head's.
READY = (RevisionState.STAGED, RevisionState.LIVE, RevisionState.STOPPED)
# Whose builds count among the last KEEP_BUILDS.
SERVED = (RevisionState.STOPPED, RevisionState.LIVE, RevisionState.CRASHED)
# A newest revision in one of these states shows that the head is on its way (or failed).
HEAD_SHOWN = (
    RevisionState.BUILDING,
    RevisionState.STARTING,
    RevisionState.STAGED,
    RevisionState.FAILED,
)


# -- changes: what the store writes, each in one transaction -------------------------------


@dataclass(frozen=True)
class NewRevision:
    target: Target
    ordinal: int
    subject: str
    state: RevisionState


@dataclass(frozen=True)
class StateChange:
    revision_id: int
    state: RevisionState
    reason: str = ""
    port: int | None = None  # None: keep the port it had


@dataclass(frozen=True)
class PinChange:
    slot: Slot
    ordinal: int | None  # None: unpinned


@dataclass(frozen=True)
class NewEvent:
    kind: str
    message: str
    slot: Slot | None = None


@dataclass(frozen=True)
class Change:
    """Rows that change together: all of them are written, or none."""

    new: NewRevision | None = None
    states: tuple[StateChange, ...] = ()
    pin: PinChange | None = None
    events: tuple[NewEvent, ...] = ()

    def __add__(self, other: Change) -> Change:
        """Both changes as one; ``other``'s new revision and pin win over this one's."""
        return Change(
            other.new or self.new,
            self.states + other.states,
            other.pin or self.pin,
            self.events + other.events,
        )


NO_CHANGE = Change()


# -- one slot at one moment -----------------------------------------------------------------


@dataclass(frozen=True)
class SlotView:
    """What is known of one slot: every choice about it below is made from one of these."""

    slot: Slot
    history: tuple[Revision, ...] = ()  # every revision, newest first
    weights: Mapping[int, int] = field(default_factory=dict)  # ordinal -> weight, what runs
    running: frozenset[int] = frozenset()  # ordinals whose processes run

    def revision(self, ordinal: int) -> Revision | None:
        return next((r for r in self.history if r.ordinal == ordinal), None)


def heaviest(weights: Mapping[int, int]) -> int | None:
    """The key with the most weight (the higher key of a tie), None if there is none."""
    return max(weights, key=lambda key: (weights[key], key), default=None)


def serving(view: SlotView) -> Revision | None:
    """The live revision: of those that run, the one with the most traffic."""
    ordinal = heaviest({o: w for o, w in view.weights.items() if o in view.running})
    return None if ordinal is None else view.revision(ordinal)


def going_back(view: SlotView) -> tuple[Revision | None, Revision | None]:
    """(from, to) of a rollback with no revision named: from the live revision, else
    from the newest one that crashed, to the newest earlier one that served (stopped,
    staged, or live still: taken out of traffic, it drains before it stops)."""
    start = serving(view) or next(
        (r for r in view.history if r.state is RevisionState.CRASHED), None
    )
    if start is None:
        return None, None
    earlier = (
        r
        for r in view.history
        if r.ordinal < start.ordinal
        and r.state in (RevisionState.STOPPED, RevisionState.STAGED, RevisionState.LIVE)
    )
    return start, next(earlier, None)


def select(view: SlotView, ordinal: int | None) -> Revision:
    """The revision a rollback (no ordinal), a promote or a weight names, if it can serve."""
    namespace, service = view.slot
    if ordinal is None:
        start, back_to = going_back(view)
        if start is None:
            raise UsageError(f"{service} in {namespace} has no live revision to go back from")
        if back_to is None:
            raise UsageError(
                f"{service} in {namespace} has no revision before v{start.ordinal} to go back to"
            )
        return back_to
    revision = view.revision(ordinal)
    if revision is None:
        raise NotFound(f"{service} in {namespace} has no revision v{ordinal}")
    if revision.state in CANNOT_SERVE:
        raise UsageError(f"v{ordinal} is {revision.state.value}; it cannot serve")
    return revision


@dataclass(frozen=True)
class Split:
    """A canary: the revisions to start, the one that counts as live, and the pin."""

    revisions: Mapping[int, Revision]  # ordinal -> revision, of every weight named
    weights: Mapping[int, int]  # ordinal -> percent
    heaviest: Revision
    change: Change  # the pin to the heaviest, and the weight event


def split(view: SlotView, percents: Mapping[int, int], cannot_split: str = "") -> Split:
    """What ``weight REV=PCT...`` does to a slot; UsageError or NotFound before anything.
    ``cannot_split`` is why the traffic layer cannot split by weight ("" if it can): then
    only one revision may be named (which pins it)."""
    if not percents or any(p < 0 for p in percents.values()) or not any(percents.values()):
        raise UsageError("weights must be REV=PCT with at least one above 0")
    if max(percents.values()) > MAX_WEIGHT or len(percents) > MAX_SPLIT:
        raise UsageError(f"a split takes at most {MAX_SPLIT} revisions, each at most {MAX_WEIGHT}")
    if len(percents) > 1 and cannot_split:
        raise UsageError(cannot_split)
    revisions = {ordinal: select(view, ordinal) for ordinal in percents}
    top = max(percents, key=lambda o: (percents[o], o))
    shares = ", ".join(f"v{o}={p}" for o, p in sorted(percents.items()))
    change = Change(pin=PinChange(view.slot, top), events=(NewEvent("weight", shares, view.slot),))
    return Split(revisions, dict(percents), revisions[top], change)


@dataclass(frozen=True)
class Switch:
    """A revision going live: the slot's traffic after it, and what leaves it."""

    weights: Mapping[int, int]  # ordinal -> weight
    retire: tuple[int, ...]  # ordinals that had traffic and have none now
    reason: str  # why they are retired
    change: Change  # the revision live (on its port), and the live event


def switch(
    view: SlotView, revision: Revision, weights: Mapping[int, int] | None, port: int | None
) -> Switch:
    """``revision`` takes all the traffic, or ``weights`` (ordinal -> weight)."""
    after = dict(weights) if weights else {revision.ordinal: 100}
    message = f"v{revision.ordinal} {revision.sha7} takes traffic"
    change = Change(
        states=(StateChange(revision.id, RevisionState.LIVE, port=port),),
        events=(NewEvent("live", message, view.slot),),
    )
    retire = tuple(sorted(view.weights.keys() - after.keys()))
    return Switch(after, retire, f"replaced by v{revision.ordinal}", change)


def pinning(revision: Revision, what: str) -> Change:
    """The slot pinned to ``revision`` by a rollback, promote or restore (``what``)."""
    slot = (revision.namespace, revision.service)
    message = f"v{revision.ordinal} {revision.sha7} pinned"
    return Change(pin=PinChange(slot, revision.ordinal), events=(NewEvent(what, message, slot),))


@dataclass(frozen=True)
class Unpin:
    change: Change  # the pin dropped, and the unpin event
    to: Revision | None  # what goes live: the head's, if it is ready and not all traffic yet


def unpinning(view: SlotView, head: str) -> Unpin:
    """Drop the pin; traffic goes to the newest ready revision of the branch head (whose
    target key is ``head``), unless there is none or it has all the traffic already."""
    change = Change(
        pin=PinChange(view.slot, None),
        events=(NewEvent("unpin", "traffic follows new commits again", view.slot),),
    )
    newest = next((r for r in view.history if r.key == head and r.state in READY), None)
    if newest is not None and dict(view.weights) == {newest.ordinal: 100}:
        newest = None
    return Unpin(change, newest)


def keep(view: SlotView, keep_builds: int = KEEP_BUILDS) -> frozenset[int]:
    """The ordinals whose builds are kept: what runs, what is staged, and the newest
    ``keep_builds`` of the others that served."""
    kept: set[int] = set()
    served = 0
    for revision in view.history:
        if revision.ordinal in view.running or revision.state is RevisionState.STAGED:
            kept.add(revision.ordinal)
        elif revision.state in SERVED and served < keep_builds:
            kept.add(revision.ordinal)
            served += 1
    return frozenset(kept)


# -- deploys ----------------------------------------------------------------------------------


def deployment(latest: Revision | None, target: Target, subject: str, reason: str) -> Change:
    """The revision a deploy of ``target`` builds, with its deploy event: the slot's
    ``latest`` again if it is the target's and a restart, a stop or a pin interrupted
    it (it keeps its ordinal and build), else a new one."""
    slot = (target.namespace, target.service)
    if (
        latest is not None
        and latest.key == target.key
        and (latest.reason in RESUMABLE or latest.state is RevisionState.STAGED)
    ):
        event = NewEvent("deploy", f"v{latest.ordinal} {reason}", slot)
        return Change(states=(StateChange(latest.id, RevisionState.BUILDING),), events=(event,))
    ordinal = latest.ordinal + 1 if latest is not None else 1
    event = NewEvent("deploy", f"v{ordinal} {reason}", slot)
    return Change(
        new=NewRevision(target, ordinal, subject, RevisionState.BUILDING), events=(event,)
    )


@dataclass(frozen=True)
class Staging:
    """A built revision that takes no traffic, since its slot is pinned to another one."""

    pin: int
    restore: bool  # nothing serves: the pinned revision goes live again first
    change: Change  # the revision staged


def landing(pin: int | None, revision: Revision, serving: bool) -> Staging | None:
    """How a built ``revision`` is staged, or None if it goes live: its slot is pinned
    (``pin``) to none or to it. The pinned one is brought back if nothing is ``serving``."""
    if pin is None or pin == revision.ordinal:
        return None
    reason = f"pinned to v{pin}: promote or unpin to use it"
    change = Change(states=(StateChange(revision.id, RevisionState.STAGED, reason),))
    return Staging(pin, not serving, change)


def retrying(revision: Revision, note: str, first: bool) -> Change:
    """A build that failed for a temporary reason and is tried again: the revision stays
    building and says when (``note``); the ``first`` time, with a retry event."""
    slot = (revision.namespace, revision.service)
    events = (NewEvent("retry", f"v{revision.ordinal}: {note}", slot),) if first else ()
    return Change(states=(StateChange(revision.id, RevisionState.BUILDING, note),), events=events)


def failure(revision: Revision, reason: str) -> Change:
    """``revision`` failed (to build or to start) because of ``reason``."""
    slot = (revision.namespace, revision.service)
    return Change(
        states=(StateChange(revision.id, RevisionState.FAILED, reason),),
        events=(NewEvent("failed", f"v{revision.ordinal}: {reason}", slot),),
    )


def cancellation(revision: Revision, closing: bool) -> Change:
    """A deploy cancelled: superseded by a newer target, or interrupted by the daemon
    stopping (``closing``; then the next daemon deploys it again)."""
    if closing:
        return Change(states=(StateChange(revision.id, RevisionState.STOPPED, INTERRUPTED),))
    return Change(states=(StateChange(revision.id, RevisionState.SUPERSEDED, SUPERSEDED),))


def behind(target: Target | None, live: Revision | None, latest: Revision | None) -> Target | None:
    """The branch head (``target``), if what serves (``live``) is another commit, unless
    the slot's ``latest`` revision is the head's on its way, staged or failed, which
    ``ps`` says anyway (so: after a rollback or a promote of an older revision)."""
    if target is None or live is None or live.sha == target.sha:
        return None
    if latest is not None and latest.sha == target.sha and latest.state in HEAD_SHOWN:
        return None
    return target


# -- a daemon's start ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Recovery:
    restore: tuple[Revision, ...]  # one per slot that served, as it was read
    change: Change  # every revision that was active, stopped: the daemon restarted


def recovery(revisions: Iterable[Revision], pins: Mapping[Slot, int]) -> Recovery:
    """What served when the last daemon ended, from the ``revisions`` it left active
    (it was killed) or stopped with :data:`DAEMON_STOPPED` (it stopped cleanly), others
    ignored: in each slot the pinned one, else the newest live or stopped one."""
    left = [
        r
        for r in revisions
        if r.state.active or (r.state is RevisionState.STOPPED and r.reason == DAEMON_STOPPED)
    ]
    restore: dict[Slot, Revision] = {}
    for revision in sorted(left, key=lambda r: r.ordinal, reverse=True):
        slot = (revision.namespace, revision.service)
        if revision.state not in (RevisionState.LIVE, RevisionState.STOPPED):
            continue
        pin = pins.get(slot)
        if revision.ordinal == pin or (pin is None and slot not in restore):
            restore[slot] = revision
    stops = tuple(
        StateChange(r.id, RevisionState.STOPPED, RESTARTED)
        for r in sorted(left, key=lambda r: r.id)
        if r.state.active
    )
    return Recovery(tuple(restore[slot] for slot in sorted(restore)), Change(states=stops))
