"""The runtime seam: what builds and runs revisions.

The engine hands a runtime a :class:`RevisionSpec` (repo URL, commit, build
recipe, run command, health check, env) and gets back a :class:`Build`, then
starts that build as a running, healthy :class:`Instance`; either step raises
:class:`~branchyard.errors.BuildFailed` with a one-line reason. It never hands
over local paths: the runtime fetches and builds in its own way. Builds are
kept until the engine prunes them, so a rollback starts one without building.
``local`` runs processes on this machine; a Kubernetes runtime would map the
same calls to an image or init container (build), a Deployment (start) and
the Service selector (the engine's switch).
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from branchyard.manifest import Manifest
from branchyard.runtime.supervisor import ProcessState

Address = tuple[str, int]


@dataclass(frozen=True)
class RevisionSpec:
    namespace: str
    service: str
    ordinal: int
    repo_url: str
    sha: str
    manifest: Manifest
    env: Mapping[str, str]  # everything but PORT, which the runtime picks

    @property
    def name(self) -> str:
        return f"{self.service}.{self.namespace}.v{self.ordinal}"


class Build(Protocol):
    @property
    def spec(self) -> RevisionSpec: ...


class Instance(Protocol):
    """A started build. Its web process is supervised: restarted with backoff
    when it crashes, FAILED after too many crashes in a row."""

    @property
    def address(self) -> Address: ...

    @property
    def pid(self) -> int | None: ...

    @property
    def state(self) -> ProcessState: ...

    @property
    def exit_code(self) -> int | None: ...

    @property
    def restarts(self) -> int: ...

    async def stop(self, grace: float) -> None: ...


OnChange = Callable[[Instance], None]


class Runtime(Protocol):
    async def build(self, spec: RevisionSpec) -> Build:
        """Fetch and build ``spec``, or find it built. Cancelling cleans up."""
        ...

    async def start(self, build: Build, on_change: OnChange) -> Instance:
        """Start a build and return once it is healthy. Cancelling stops it."""
        ...

    def release(self, build: Build) -> None:
        """The engine no longer holds ``build`` in memory (it stays on disk)."""
        ...

    def prune(self, namespace: str, service: str, keep: Collection[int]) -> int:
        """Delete the kept builds of a service except ``keep`` (ordinals); bytes freed."""
        ...

    def log_path(self, namespace: str, service: str, ordinal: int, build: bool) -> Path: ...

    def discard(self, namespace: str, service: str) -> None:
        """Forget what was kept for a service that left a namespace (logs, builds)."""
        ...

    def gc(self) -> dict[str, int]:
        """Drop caches nothing uses (environments, images); what was removed."""
        ...

    async def close(self) -> None: ...
