"""The Kubernetes Namespaces of branchyard's namespaces: made when first needed,
deleted when the last service of theirs goes, and never touched when they are not
branchyard's.

With an install cache (``up --install-cache``), the Namespace's claim is applied with
it (deleting the Namespace deletes it); one whose size or class an earlier daemon set
otherwise is kept as it is, which an event says (a claim's class cannot change).

A Namespace that exists without branchyard's label belongs to someone else: it is
never changed or deleted, and whatever was to go there fails with
:class:`NameTaken`, which says so (``ps`` shows it as the revision's reason, and it
is an event). What was made or checked is remembered, so a deploy into a known
Namespace costs no call for it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from lightkube import ApiError
from lightkube.resources.core_v1 import Namespace

from branchyard.errors import BuildFailed
from branchyard.runtime.kube import names, render
from branchyard.runtime.kube.connection import Connection
from branchyard.runtime.kube.options import KubeOptions

Slot = tuple[str, str]
Report = Callable[[str, str, Slot | None], None]
"""Records an event: (kind, message, the slot it concerns or None)."""
EVENT = "kubernetes"


class NameTaken(BuildFailed):
    code = "name_taken"


class Namespaces:
    def __init__(self, connection: Connection, options: KubeOptions, report: Report) -> None:
        self._connection = connection
        self._options = options
        self._report = report
        self._ours: set[str] = set()  # Kubernetes names known to be branchyard's
        self._locks: dict[str, asyncio.Lock] = {}  # one look at a Namespace at a time

    def name(self, namespace: str) -> str:
        return names.namespace_name(self._options.namespace_prefix, namespace)

    async def ensure(self, namespace: str, slot: Slot | None = None) -> str:
        """The Namespace of ``namespace``, made if missing; its Kubernetes name. Raises
        :class:`NameTaken` if one of that name is not branchyard's."""
        name = self.name(namespace)
        if name in self._ours:
            return name
        async with self._locks.setdefault(name, asyncio.Lock()):
            if name not in self._ours:
                await self._make(namespace, name, slot)
        return name

    async def _make(self, namespace: str, name: str, slot: Slot | None) -> None:
        found = await self._connection.get(Namespace, name)
        if found is not None:
            labels = (found.metadata.labels if found.metadata else None) or {}
            if labels.get(names.MANAGED_BY) != names.MANAGER:
                message = (
                    f"the Kubernetes Namespace {name} exists and is not branchyard's (no label "
                    f"{names.MANAGED_BY}={names.MANAGER}): it is left alone; rename it, or use "
                    "--namespace-prefix"
                )
                self._report(EVENT, message, slot)
                raise NameTaken(message)
            if found.status is not None and found.status.phase == "Terminating":
                raise BuildFailed(f"the Kubernetes Namespace {name} is being deleted; try again")
        await self._connection.apply(render.namespace(self._options, namespace))
        if found is None:
            self._report(EVENT, f"made Namespace {name}", slot)
        cache = render.install_cache(self._options, namespace)
        if cache is not None:
            try:
                await self._connection.apply(cache)
            except ApiError as exc:
                why = (exc.status.message or str(exc)).splitlines()[0]  # then a diff of it
                said = f"the install cache {render.CACHE_CLAIM} in {name} is kept as it is"
                self._report(EVENT, f"{said}: {why}", slot)
        self._ours.add(name)

    async def delete(self, namespace: str) -> bool:
        """Delete the Namespace of ``namespace`` if it is branchyard's; whether it was."""
        name = self.name(namespace)
        self._ours.discard(name)
        found = await self._connection.get(Namespace, name)
        labels = ((found.metadata.labels if found.metadata else None) or {}) if found else {}
        if found is None or labels.get(names.MANAGED_BY) != names.MANAGER:
            return False
        await self._connection.delete(Namespace, name)
        self._report(EVENT, f"deleted Namespace {name}: no service of {namespace} is left", None)
        return True
