"""A revision's logs on Kubernetes: its pod's logs, read through the API server.

A revision's build log is what its pod's init containers wrote (``fetch``, then
``install``: the fetch, the dependencies, the build steps); its log is what its web
container writes. Both are read from the revision's newest pod, as the API server
gives them (the kubelet keeps them; a pod scaled away takes them along), and ``logs
-f`` follows the web container's stream. Where the node serves no logs, the log is empty.

A revision that failed to start is scaled to 0, and its pod takes its log along: the last
lines of the log that says why are kept first, in an annotation of its web Deployment
(:func:`kept_output`), and are its log from then on. A revision without a pod and without
kept lines (scaled to 0 when it was replaced, or deleted by retention) has no log to read,
and :meth:`PodLogs.missing` says so.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Sequence

import httpx2
from lightkube import ApiError
from lightkube.resources.apps_v1 import Deployment

from branchyard.runtime import LAST_LINES, LogName, Pause
from branchyard.runtime.kube import names
from branchyard.runtime.kube.connection import Connection
from branchyard.runtime.kube.namespaces import Namespaces
from branchyard.runtime.kube.watch import Key, Watch

log = logging.getLogger(__name__)

BUILD_CONTAINERS = ("fetch", "install")
TAIL = 1000  # lines read for a tail of bytes
KEPT_LINE = 500  # characters of a line kept in an annotation


def kept_output(build: bool, lines: Sequence[str]) -> dict[str, str]:
    """The annotations that keep the last ``lines`` of a revision's output (``build``: of
    its build) on its web Deployment; kept empty, it still says which log failed."""
    key = names.LAST_BUILD_OUTPUT if build else names.LAST_OUTPUT
    return {key: "\n".join(line[:KEPT_LINE] for line in lines)}  # empty: that log says none


class PodLogs:
    def __init__(self, connection: Connection, namespaces: Namespaces, watch: Watch) -> None:
        self._connection = connection
        self._namespaces = namespaces
        self._watch = watch

    def _key(self, name: LogName) -> Key:
        namespace = self._namespaces.name(name.namespace)
        return (namespace, names.object_name(name.service), str(name.ordinal))

    def _pod(self, name: LogName) -> tuple[str, str] | None:
        """(namespace, pod) of the revision's newest web pod."""
        key = self._key(name)
        pods = [p for p in self._watch.pods_of(key) if p.metadata is not None]
        if not pods:
            return None
        newest = max(pods, key=lambda p: str(p.metadata.creationTimestamp if p.metadata else ""))
        assert newest.metadata is not None
        return key[0], newest.metadata.name or ""

    def _deployment(self, name: LogName) -> Deployment | None:
        where = self._namespaces.name(name.namespace)
        return self._watch.deployment(where, names.revision_name(name.service, name.ordinal))

    def _annotations(self, name: LogName) -> dict[str, str]:
        deployment = self._deployment(name)
        meta = deployment.metadata if deployment is not None else None
        return dict((meta.annotations if meta else None) or {})

    def _kept(self, name: LogName) -> list[str]:
        """The lines kept when the revision failed, if it did."""
        key = names.LAST_BUILD_OUTPUT if name.build else names.LAST_OUTPUT
        kept = self._annotations(name).get(key)
        return kept.split("\n") if kept else []

    def _failed(self, name: LogName) -> bool:
        return bool({names.LAST_OUTPUT, names.LAST_BUILD_OUTPUT} & self._annotations(name).keys())

    def _serving(self, name: LogName) -> tuple[str, str] | None:
        """The pod whose logs are the revision's: none once it failed, whose log is what it
        kept, not what its pod, on its way out, still serves (or, deleted, no longer)."""
        return None if self._failed(name) else self._pod(name)

    async def has_log(self, name: LogName) -> bool:
        """Whether there is a log to read: a failed revision's is what it kept (of its
        build or of its web container, whichever said why, even while its pod, on its
        way out, still serves both); else its pod's."""
        return self._serving(name) is not None or bool(self._kept(name))

    def missing(self, name: LogName) -> str | None:
        """Why the revision has no log to read, in one line; None if it has one, or its
        pod is on its way."""
        if self._serving(name) is not None or self._kept(name):
            return None
        deployment = self._deployment(name)
        which = f"{name.service} v{name.ordinal} in {name.namespace}"
        if deployment is None:
            return f"{which} has no Deployment left (retention deleted it), so no log to read"
        if deployment.spec is not None and deployment.spec.replicas == 0:
            return f"{which} has no pod: it is scaled to 0, and its log went with its pod"
        return None

    async def _lines(
        self, name: LogName, lines: int | None, follow: bool = False
    ) -> AsyncIterator[str]:
        pod = self._serving(name)
        if pod is None:
            kept = self._kept(name)
            for line in kept if lines is None else kept[max(len(kept) - lines, 0) :]:
                yield line + "\n"
            return
        containers = BUILD_CONTAINERS if name.build else (names.WEB,)
        for container in containers:
            stream = self._connection.client.log(
                pod[1],
                namespace=pod[0],
                container=container,
                tail_lines=lines,
                follow=follow and container == containers[-1],
            )
            self._connection.calls += 1
            try:
                async for line in stream:
                    yield line
            except (ApiError, httpx2.HTTPError) as exc:
                log.info("no log of %s in %s (%s): %s", pod[1], pod[0], container, exc)

    async def tail(self, name: LogName, size: int) -> bytes:
        text = "".join([line async for line in self._lines(name, TAIL)]).encode()
        return text[-size:] if size else b""

    async def last_lines(self, name: LogName, count: int = LAST_LINES) -> list[str]:
        found = [line.rstrip("\n") async for line in self._lines(name, count * 2)]
        return [line for line in found if line.strip()][-count:]

    async def read(
        self, name: LogName, lines: int | None = None, pause: Pause | None = None
    ) -> AsyncIterator[bytes]:
        """The log as it is (its last ``lines``); with ``pause``, followed until
        ``pause()`` says to stop."""
        if pause is None or self._serving(name) is None:  # without a pod, nothing comes
            async for line in self._lines(name, lines):
                yield line.encode()
            return
        queue: asyncio.Queue[str | None] = asyncio.Queue()

        async def pump() -> None:
            async for text in self._lines(name, lines, follow=True):
                await queue.put(text)

        async def watch_pause() -> None:  # a stream that ended waits as a followed file does
            while await pause():
                pass
            await queue.put(None)

        tasks = [asyncio.create_task(pump()), asyncio.create_task(watch_pause())]
        try:
            while (got := await queue.get()) is not None:
                yield got.encode()
        finally:
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError):
                    await task
