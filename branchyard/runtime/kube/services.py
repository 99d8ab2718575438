"""The one owner of each service's Service ``SERVICE`` and what routes to it.

In a namespace, the name ``SERVICE`` is wanted by two parties: the traffic layer (a
live revision: a normal Service selecting its pods, its Ingress, and for a split a
Service per revision and an HTTPRoute) and the peers (a namespace whose services see
a peer it lacks: an ExternalName Service pointing at the baseline's). This
:class:`Switchboard`, built once in ``daemon._seams`` and shared by
``KubeTraffic`` and ``KubeRuntime.sync_peers``, holds both wishes and applies, for
each name, the one that wins: a live revision, else a fallback, else nothing. So a
peer branched in turns its fallback into a normal Service, and one branched out
turns it back, without the two fighting.

Its setters are synchronous: they record what should be and queue the name; one
task applies the queue in order, each name from what is wanted when its turn comes
(a burst coalesces), and :meth:`settled` waits until what was asked before it is
applied. A temporary failure (the cluster away) is tried again; others are events.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Collection, Sequence
from dataclasses import dataclass

from lightkube import ApiError
from lightkube.resources.core_v1 import Service
from lightkube.resources.networking_v1 import Ingress

from branchyard.errors import BranchyardError, UsageError
from branchyard.naming import BASELINE
from branchyard.runtime import Address, RevisionSpec
from branchyard.runtime.kube import names, render
from branchyard.runtime.kube.connection import Connection
from branchyard.runtime.kube.namespaces import EVENT, Namespaces, Report, Slot
from branchyard.runtime.kube.options import KubeOptions

log = logging.getLogger(__name__)

Key = tuple[str, str]
"""A Service: (Kubernetes namespace, object name)."""
RETRY = 2.0  # seconds before a name whose apply met a temporary error is tried again


@dataclass(frozen=True)
class Shape:
    """What the cluster has (or should have) under one name."""

    kind: str  # "live", "fallback", "none", or FOUND (there, as a daemon before left it)
    weights: tuple[tuple[int, int], ...] = ()  # (ordinal, weight) of a live or found one

    @property
    def ordinals(self) -> set[int]:
        return {ordinal for ordinal, _ in self.weights}

    @property
    def split(self) -> set[int]:
        """The revisions with a Service of their own: those of a split (one revision
        alone is selected by the Service ``SERVICE`` only), or found so."""
        return self.ordinals if len(self.weights) > 1 or self.kind == FOUND else set()


FOUND = "found"
NONE = Shape("none")


class Switchboard:
    def __init__(
        self,
        connection: Connection,
        options: KubeOptions,
        namespaces: Namespaces,
        report: Report,
    ) -> None:
        self._connection = connection
        self._options = options
        self._namespaces = namespaces
        self._report = report
        self._revisions: dict[Address, RevisionSpec] = {}
        self._routes: dict[Slot, dict[int, int]] = {}  # ordinal -> weight
        self._fallbacks: set[Slot] = set()
        self._slots: dict[Key, Slot] = {}
        self._applied: dict[Key, Shape] = {}
        self._pending: dict[Key, int] = {}  # name -> the number of the request it waits on
        self._asked = 0
        self._working: int | None = None  # the request being applied
        self._progress = asyncio.Event()
        self._worker: asyncio.Task[None] | None = None

    # the wishes

    def address(self, spec: RevisionSpec) -> Address:
        """How the traffic layer names a revision's pods: its in-cluster name, and the
        port its web process listens on (a started revision is known by it)."""
        name = names.revision_name(spec.service, spec.ordinal)
        host = render.in_cluster(self._options, name, spec.namespace)
        address = (host, render.PORT)
        self._revisions[address] = spec
        return address

    def route(self, slot: Slot, weights: Sequence[tuple[Address, int]]) -> None:
        ordinals: dict[int, int] = {}
        for address, weight in weights:
            spec = self._revisions.get(address)
            if spec is None or (spec.namespace, spec.service) != slot:
                raise UsageError(f"{address[0]} is not a revision of {slot[1]} in {slot[0]}")
            ordinals[spec.ordinal] = weight
        if len(ordinals) > 1 and (why := self.cannot_split()):
            raise UsageError(why)
        if self._routes.get(slot) != ordinals:
            self._routes[slot] = ordinals
            self._ask(slot)

    def cannot_split(self) -> str:
        """Why no split by weight: the cluster serves no HTTPRoutes (as found at the
        start); "" if it does."""
        if self._connection.gateway:
            return ""
        return (
            "weights need the Gateway API (HTTPRoute, gateway.networking.k8s.io), which "
            f"the cluster at {self._connection.server} does not serve; install its CRDs "
            "and a GAMMA implementation, then restart branchyard"
        )

    def remove(self, slot: Slot) -> None:
        if self._routes.pop(slot, None) is not None:
            self._ask(slot)

    def want_fallbacks(self, wanted: Collection[Slot]) -> None:
        """Fallbacks in these (namespace, peer) slots (none in the baseline), and no
        others."""
        wanted = {slot for slot in wanted if slot[0] != BASELINE}
        changed = wanted ^ self._fallbacks
        self._fallbacks = wanted
        for slot in sorted(changed):
            self._ask(slot)

    def forget_namespace(self, namespace: str) -> None:
        """The Namespace is being deleted: nothing of it is applied any more."""
        where = self._namespaces.name(namespace)
        for key in [key for key in self._applied if key[0] == where]:
            del self._applied[key]
        for key in [key for key in self._pending if key[0] == where]:
            del self._pending[key]
        self._routes = {s: w for s, w in self._routes.items() if s[0] != namespace}
        self._fallbacks = {s for s in self._fallbacks if s[0] != namespace}
        self._progress.set()

    def found(self, services: Sequence[Service]) -> None:
        """What a daemon before left (at recovery), so that what is no longer wanted
        is deleted: each name, with the revisions of the split it had (their Services,
        and its route, go once the name is applied again or deleted)."""
        split: dict[Key, set[int]] = {}
        for service in services:
            meta = service.metadata
            labels = (meta.labels if meta else None) or {}
            if meta is None or meta.namespace is None:
                continue
            ordinal = labels.get(names.REVISION, "")
            if not ordinal:
                split.setdefault((meta.namespace, meta.name or ""), set())
            elif ordinal.isdigit():  # a split's Service of one revision
                owner = (meta.namespace, labels.get(names.SERVICE, ""))
                split.setdefault(owner, set()).add(int(ordinal))
        for key, ordinals in split.items():
            weights = tuple((ordinal, 0) for ordinal in sorted(ordinals))
            self._applied.setdefault(key, Shape(FOUND, weights))

    def unwanted(self) -> list[Key]:
        """Names found at recovery that nothing asked for (a gc deletes them)."""
        return [key for key, shape in self._applied.items() if shape.kind == FOUND]

    def delete_found(self, keys: Collection[Key]) -> None:
        for key in keys:
            self._pending[key] = self._asked = self._asked + 1
        self._wake_worker()

    def _ask(self, slot: Slot) -> None:
        key = (self._namespaces.name(slot[0]), names.object_name(slot[1]))
        self._slots[key] = slot
        self._asked += 1
        self._pending[key] = self._asked
        self._wake_worker()

    def _wake_worker(self) -> None:
        if self._worker is None or self._worker.done():
            self._worker = asyncio.create_task(self._work(), name="kubernetes services")

    async def settled(self) -> None:
        """Wait until what was asked before this call is applied."""
        asked = self._asked
        while self._busy_up_to(asked):
            self._progress.clear()
            await self._progress.wait()

    def _busy_up_to(self, asked: int) -> bool:
        working = self._working is not None and self._working <= asked
        return working or any(number <= asked for number in self._pending.values())

    # applying

    def _wanted(self, key: Key) -> Shape:
        slot = self._slots.get(key)
        if slot is None:
            return NONE
        weights = self._routes.get(slot)
        if weights:
            return Shape("live", tuple(sorted(weights.items())))
        if slot in self._fallbacks:
            return Shape("fallback")
        return NONE

    async def _work(self) -> None:
        while self._pending:
            key = next(iter(self._pending))
            self._working = self._pending.pop(key)
            try:
                await self._converge(key)
            except BranchyardError as exc:
                if exc.temporary:
                    await asyncio.sleep(RETRY)
                    self._pending.setdefault(key, self._working)
                else:
                    self._failed(key, exc.message)
            except ApiError as exc:
                self._failed(key, f"{exc.status.code} {exc.status.message}")
            finally:
                self._working = None
                self._progress.set()

    def _failed(self, key: Key, why: str) -> None:
        log.warning("cannot apply Service %s in %s: %s", key[1], key[0], why)
        said = f"cannot apply Service {key[1]} in {key[0]}: {why}"
        self._report(EVENT, said, self._slots.get(key))

    async def _converge(self, key: Key) -> None:
        wanted = self._wanted(key)
        had = self._applied.get(key, NONE)
        if wanted == had:
            return
        slot = self._slots.get(key)
        if wanted.kind == "live" and slot is not None:
            await self._live(key, slot, wanted, had)
        elif wanted.kind == "fallback" and slot is not None:
            await self._namespaces.ensure(slot[0], slot)
            await self._connection.apply(render.fallback(self._options, *slot))
            await self._unroute(key, had, set(), ingress=True)
            self._report(EVENT, f"Service {key[1]} in {key[0]} falls back to the baseline's", slot)
        else:
            await self._unroute(key, had, set(), ingress=True)
            if had.kind != "none" and await self._connection.delete(Service, key[1], key[0]):
                self._report(EVENT, f"deleted Service {key[1]} in {key[0]}", slot)
        self._applied[key] = wanted

    async def _live(self, key: Key, slot: Slot, wanted: Shape, had: Shape) -> None:
        namespace, service = slot
        heaviest = max(wanted.weights, key=lambda pair: (pair[1], pair[0]))[0]
        live = render.live_service(self._options, namespace, service, heaviest)
        await self._connection.apply(live)
        entry = render.ingress(self._options, namespace, service)
        if entry is not None and had.kind != "live":
            await self._connection.apply(entry)
        keep: set[int] = set()
        if len(wanted.weights) > 1:
            keep = wanted.ordinals
            for spec in self._specs(slot, keep - had.split):
                await self._connection.apply(render.revision_service(self._options, spec))
            await self._connection.apply(
                render.route(self._options, namespace, service, dict(wanted.weights))
            )
        await self._unroute(key, had, keep, ingress=False)
        shares = ", ".join(f"v{o} {w}" for o, w in wanted.weights)
        self._report(EVENT, f"Service {key[1]} in {key[0]} sends to {shares}", slot)

    def _specs(self, slot: Slot, ordinals: Collection[int]) -> list[RevisionSpec]:
        return sorted(
            (
                spec
                for spec in self._revisions.values()
                if (spec.namespace, spec.service) == slot and spec.ordinal in ordinals
            ),
            key=lambda spec: spec.ordinal,
        )

    async def _unroute(self, key: Key, had: Shape, keep: set[int], ingress: bool) -> None:
        """Delete what a split made that is no longer wanted (its route once no split
        is left), and with ``ingress`` the Ingress of a live revision."""
        namespace, name = key
        if had.split:
            if not keep:
                await self._connection.delete(render.HTTPRoute, name, namespace)
            for ordinal in sorted(had.split - keep):
                own = names.revision_name(name, ordinal)
                await self._connection.delete(Service, own, namespace)
        if ingress and self._options.domain and had.kind in ("live", FOUND):
            await self._connection.delete(Ingress, name, namespace)

    async def close(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker
