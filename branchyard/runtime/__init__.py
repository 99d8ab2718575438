"""The runtime seam: what builds and runs revisions.

The engine hands a runtime a :class:`RevisionSpec` (repo URL, commit, build
recipe, run command, health check, env) and gets back a running, healthy
:class:`Instance`, or a :class:`~branchyard.errors.BuildFailed` with a one-line
reason. It never hands over local paths: the runtime fetches and builds in its
own way. ``local`` runs processes on this machine; a Kubernetes runtime would
map the same calls to Deployments and Services.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from branchyard.manifest import Manifest

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


class Instance(Protocol):
    @property
    def address(self) -> Address: ...

    @property
    def pid(self) -> int | None: ...

    async def wait(self) -> int:
        """Return the exit code once the revision's web process has ended."""
        ...

    async def stop(self) -> None: ...


class Runtime(Protocol):
    async def deploy(self, spec: RevisionSpec) -> Instance:
        """Fetch, build, start and health-check ``spec``. Cancelling cleans up."""
        ...

    def log_path(self, namespace: str, service: str, ordinal: int, build: bool) -> Path: ...

    def discard(self, namespace: str, service: str) -> None:
        """Forget what was kept for a service that left a namespace (its logs)."""
        ...

    async def close(self) -> None: ...
