"""What the cluster runs of branchyard's, kept current by two watches.

One watch of the Deployments and one of the pods that carry branchyard's label, over
every namespace, whatever the number of revisions: each lists what there is, then
follows the changes from that list's version (listed afresh when the API server says
the version is too old, or the connection breaks). What they see is kept by revision
(Kubernetes namespace, service label, revision label), and each change wakes whoever
waits on that revision: a start waiting for its Deployment to be Available, an
instance telling the engine that its state changed. No poll, no call per revision.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any, TypeVar

from lightkube import ALL_NS, ApiError
from lightkube.resources.apps_v1 import Deployment
from lightkube.resources.core_v1 import Pod

from branchyard.runtime.kube import names
from branchyard.runtime.kube.connection import Connection

log = logging.getLogger(__name__)

Key = tuple[str, str, str]
"""A revision: (Kubernetes namespace, service label, revision label)."""
T = TypeVar("T")
RETRY = 1.0  # seconds before listing again after the connection broke


def key_of(thing: Deployment | Pod) -> Key | None:
    meta = thing.metadata
    if meta is None or meta.namespace is None:
        return None
    labels = meta.labels or {}
    service, revision = labels.get(names.SERVICE), labels.get(names.REVISION)
    if service is None or revision is None:
        return None
    return (meta.namespace, service, revision)


class Watch:
    def __init__(self, connection: Connection) -> None:
        self._connection = connection
        self.deployments: dict[tuple[str, str], Deployment] = {}  # (namespace, name)
        self.pods: dict[tuple[str, str], Pod] = {}
        self._listeners: dict[Key, set[Callable[[], None]]] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._synced = [asyncio.Event(), asyncio.Event()]

    async def start(self) -> None:
        """Start both watches; return once each has listed what exists."""
        if self._tasks:
            return
        followed: list[tuple[type[Any], dict[tuple[str, str], Any]]] = [
            (Deployment, self.deployments),
            (Pod, self.pods),
        ]
        for (kind, seen), synced in zip(followed, self._synced, strict=True):
            self._tasks.append(
                asyncio.create_task(self._follow(kind, seen, synced), name=f"watch {kind.__name__}")
            )
        await asyncio.gather(*(synced.wait() for synced in self._synced))

    async def _follow(
        self, kind: type[Any], seen: dict[tuple[str, str], Any], synced: asyncio.Event
    ) -> None:
        client = self._connection.client
        ours: dict[str, Any] = dict(names.managed())
        while True:
            try:
                listing = client.list(kind, namespace=ALL_NS, labels=ours)
                found = await self._connection.call(_listed(listing))
                self._replace(seen, {_name(thing): thing for thing in found[1]})
                synced.set()
                self._connection.calls += 1
                async for change, thing in client.watch(
                    kind, namespace=ALL_NS, labels=ours, resource_version=found[0]
                ):
                    self._seen(seen, change, thing)
            except asyncio.CancelledError:
                raise
            except ApiError as exc:
                if exc.status.code != 410:  # 410: the version is too old, list again
                    log.warning("watch of %s: %s", kind.__name__, exc.status.message)
                    await asyncio.sleep(RETRY)
            except Exception as exc:  # the cluster went away for a while: list again
                log.warning("watch of %s broke: %s", kind.__name__, exc)
                await asyncio.sleep(RETRY)

    def _replace(self, seen: dict[tuple[str, str], Any], fresh: dict[tuple[str, str], Any]) -> None:
        changed = [thing for name, thing in seen.items() if name not in fresh]
        changed += [thing for name, thing in fresh.items() if seen.get(name) is not thing]
        seen.clear()
        seen.update(fresh)
        for thing in changed:
            self._wake(thing)

    def _seen(self, seen: dict[tuple[str, str], Any], change: str, thing: Any) -> None:
        if change == "DELETED":
            seen.pop(_name(thing), None)
        else:
            seen[_name(thing)] = thing
        self._wake(thing)

    def _wake(self, thing: Deployment | Pod) -> None:
        key = key_of(thing)
        for listener in list(self._listeners.get(key, ())) if key else ():
            listener()

    def listen(self, key: Key, listener: Callable[[], None]) -> Callable[[], None]:
        """Call ``listener`` on every change to the revision ``key``; returns what
        stops it."""
        self._listeners.setdefault(key, set()).add(listener)

        def stop() -> None:
            listeners = self._listeners.get(key)
            if listeners is not None:
                listeners.discard(listener)
                if not listeners:
                    del self._listeners[key]

        return stop

    async def until(self, key: Key, check: Callable[[], T | None]) -> T:
        """Wait until ``check()`` returns something other than None, looking again at each
        change to the revision ``key``."""
        changed = asyncio.Event()
        stop = self.listen(key, changed.set)
        try:
            while (found := check()) is None:
                await changed.wait()
                changed.clear()
            return found
        finally:
            stop()

    def pods_of(self, key: Key, process: str = names.WEB) -> list[Pod]:
        """The pods of one process of a revision."""
        return [
            pod
            for pod in self.pods.values()
            if key_of(pod) == key
            and ((pod.metadata.labels or {}) if pod.metadata else {}).get(names.PROCESS) == process
        ]

    def deployment(self, namespace: str, name: str) -> Deployment | None:
        return self.deployments.get((namespace, name))

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()


def _name(thing: Any) -> tuple[str, str]:
    return (thing.metadata.namespace or "", thing.metadata.name or "")


async def _listed(listing: Any) -> tuple[str, list[Any]]:
    """Everything a list returns, and the version it was made at."""
    found = [thing async for thing in listing]
    return listing.resourceVersion, found
