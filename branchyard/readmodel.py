"""The read model: what one service in one namespace is doing, worked out once.

``ps`` (through the API) and the dashboard show the same thing: :func:`status`,
a pure function over a :class:`Snapshot` of the slot (its newest revision, the
live one and whether that one is restarting, the weights, the pin, the branch
head it is behind). They word it each in their own way, both here:

- :func:`ps_state`, the STATE column, puts what serves first:
  ``live (v5 building)``, ``restarting (exit 3)``, ``live pinned v3, behind main
  (17d8b23)``;
- :func:`heading`, a dashboard cell, heads with the newest revision while it
  builds or starts, or after it failed (``building``, with ``v4 serves``), so
  that a failed deploy stands out.

The rows of the API (:func:`service_row`, :func:`revision_json`) are the
:mod:`branchyard.shapes` its clients read. The router address of a service is
given (its runtime knows it), not built here.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from branchyard import shapes
from branchyard.model import Revision, RevisionState

# States of a newer revision than the live one that are said beside it.
NEWS = (
    RevisionState.BUILDING,
    RevisionState.STARTING,
    RevisionState.STAGED,
    RevisionState.FAILED,
    RevisionState.CRASHED,
)
BROKEN = (RevisionState.FAILED, RevisionState.CRASHED)
PENDING = "pending"  # no revision yet
LIVE = "live"
RESTARTING = "restarting"  # the live revision's process exited; its supervisor restarts it


@dataclass(frozen=True)
class Head:
    """A branch head: the commit a slot follows."""

    branch: str
    sha: str


@dataclass(frozen=True)
class Snapshot:
    """What the state of one slot is worked out from."""

    latest: Revision | None = None  # the newest revision
    live: Revision | None = None  # the one that takes (most) traffic
    restarting: bool = False  # the live one's process is down and being restarted
    exit_code: int | None = None  # how the live one's process last exited
    restarts: int = 0
    weights: Mapping[int, int] = field(default_factory=dict)  # ordinal -> weight
    pinned: int | None = None
    behind: Head | None = None  # the branch head, when what serves is an older commit


@dataclass(frozen=True)
class Status:
    """One slot's state, as both ``ps`` and the dashboard say it."""

    state: str  # live, restarting, pending; else the newest revision's state (nothing serves)
    live: Revision | None
    latest: Revision | None
    newer: Revision | None  # the newest revision, beside the live one, when its state is news
    exit_code: int | None
    reason: str  # why the newest revision failed or crashed
    pinned: int | None
    traffic: str  # "pinned v3", "split v3=90 v5=10" or ""
    behind: str  # "behind main (17d8b23)" or ""

    @property
    def revision(self) -> Revision | None:
        """The revision ``ps`` shows: the live one, else the newest."""
        return self.live or self.latest


def status(snapshot: Snapshot) -> Status:
    """The one rule for a slot's state."""
    latest, live = snapshot.latest, snapshot.live
    newer = latest if live and latest and latest.id != live.id and latest.state in NEWS else None
    if live is not None:
        state = RESTARTING if snapshot.restarting else LIVE
    else:
        state = latest.state.value if latest else PENDING
    if len(snapshot.weights) > 1:
        traffic = "split " + " ".join(f"v{o}={w}" for o, w in sorted(snapshot.weights.items()))
    else:
        traffic = f"pinned v{snapshot.pinned}" if snapshot.pinned is not None else ""
    head = snapshot.behind
    return Status(
        state,
        live,
        latest,
        newer,
        snapshot.exit_code if snapshot.restarting else None,
        latest.reason if latest and latest.state in BROKEN else "",
        snapshot.pinned,
        traffic,
        f"behind {head.branch} ({head.sha[:7]})" if head else "",
    )


def ps_state(status: Status) -> str:
    """The STATE column of ``ps``: ``live (v5 failed) pinned v4, behind main (17d8b23)``."""
    aside = [f"exit {status.exit_code}"] if status.state == RESTARTING else []
    if status.newer is not None:
        aside.append(f"v{status.newer.ordinal} {status.newer.state.value}")
    text = status.state + (f" ({'; '.join(aside)})" if aside else "")
    if status.traffic:
        text += f" {status.traffic}"
    return f"{text}, {status.behind}" if status.behind else text


@dataclass(frozen=True)
class Heading:
    """What a dashboard cell says first: a state, the revision it is about, and notes."""

    state: str
    revision: Revision | None
    notes: tuple[str, ...]  # "v4 serves", "nothing serves", "v5 staged", "pinned v4", ...


def heading(status: Status) -> Heading:
    """A dashboard cell: the newest revision while it builds or starts, or after it
    failed; else what serves (or, with nothing serving, the newest)."""
    newer, live = status.newer, status.live
    state, shown = status.state, status.revision
    notes: list[str] = []
    if newer is not None and newer.state is not RevisionState.STAGED and live is not None:
        state, shown = newer.state.value, newer
        serving = (
            f"restarting (exit {status.exit_code})" if status.state == RESTARTING else "serves"
        )
        notes.append(f"v{live.ordinal} {serving}")
    elif newer is not None:
        notes.append(f"v{newer.ordinal} staged")
    elif live is None and status.state in BROKEN:
        notes.append("nothing serves")
    notes += [note for note in (status.traffic, status.behind) if note]
    return Heading(state, shown, tuple(notes))


def revision_json(revision: Revision) -> shapes.Revision:
    return {
        "ordinal": revision.ordinal,
        "sha": revision.sha,
        "sha7": revision.sha7,
        "branch": revision.branch,
        "state": revision.state.value,
        "reason": revision.reason,
        "subject": revision.subject,
        "settings": revision.settings_version,
        "created_at": revision.created_at,
        "changed_at": revision.changed_at,
    }


def _optional(revision: Revision | None) -> shapes.Revision | None:
    return revision_json(revision) if revision else None


def service_row(
    namespace: str,
    service: str,
    snapshot: Snapshot,
    url: str,
    last_lines: Sequence[str] = (),
    logs_command: str = "",
) -> shapes.ServiceRow:
    """A ``ps`` row; ``last_lines`` and ``logs_command`` tell of a failed or crashed
    newest revision's output."""
    said = status(snapshot)
    shown = said.revision
    return {
        "namespace": namespace,
        "service": service,
        "state": ps_state(said),
        "reason": said.reason,
        "live": _optional(said.live),
        "latest": _optional(said.latest),
        "pinned": snapshot.pinned,
        "weights": dict(snapshot.weights),
        "restarts": snapshot.restarts,
        "last_lines": list(last_lines),
        "logs_command": logs_command,
        "behind": snapshot.behind is not None,
        "url": url,
        "since": shown.changed_at if shown else None,
    }
