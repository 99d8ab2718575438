"""The Kubernetes runtime: each revision is a Deployment in its namespace's Namespace.

- ``build`` builds nothing here: a pod's init containers fetch, install and build.
  It checks what can be checked (where a pod fetches the commit from, the names), and
  with an install cache, learns the key of the revision's environment
  (:mod:`~branchyard.runtime.kube.installs`), which its pods' installs reuse.
- ``start`` makes the Namespace if needed (never touching one that is not
  branchyard's), applies the revision's ConfigMap, Secrets (its env's, a private repo's
  login) and Deployments (server-side, field manager ``branchyard``) and returns once
  the web Deployment is Available; one whose newest pod crash-loops (a container, or
  an init container, that exited twice in a row: ``states.crash_looping``), or whose
  progress deadline passes, fails with a one-line reason from its pods.
  Cancelled or failed, it scales what it applied to 0.
- An instance's state, restarts and exit code come from its pods, seen by the two
  watches of :mod:`~branchyard.runtime.kube.watch`; the engine hears of each change.
- ``stop`` scales the revision to 0 and keeps its Deployment, so a rollback is a
  scale back to 1; ``prune`` deletes the Deployments retention drops, and the
  ConfigMaps and Secrets no kept one uses (as env or mounted); ``discard`` deletes a
  service's objects, and the Namespace once no service of it is left.
- Peers reach each other at ``http://PEER``; ``sync_peers`` keeps the ExternalName
  fallbacks through the :class:`~branchyard.runtime.kube.services.Switchboard`, which
  it shares with the traffic layer.
- ``recover`` is level-triggered: names are deterministic, so the next daemon applies
  the same objects again and adopts what runs; what the store no longer knows is
  deleted by ``gc``.
- A daemon that stops leaves everything running (:meth:`KubeRuntime.detach`); the next
  one takes over.

Every change is an event (``kubernetes``), through the ``report`` callable ``daemon``
gives (the runtime does not know the store).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Collection
from dataclasses import dataclass
from datetime import UTC, datetime

from lightkube import ALL_NS
from lightkube.models.apps_v1 import DeploymentSpec
from lightkube.models.core_v1 import PodTemplateSpec
from lightkube.models.meta_v1 import LabelSelector, ObjectMeta
from lightkube.resources.apps_v1 import Deployment
from lightkube.resources.core_v1 import ConfigMap, Namespace, Secret, Service
from lightkube.resources.networking_v1 import Ingress

from branchyard.errors import BranchyardError, BuildFailed
from branchyard.git import Source
from branchyard.runtime import (
    LAST_LINES,
    Address,
    Build,
    InstanceState,
    LogName,
    OnChange,
    Pause,
    RevisionSpec,
)
from branchyard.runtime.kube import names, render, states
from branchyard.runtime.kube.connection import Connection
from branchyard.runtime.kube.installs import InstallKeys
from branchyard.runtime.kube.namespaces import EVENT, Namespaces, Report, Slot
from branchyard.runtime.kube.options import KubeOptions
from branchyard.runtime.kube.podlogs import PodLogs, kept_output
from branchyard.runtime.kube.services import Switchboard
from branchyard.runtime.kube.watch import Key, Watch
from branchyard.runtime.processes import uninterrupted

log = logging.getLogger(__name__)

RESTART_MANAGER = "branchyard-restart"
"""The field manager of a restart's annotation: the runtime's own applies leave it be."""
RESTARTED_AT = "branchyard.dev/restarted-at"


class Stalled(BuildFailed):
    """A start that failed, its pod in a crash loop or its progress deadline passed,
    with the last lines of the log that says why (kept on the Deployment as it is scaled
    to 0)."""

    def __init__(self, message: str, kept: dict[str, str]) -> None:
        super().__init__(message)
        self.kept = kept


@dataclass(frozen=True)
class KubeBuild:
    spec: RevisionSpec


def _kube(build: Build) -> KubeBuild:
    if not isinstance(build, KubeBuild):
        raise TypeError(f"not a Kubernetes build: {build!r}")
    return build


class KubeInstance:
    """A started revision: its state is its web pods' (see ``states.instance_state``)."""

    def __init__(
        self, runtime: KubeRuntime, spec: RevisionSpec, key: Key, address: Address
    ) -> None:
        self._runtime = runtime
        self.spec = spec
        self.key = key
        self._address = address
        self.seen = states.Seen(InstanceState.STARTING)
        self.last_output: tuple[str, ...] = ()
        self.unlisten: Callable[[], None] = _nothing

    @property
    def address(self) -> Address:
        return self._address

    @property
    def state(self) -> InstanceState:
        return self.seen.state

    @property
    def exit_code(self) -> int | None:
        return self.seen.exit_code

    @property
    def restarts(self) -> int:
        return self.seen.restarts

    async def stop(self, grace: float) -> None:
        await self._runtime.stop(self)


