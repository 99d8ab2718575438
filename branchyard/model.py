"""The nouns of branchyard as frozen dataclasses and enums, shared by every layer."""

from __future__ import annotations

import asyncio
import enum
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Repo:
    name: str
    url: str
    default_branch: str | None = None  # None: whatever the repo's HEAD names
    webhook_secret: str = field(default="", repr=False)  # "" means: the global one


@dataclass(frozen=True)
class RepoHeads:
    """What the watcher saw in one repo: its default branch and every branch head."""

    repo: str
    default_branch: str  # "" if none: every branch has a namespace of its own
    branches: Mapping[str, str]  # branch name -> commit sha
    dangling_head: bool = False  # HEAD named no branch there is; default_branch is a guess


@dataclass(frozen=True)
class Overlay:
    """A person's settings for one service in one namespace (see ``settings``)."""

    version: str  # short id of the settings commit, "" when nothing was ever set
    env: Mapping[str, str] = field(default_factory=dict)
    secrets: Mapping[str, str] = field(default_factory=dict)  # name -> when it last changed


class RevisionState(enum.StrEnum):
    """The life of a revision::

    BUILDING ──> STARTING ──> LIVE ──> STOPPED     (replaced, removed, or daemon stopped)
       │  └─> STAGED ─┘  │      └──> CRASHED     (its supervisor gave up restarting it)
       │     (pinned)    │
       └─────────────────┴──> FAILED             (reason says why; the previous one serves)
    BUILDING / STARTING ──> SUPERSEDED           (a newer target arrived first)

    A STOPPED or STAGED revision whose build is kept can go live again at once
    (rollback, promote).
    """

    BUILDING = "building"
    STAGED = "staged"
    STARTING = "starting"
    LIVE = "live"
    STOPPED = "stopped"
    CRASHED = "crashed"
    FAILED = "failed"
    SUPERSEDED = "superseded"

    @property
    def active(self) -> bool:
        return self in (RevisionState.BUILDING, RevisionState.STARTING, RevisionState.LIVE)


@dataclass(frozen=True)
class Target:
    """One service in one namespace as the planner wants it to run."""

    namespace: str
    service: str
    repo: str
    url: str
    branch: str
    sha: str
    settings: Overlay
    peers: tuple[str, ...]  # services this one can reach, by name

    @property
    def key(self) -> str:
        """Equal keys mean the same revision: same commit, same settings, same peers."""
        return f"{self.sha}:{self.settings.version}:{','.join(self.peers)}"


@dataclass(frozen=True)
class Revision:
    """A row of the store: one deployed (or attempted) version of a service."""

    id: int
    namespace: str
    service: str
    ordinal: int
    repo: str
    url: str
    branch: str
    sha: str
    subject: str
    key: str
    settings_version: str
    env: Mapping[str, str]
    state: RevisionState
    reason: str
    port: int | None
    created_at: float
    changed_at: float

    @property
    def sha7(self) -> str:
        return self.sha[:7]


@dataclass(frozen=True)
class Clock:
    """The time a part of the daemon reads and the waits it takes; tests give fake ones."""

    now: Callable[[], float] = time.time  # seconds since the epoch
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep
