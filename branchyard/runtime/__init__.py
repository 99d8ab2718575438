"""The seams the engine acts through: a runtime that builds and runs revisions, and a
traffic layer that sends requests to them. This module is all the engine may know of
either; ``daemon`` picks the implementations (``runtime.local`` and the router's
``LocalTraffic`` on this machine).

Runtime
-------
The engine hands a runtime a :class:`RevisionSpec` (repo URL, commit, build recipe,
run command, health check, env) and gets back a :class:`Build`, then starts that
build as a running, healthy :class:`Instance`; either step raises
:class:`~branchyard.errors.BuildFailed` with a one-line reason. It never hands over
local paths, and gets none back: the runtime fetches and builds in its own way, and
its logs are read as streams (:class:`LogName`). Builds are kept until the engine
prunes them, so a rollback starts one without building. The runtime also says how
a peer reaches a service (:meth:`Runtime.peer_url`: locally a stable loopback port
per (namespace, peer) that falls back to the baseline; on Kubernetes a Service's
name, with an ExternalName Service for the fallback), where people reach one
(:meth:`Runtime.public_url`), and what a daemon that ended left behind
(:meth:`Runtime.recover`). Whatever may go over a network is ``async``.

Traffic
-------
:class:`Traffic` sends each (namespace, service) to one instance, or several by
weight, says why nothing serves one, drains an instance taken out of traffic, and
forgets a service. One that cannot split a service by weight (Kubernetes without the
Gateway API) says why (:meth:`Traffic.cannot_split`), so a split is refused before
anything of it starts. Its setters are synchronous: they state what should be, and an
implementation that must call out (a Service selector, a Gateway API route) applies
them in the background, in order; :meth:`Traffic.drain` waits until what was said
before it is applied.
"""

from __future__ import annotations

import enum
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from branchyard.manifest import Manifest

Address = tuple[str, int]
"""(host, port) at which the traffic layer reaches an instance."""

LAST_LINES = 5
"""How many lines of a log say why a revision failed."""

Pause = Callable[[], Awaitable[bool]]
"""The wait between two looks at a followed log; False: stop following."""


class InstanceState(enum.StrEnum):
    """Where a started instance's web process is in its supervision (see
    ``runtime.supervisor`` for the transitions)."""

    STARTING = "starting"
    RUNNING = "running"
    BACKOFF = "backoff"
    STOPPING = "stopping"
    EXITED = "exited"
    FAILED = "failed"


@dataclass(frozen=True)
class RevisionSpec:
    namespace: str
    service: str
    ordinal: int
    repo_url: str
    sha: str
    manifest: Manifest
    env: Mapping[str, str]  # everything but PORT, which the runtime picks
    secret_keys: frozenset[str] = frozenset()
    """Which keys of ``env`` are secrets (a Kubernetes Secret holds them, not the
    ConfigMap; the local runtime hands every key alike)."""

    @property
    def name(self) -> str:
        return f"{self.service}.{self.namespace}.v{self.ordinal}"


@dataclass(frozen=True)
class LogName:
    """One revision's log: what its processes wrote, or its build's output (``build``)."""

    namespace: str
    service: str
    ordinal: int
    build: bool = False


class Build(Protocol):
    @property
    def spec(self) -> RevisionSpec: ...


class Instance(Protocol):
    """A started build. Its web process is supervised: restarted with backoff
    when it crashes, FAILED after too many crashes in a row."""

    @property
    def address(self) -> Address: ...

    @property
    def state(self) -> InstanceState: ...

    @property
    def exit_code(self) -> int | None: ...

    @property
    def restarts(self) -> int: ...

    @property
    def last_output(self) -> Sequence[str]:
        """The last lines it wrote before it FAILED (nothing before that)."""
        ...

    async def stop(self, grace: float) -> None: ...


OnChange = Callable[[Instance], None]


@dataclass(frozen=True)
class Reviewed:
    """The objects a runtime would apply for a revision, as text for a person to read,
    and a line for each thing in them that would not work where they are applied."""

    text: str
    warnings: tuple[str, ...] = ()


Review = Callable[[RevisionSpec, Mapping[str, str]], Awaitable[Reviewed]]
"""The objects a runtime would apply for a revision (``branchyard k8s render``), secrets
left out; the mapping names the env keys that are peer URLs the daemon's runtime gave
(``APP_URL`` -> ``app``), which the review shows as that runtime gives them."""


class Runtime(Protocol):
    async def build(self, spec: RevisionSpec) -> Build:
        """Fetch and build ``spec``, or find it built. Cancelling cleans up."""
        ...

    async def start(self, build: Build, on_change: OnChange) -> Instance:
        """Start a build and return once it is healthy. Cancelling stops it: the
        engine cancels a start once and waits for it to end without cancelling it
        again, so the stop is not cut short (a runtime may guard itself as well, as
        ``runtime.local`` does)."""
        ...

    def release(self, build: Build) -> None:
        """The engine no longer holds ``build`` in memory (it stays kept)."""
        ...

    async def prune(self, namespace: str, service: str, keep: Collection[int]) -> int:
        """Delete the kept builds of a service except ``keep`` (ordinals); bytes freed."""
        ...

    async def discard(self, namespace: str, service: str) -> None:
        """Forget what was kept for a service that left a namespace (logs, builds)."""
        ...

    async def gc(self) -> dict[str, int]:
        """Drop caches nothing uses (environments, images); what was removed."""
        ...

    async def recover(self) -> int:
        """After a daemon ended, before anything starts: stop what it left running and
        bring back the peer addresses it had handed out. How many leftovers were stopped."""
        ...

    async def peer_url(self, namespace: str, peer: str) -> str:
        """The stable URL through which services in ``namespace`` reach ``peer``: its
        live revision there, else the baseline's."""
        ...

    async def sync_peers(self, wanted: Collection[tuple[str, str]]) -> None:
        """Keep peer addresses only for the (namespace, peer) pairs in ``wanted``."""
        ...

    def public_url(self, namespace: str, service: str) -> str:
        """Where people reach a service's live revision."""
        ...

    def home_url(self) -> str:
        """Where people reach the daemon's own pages (the dashboard)."""
        ...

    async def has_log(self, log: LogName) -> bool:
        """Whether ``log`` was ever written (a revision that failed to build has no
        output of its processes)."""
        ...

    async def missing_log(self, log: LogName) -> str | None:
        """Why ``log`` can no longer be read, in one line (on Kubernetes, a revision scaled
        to 0 has no pod, and its log went with it); None if it can be, or may yet be
        written."""
        ...

    async def tail_log(self, log: LogName, size: int) -> bytes:
        """The last ``size`` bytes of ``log`` (nothing if there is none)."""
        ...

    async def last_lines(self, log: LogName, count: int = LAST_LINES) -> list[str]:
        """The last ``count`` lines of ``log`` that are not blank, without terminal escapes."""
        ...

    def read_log(
        self, log: LogName, lines: int | None = None, pause: Pause | None = None
    ) -> AsyncIterator[bytes]:
        """``log`` as it is now (its last ``lines`` lines if given); with ``pause``, then
        what is written to it next, until ``pause()`` says to stop."""
        ...

    def detach(self) -> None:
        """The daemon is about to stop (``daemon`` says so before the engine closes): a
        runtime whose revisions outlive it (Kubernetes) leaves them running for the next
        daemon to adopt, and an instance's ``stop`` changes nothing from then on; the
        local runtime does nothing (its processes end with the daemon)."""
        ...

    async def close(self) -> None: ...


class Traffic(Protocol):
    def route(self, namespace: str, service: str, weights: Sequence[tuple[Address, int]]) -> None:
        """Send (namespace, service) to these instances, each taking requests by weight
        (one instance: all of them)."""
        ...

    def down(self, namespace: str, service: str, why: str = "") -> None:
        """Nothing serves (namespace, service): requests are refused, saying ``why`` if
        there is more to say than "no live revision yet"."""
        ...

    def remove(self, namespace: str, service: str) -> None:
        """Forget (namespace, service): it is no longer a service there."""
        ...

    def cannot_split(self) -> str:
        """Why a service cannot be sent to several instances by weight here, in one line
        for the person who asked; "" if it can (then ``route`` takes several)."""
        ...

    async def drain(self, backend: Address, grace: float) -> None:
        """Once no route sends to ``backend``: let requests in flight on it finish for up
        to ``grace`` seconds, then cut what is left."""
        ...