class KubeRuntime:
    def __init__(
        self,
        connection: Connection,
        options: KubeOptions,
        report: Report,
        home_url: Callable[[], str],
        known: Callable[[], Collection[Slot]],
        sources: Callable[[str], Source] | None = None,
    ) -> None:
        self.connection = connection
        self._options = options
        self._report = report
        self._home_url = home_url
        self._known = known
        cached = options.install_cache is not None
        self._keys = InstallKeys(sources) if cached and sources is not None else None
        self.namespaces = Namespaces(connection, options, report)
        self.switchboard = Switchboard(connection, options, self.namespaces, report)
        self.watch = Watch(connection)
        self._logs = PodLogs(connection, self.namespaces, self.watch)
        self._current: dict[Key, KubeInstance] = {}
        self._starting: dict[str, int] = {}  # Kubernetes namespace -> starts under way
        self._detached = False

    @classmethod
    async def connect(
        cls,
        options: KubeOptions,
        report: Report,
        home_url: Callable[[], str],
        known: Callable[[], Collection[Slot]],
        sources: Callable[[str], Source] | None = None,
    ) -> KubeRuntime:
        """A runtime on the cluster ``options`` name; a UsageError if it cannot be used.
        With an install cache, ``sources`` (the daemon's copies of the repos) give the
        revisions' environment keys; without them, no pod uses the cache."""
        connection = await Connection.open(options)
        return cls(connection, options, report, home_url, known, sources)

    def _key(self, spec: RevisionSpec) -> Key:
        namespace = self.namespaces.name(spec.namespace)
        return (namespace, names.object_name(spec.service), str(spec.ordinal))

    # building

    async def _environment(self, spec: RevisionSpec) -> str | None:
        """The key of the revision's environment in the install cache; None without one."""
        return None if self._keys is None else await self._keys.key(spec)

    async def build(self, spec: RevisionSpec) -> KubeBuild:
        """Nothing to build here; a repo pods cannot fetch, or a name that does not fit,
        fails now."""
        try:
            render.revision_objects(self._options, spec, await self._environment(spec))
        except BranchyardError as exc:
            raise BuildFailed(exc.message) from None
        return KubeBuild(spec)

    def release(self, build: Build) -> None:
        return None

    # running

    async def _apply(
        self, spec: RevisionSpec, replicas: int, annotations: dict[str, str] | None = None
    ) -> int:
        """Apply the revision's env, its repo's login and its Deployments with ``replicas``
        pods each (the web one with ``annotations``); the web Deployment's generation."""
        config, secret = render.env_objects(self._options, spec)
        login = render.login_secret(self._options, spec)
        made = [thing for thing in (config, secret, login) if thing is not None]
        for thing in made:
            await self.connection.apply(thing)
        web = names.revision_name(spec.service, spec.ordinal)
        generation = 0
        key = await self._environment(spec)
        for deployment in render.deployments(self._options, spec, config, secret, key):
            assert deployment.spec is not None and deployment.metadata is not None
            deployment.spec.replicas = replicas
            if annotations and deployment.metadata.name == web:
                deployment.metadata.annotations = annotations
            applied = await self.connection.apply(deployment)
            if generation == 0 and applied.metadata is not None:
                generation = applied.metadata.generation or 0
        return generation

    async def start(self, build: Build, on_change: OnChange) -> KubeInstance:
        spec = _kube(build).spec
        slot = (spec.namespace, spec.service)
        key = self._key(spec)
        name = names.revision_name(spec.service, spec.ordinal)
        namespace = await self.namespaces.ensure(spec.namespace, slot)
        previous = self._current.get(key)
        self._starting[namespace] = self._starting.get(namespace, 0) + 1
        try:
            generation = await self._apply(spec, 1)
            if previous is not None:
                generation = await self._restart(spec, namespace, name)
            self._report(EVENT, f"applied Deployment {name} in {namespace}", slot)
            instance = KubeInstance(self, spec, key, self.switchboard.address(spec))
            await self._available(instance, namespace, name, generation)
        except BaseException as exc:
            if previous is None and not self._detached:
                kept = exc.kept if isinstance(exc, Stalled) else None
                await uninterrupted(asyncio.ensure_future(self._scale(spec, 0, "", kept)))
            if isinstance(exc, BuildFailed):
                self._report(EVENT, f"{name} in {namespace} failed: {exc.message}", slot)
            raise
        finally:
            self._starting[namespace] -= 1
        if previous is not None:
            previous.unlisten()
        self._current[key] = instance

        def changed() -> None:
            seen = states.instance_state(self.watch.pods_of(key))
            if seen != instance.seen:
                instance.seen = seen
                on_change(instance)

        instance.unlisten = self.watch.listen(key, changed)
        return instance

    async def _available(
        self, instance: KubeInstance, namespace: str, name: str, generation: int
    ) -> None:
        spec = instance.spec

        def reached() -> states.Progress | None:
            deployment = self.watch.deployment(namespace, name)
            pods = self.watch.pods_of(instance.key)
            found = states.progress(deployment, generation, pods=pods)
            return None if found is states.Progress.PROGRESSING else found

        if await self.watch.until(instance.key, reached) is not states.Progress.AVAILABLE:
            deadline = self._options.build_timeout + spec.manifest.health_timeout
            health = (
                f"health check GET {spec.manifest.health_path} did not pass within {deadline:g} s"
            )
            pods = self.watch.pods_of(instance.key)
            reason = states.failure(self.watch.deployment(namespace, name), pods, health)
            building = reason.startswith("init container")
            lines = await self._logs.last_lines(_log_of(spec, building), LAST_LINES)
            said = f"; last output: {' | '.join(lines[-3:])}" if lines else ""
            raise Stalled(reason + said, kept_output(building, lines))
        instance.seen = states.instance_state(self.watch.pods_of(instance.key))

    async def _restart(self, spec: RevisionSpec, namespace: str, name: str) -> int:
        """New pods for a running revision (``restart``): an annotation on its pod
        template, under a field manager of its own; the new generation."""
        template = PodTemplateSpec(
            metadata=ObjectMeta(annotations={RESTARTED_AT: datetime.now(UTC).isoformat()})
        )
        patch = Deployment(
            metadata=ObjectMeta(name=name, namespace=namespace),
            spec=DeploymentSpec(
                selector=LabelSelector(matchLabels=names.selector(spec.service, spec.ordinal)),
                template=template,
            ),
        )
        applied = await self.connection.call(
            self.connection.client.apply(patch, field_manager=RESTART_MANAGER, force=True)
        )
        return int(applied.metadata.generation or 0)

    async def _scale(
        self, spec: RevisionSpec, replicas: int, why: str, kept: dict[str, str] | None = None
    ) -> None:
        await self._apply(spec, replicas, kept)
        name = names.revision_name(spec.service, spec.ordinal)
        where = self.namespaces.name(spec.namespace)
        if kept:  # until the watch holds them, a read of the log would ask the pod, going

            def holds() -> bool | None:
                deployment = self.watch.deployment(where, name)
                meta = deployment.metadata if deployment is not None else None
                return kept.items() <= ((meta.annotations if meta else None) or {}).items() or None

            await self.watch.until(self._key(spec), holds)
        said = f"scaled {name} in {where} to {replicas}" + (f": {why}" if why else "")
        self._report(EVENT, said, (spec.namespace, spec.service))

    async def stop(self, instance: KubeInstance) -> None:
        """Scale the revision to 0, keeping its Deployment for a rollback; unless a
        newer instance of it took over (a restart), or the daemon is stopping."""
        if self._detached or self._current.get(instance.key) is not instance:
            return
        instance.unlisten()
        del self._current[instance.key]
        await self._scale(instance.spec, 0, "kept for a rollback")

    def detach(self) -> None:
        """The daemon is stopping: what runs stays running for the next daemon."""
        self._detached = True

    # retention

    async def prune(self, namespace: str, service: str, keep: Collection[int]) -> int:
        """Delete the Deployments of the revisions retention drops, but the newest's (a
        failed one keeps its last lines, one starting is on its way), and the ConfigMaps
        and Secrets no kept Deployment uses."""
        where = self.namespaces.name(namespace)
        label = names.object_name(service)
        mine = [
            d
            for (ns, _), d in self.watch.deployments.items()
            if ns == where and _labels(d).get(names.SERVICE) == label
        ]
        newest = max((_ordinal(d) for d in mine), default=0)
        gone = [d for d in mine if _ordinal(d) not in keep and _ordinal(d) != newest]
        if not gone:
            return 0
        for deployment in gone:
            await self.connection.delete(Deployment, _name(deployment), where)
        await self._delete_env(where, label, [d for d in mine if d not in gone])
        self._report(
            EVENT,
            f"deleted {', '.join(_name(d) for d in gone)} in {where} (retention)",
            (namespace, service),
        )
        return 0

    async def _delete_env(self, where: str, label: str, kept: list[Deployment]) -> None:
        """Delete the ConfigMaps and Secrets of a service that no kept Deployment uses."""
        used = {name for d in kept for name in _referenced(d)}
        for kind in (ConfigMap, Secret):
            for thing in await self.connection.list(kind, where, {names.SERVICE: label}):
                if _name(thing) not in used:
                    await self.connection.delete(kind, _name(thing), where)

    async def discard(self, namespace: str, service: str) -> None:
        """Delete a service's objects; then its Namespace if no service of it is left."""
        where = self.namespaces.name(namespace)
        label = names.object_name(service)
        for key in [k for k in self._current if k[:2] == (where, label)]:
            self._current.pop(key).unlisten()
        mine = [
            d
            for (ns, _), d in self.watch.deployments.items()
            if ns == where and _labels(d).get(names.SERVICE) == label
        ]
        others = [
            d
            for (ns, _), d in self.watch.deployments.items()
            if ns == where and _labels(d).get(names.SERVICE) != label
        ]
        if not others and not self._starting.get(where):
            self.switchboard.forget_namespace(namespace)
            await self.namespaces.delete(namespace)
            return
        for deployment in mine:
            await self.connection.delete(Deployment, _name(deployment), where)
        await self._delete_env(where, label, [])
        if mine:
            self._report(
                EVENT, f"deleted the Deployments of {label} in {where}", (namespace, service)
            )

    async def gc(self) -> dict[str, int]:
        """Delete what branchyard made for services the store no longer knows: their
        objects, and the Namespaces of this daemon's (its prefix's) none of whose services
        it knows. Fallbacks are the Switchboard's, and objects without branchyard's label
        are never looked at."""
        known = {(self.namespaces.name(ns), names.object_name(s)) for ns, s in self._known()}
        spaces = {where for where, _ in known}
        deleted = 0
        for found in await self.connection.list(Namespace, ALL_NS):
            name = _name(found)
            held = _labels(found).get(names.NAMESPACE)
            if held is None or self._options.namespace_prefix + held != name or name in spaces:
                continue  # another daemon's (another prefix), or known
            if await self.connection.delete(Namespace, name):
                self._report(EVENT, f"gc deleted Namespace {name}", None)
                deleted += 1
        for kind in (Deployment, Service, ConfigMap, Secret, Ingress):
            for thing in await self.connection.list(kind, ALL_NS):
                where = str(getattr(getattr(thing, "metadata", None), "namespace", ""))
                labels = _labels(thing)
                label = labels.get(names.SERVICE, "")
                if where in spaces and (where, label) not in known and names.FALLBACK not in labels:
                    await self.connection.delete(kind, _name(thing), where)
                    said = f"gc deleted {kind.__name__} {_name(thing)} in {where}"
                    self._report(EVENT, said, None)
                    deleted += 1
        return {"kubernetes_objects_deleted": deleted}

    async def recover(self) -> int:
        """Start watching what runs, and learn the Services a daemon before left (so
        that those no longer wanted go). Nothing is stopped: the next applies adopt."""
        await self.watch.start()
        self.switchboard.found(await self.connection.list(Service, ALL_NS))
        return 0

    # addresses

    async def peer_url(self, namespace: str, peer: str) -> str:
        return render.peer_url(peer)

    async def sync_peers(self, wanted: Collection[Slot]) -> None:
        self.switchboard.want_fallbacks(wanted)

    def public_url(self, namespace: str, service: str) -> str:
        return render.public_url(self._options, namespace, service)

    def home_url(self) -> str:
        return self._home_url()

    # logs

    async def has_log(self, log: LogName) -> bool:
        return await self._logs.has_log(log)

    async def missing_log(self, log: LogName) -> str | None:
        return self._logs.missing(log)

    async def tail_log(self, log: LogName, size: int) -> bytes:
        return await self._logs.tail(log, size)

    async def last_lines(self, log: LogName, count: int = LAST_LINES) -> list[str]:
        return await self._logs.last_lines(log, count)

    def read_log(
        self, log: LogName, lines: int | None = None, pause: Pause | None = None
    ) -> AsyncIterator[bytes]:
        return self._logs.read(log, lines, pause)

    async def close(self) -> None:
        self._detached = True
        await self.switchboard.close()
        await self.watch.close()
        await self.connection.close()


def _nothing() -> None:
    return None


def _labels(thing: object) -> dict[str, str]:
    meta = getattr(thing, "metadata", None)
    return dict((meta.labels if meta else None) or {})


def _ordinal(deployment: Deployment) -> int:
    return int(_labels(deployment).get(names.REVISION, "0"))


def _name(thing: object) -> str:
    meta = getattr(thing, "metadata", None)
    return str(meta.name if meta else "")


def _referenced(deployment: Deployment) -> set[str]:
    """The ConfigMaps and Secrets a Deployment's pods take their env from or mount (a
    private repo's login)."""
    template = deployment.spec.template.spec if deployment.spec else None
    found: set[str] = set()
    for volume in (template.volumes if template else None) or ():
        if volume.secret is not None and volume.secret.secretName:
            found.add(volume.secret.secretName)
    for container in (template.containers if template else None) or ():
        for source in container.envFrom or ():
            if source.configMapRef is not None and source.configMapRef.name:
                found.add(source.configMapRef.name)
            if source.secretRef is not None and source.secretRef.name:
                found.add(source.secretRef.name)
    return found


def _log_of(spec: RevisionSpec, build: bool) -> LogName:
    return LogName(spec.namespace, spec.service, spec.ordinal, build)
