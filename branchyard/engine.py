"""The engine: the one place that acts on the planner's decisions.

It keeps what the watcher saw and people set, asks :func:`branchyard.planner.plan`
what to change, and carries each action out through the runtime:
build, start, wait until healthy, route, stop the old revision. Each
(namespace, service) slot has at most one deploy in flight; a newer target
cancels the older one. Requests to reconcile are coalesced: a burst of pushes
plans once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass

from branchyard.errors import BranchyardError, Conflict, NotFound, UsageError
from branchyard.git import Sources, local_path, ls_remote
from branchyard.manifest import CONFIG_FILE, PROCFILE, parse_manifest
from branchyard.model import Overlay, Repo, RepoHeads, Revision, RevisionState, Target
from branchyard.naming import dns_label, env_var_for, service_name_from_url
from branchyard.planner import ActionKind, Slot, plan
from branchyard.router import Router, RouteTable
from branchyard.runtime import Instance, RevisionSpec, Runtime
from branchyard.settings import SettingsRepo
from branchyard.store import Store
from branchyard.watcher import Watcher

log = logging.getLogger(__name__)

FIRST_LOOK_TIMEOUT = 10.0  # seconds the first plan waits for every repo to be read
_SERVICE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")


@dataclass
class Live:
    revision: Revision
    instance: Instance
    watch: asyncio.Task[None] | None = None


class Engine:
    def __init__(
        self,
        store: Store,
        runtime: Runtime,
        router: Router,
        table: RouteTable,
        sources: Sources,
        settings: SettingsRepo,
        poll_interval: float,
    ) -> None:
        self.store = store
        self.runtime = runtime
        self.router = router
        self.table = table
        self.sources = sources
        self.settings_repo = settings
        self.watcher = Watcher(sources, self._on_heads, poll_interval)
        self.heads: dict[str, RepoHeads] = {}
        self.overlays: dict[Slot, Overlay] = {}
        self.targets: dict[Slot, Target] = {}
        self.live: dict[Slot, Live] = {}
        self._current: dict[Slot, str] = {}
        self._peer_slots: set[Slot] = set()
        self._deploys: dict[Slot, asyncio.Task[None]] = {}
        self._retiring: set[asyncio.Task[None]] = set()
        self._wake = asyncio.Event()
        self._loop_task: asyncio.Task[None] | None = None

    # life cycle

    async def start(self) -> None:
        for revision in self.store.active_revisions():
            self.store.set_state(revision.id, RevisionState.STOPPED, "daemon restarted")
        self.overlays = await self.settings_repo.open()
        self._loop_task = asyncio.create_task(self._loop(), name="engine")
        for repo in self.store.repos():
            self.watcher.watch(repo)

    async def close(self) -> None:
        await self.watcher.close()
        if self._loop_task:
            self._loop_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._loop_task
        deploys = list(self._deploys.values())
        for task in deploys:
            task.cancel()
        await asyncio.gather(*deploys, return_exceptions=True)
        for slot in list(self.live):
            self._stop(slot, "daemon stopped")
        await asyncio.gather(*self._retiring, return_exceptions=True)

    def request_reconcile(self) -> None:
        self._wake.set()

    async def _on_heads(self, heads: RepoHeads) -> None:
        self.heads[heads.repo] = heads
        self.store.event("push", f"{heads.repo}: {len(heads.branches)} branch heads")
        self.request_reconcile()

    async def _loop(self) -> None:
        with contextlib.suppress(TimeoutError):
            # Plan once with every repo's heads rather than once per repo as they come.
            await asyncio.wait_for(self.watcher.first_look(), FIRST_LOOK_TIMEOUT)
        while True:
            await self._wake.wait()
            self._wake.clear()
            try:
                await self._reconcile()
            except Exception:
                log.exception("reconcile failed")

    async def _reconcile(self) -> None:
        repos = self.store.repos()
        removed = self.store.removed()
        result = plan(
            repos, self.heads, self.store.namespaces(), self.overlays, removed, self._current
        )
        self.store.set_namespaces(result.namespaces)
        self.store.forget_removed(result.heads)
        self.targets = dict(result.targets)
        for slot in self.targets:
            if self.table.resolve(*slot) is None and slot not in self.live:
                self.table.set_backend(*slot, None)
        for action in result.actions:
            slot = (action.namespace, action.service)
            log.info("%s %s:%s (%s)", action.kind, *slot, action.reason)
            if action.kind is ActionKind.DEPLOY and action.target is not None:
                self._current[slot] = action.target.key
                self._start_deploy(action.target, action.reason)
            else:
                self._current.pop(slot, None)
                await self._cancel_deploy(slot)
                self._stop(slot, action.reason)
                self.table.remove(*slot)
                self.runtime.discard(*slot)
        await self._close_unused_peer_ports()

    async def _close_unused_peer_ports(self) -> None:
        """Close the peer ports that no wanted service can see any more."""
        wanted = {(t.namespace, peer) for t in self.targets.values() for peer in t.peers}
        for slot in self._peer_slots - wanted:
            await self.router.close_peer_listener(*slot)
        self._peer_slots &= wanted

    # deploying

    def _start_deploy(self, target: Target, reason: str) -> None:
        slot = (target.namespace, target.service)
        previous = self._deploys.pop(slot, None)
        if previous:
            previous.cancel()
        task = asyncio.create_task(self._deploy(target, reason, previous), name=f"deploy {slot}")
        self._deploys[slot] = task
        task.add_done_callback(
            lambda t: self._deploys.pop(slot, None) if self._deploys.get(slot) is t else None
        )

    async def _cancel_deploy(self, slot: Slot) -> None:
        task = self._deploys.pop(slot, None)
        if task:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def _deploy(
        self, target: Target, reason: str, previous: asyncio.Task[None] | None
    ) -> None:
        if previous:
            await asyncio.gather(previous, return_exceptions=True)
        slot = (target.namespace, target.service)
        revision = self.store.new_revision(target, RevisionState.BUILDING)
        self.store.event("deploy", f"v{revision.ordinal} {reason}", slot)
        try:
            spec = await self._spec(target, revision)
            instance = await self.runtime.deploy(spec)
        except asyncio.CancelledError:
            self.store.set_state(revision.id, RevisionState.SUPERSEDED, "a newer target arrived")
            raise
        except BranchyardError as exc:
            self.store.set_state(revision.id, RevisionState.FAILED, exc.message)
            self.store.event("failed", f"v{revision.ordinal}: {exc.message}", slot)
            return
        except Exception as exc:
            log.exception("deploy of %s failed", slot)
            self.store.set_state(revision.id, RevisionState.FAILED, f"internal error: {exc}")
            return
        revision = self.store.set_state(revision.id, RevisionState.LIVE, port=instance.address[1])
        old = self.live.get(slot)
        self.live[slot] = Live(revision, instance)
        self.table.set_backend(*slot, instance.address)
        self.live[slot].watch = asyncio.create_task(self._watch_exit(slot, self.live[slot]))
        self.store.event("live", f"v{revision.ordinal} {revision.sha7} is live", slot)
        if old:
            self._retire(old, f"replaced by v{revision.ordinal}")

    async def _spec(self, target: Target, revision: Revision) -> RevisionSpec:
        source = self.sources(target.url)
        await source.ensure(target.sha)
        procfile = await source.read_file(target.sha, PROCFILE)
        config = await source.read_file(target.sha, CONFIG_FILE)
        manifest = parse_manifest(procfile, config)
        env = dict(manifest.env)
        for peer in target.peers:
            port = await self._peer_port((target.namespace, peer))
            env[env_var_for(peer)] = f"http://127.0.0.1:{port}"
        env.update(target.settings.env)
        env.update(
            BRANCHYARD_NAMESPACE=target.namespace,
            BRANCHYARD_SERVICE=target.service,
            BRANCHYARD_REVISION=target.sha,
            BRANCHYARD_BRANCH=target.branch,
        )
        return RevisionSpec(
            target.namespace,
            target.service,
            revision.ordinal,
            target.url,
            target.sha,
            manifest,
            env,
        )

    async def _peer_port(self, slot: Slot) -> int:
        """The stable loopback port through which peers reach ``slot``."""
        port = self.router.peer_port(*slot)
        if port is not None:
            return port
        self._peer_slots.add(slot)
        stored = self.store.address(slot)
        try:
            port = await self.router.open_peer_listener(*slot, port=stored or 0)
        except OSError:
            port = await self.router.open_peer_listener(*slot)
        if port != stored:
            self.store.set_address(slot, port)
        return port

    async def _watch_exit(self, slot: Slot, live: Live) -> None:
        code = await live.instance.wait()
        if self.live.get(slot) is live:
            del self.live[slot]
            self.table.set_backend(*slot, None)
            reason = f"crashed with exit code {code}; see: branchyard logs"
            self.store.set_state(live.revision.id, RevisionState.FAILED, reason)
            self.store.event("crashed", f"v{live.revision.ordinal} {reason}", slot)
            await live.instance.stop()

    def _retire(self, live: Live, reason: str) -> None:
        """Stop a revision that no longer takes traffic, in the background.

        It is marked stopped only once its processes have exited. The task is
        kept, so that neither a cancelled deploy nor the reconcile loop can
        leave a process half-stopped, and :meth:`close` waits for it.
        """
        if live.watch:
            live.watch.cancel()

        async def stop() -> None:
            await live.instance.stop()
            self.store.set_state(live.revision.id, RevisionState.STOPPED, reason)

        task = asyncio.create_task(stop(), name=f"stop {live.revision.service}")
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    def _stop(self, slot: Slot, reason: str) -> None:
        live = self.live.pop(slot, None)
        if live:
            self._retire(live, reason)

    # commands

    async def add_repo(self, url: str, name: str | None, default_branch: str | None) -> Repo:
        path = local_path(url)
        if path is not None:
            path = path.expanduser().resolve()
            if not path.exists():
                raise UsageError(f"{url}: no such directory")
            url = str(path)
        service = name or service_name_from_url(url)
        if not _SERVICE_NAME.match(service) or not dns_label(service):
            raise UsageError(
                f"{service!r} is not a usable service name (letters, digits, _ . -); use --name"
            )
        for other in self.store.repos():
            if other.name != service and dns_label(other.name) == dns_label(service):
                raise Conflict(f"{service} and {other.name} have the same host name; use --name")
        try:
            await ls_remote(url)
        except BranchyardError as exc:
            raise UsageError(f"{url} is not a git repository I can read: {exc.message}") from None
        repo = Repo(service, url, default_branch)
        self.store.add_repo(repo)
        self.store.event("repo", f"added {service} from {url}")
        self.watcher.watch(repo)
        return repo

    async def remove_repo(self, name: str) -> None:
        url = next((r.url for r in self.store.repos() if r.name == name), "")
        self.store.remove_repo(name)
        self.sources.drop(url)
        self.watcher.unwatch(name)
        self.heads.pop(name, None)
        self.store.event("repo", f"removed {name}")
        self.request_reconcile()

    def target(self, namespace: str, service: str) -> Target:
        target = self.targets.get((namespace, service))
        if target is None:
            namespaces = sorted({ns for ns, _ in self.targets})
            if namespace not in namespaces:
                raise NotFound(
                    f"no namespace {namespace!r} (namespaces: {', '.join(namespaces) or 'none'})"
                )
            here = sorted(s for ns, s in self.targets if ns == namespace)
            raise NotFound(f"no service {service!r} in {namespace} (services: {', '.join(here)})")
        return target

    def remove_service(self, namespace: str, service: str) -> Target:
        target = self.target(namespace, service)
        self.store.set_removed((namespace, service), target.sha)
        self.store.event(
            "removed", f"removed until the next push of {target.branch}", (namespace, service)
        )
        self.request_reconcile()
        return target

    async def set_env(
        self, namespace: str, service: str, env: Mapping[str, str], author: str, message: str
    ) -> Overlay:
        self.target(namespace, service)
        overlay = await self.settings_repo.write((namespace, service), env, author, message)
        self.overlays[(namespace, service)] = overlay
        self.store.event("settings", f"{message} ({overlay.version})", (namespace, service))
        self.request_reconcile()
        return overlay

    def env_of(self, namespace: str, service: str) -> dict[str, str]:
        self.target(namespace, service)
        return dict(self.overlays.get((namespace, service), Overlay("")).env)

    async def settled(self) -> None:
        """Wait until no reconcile is pending and no deploy is in flight (for tests)."""
        while self._wake.is_set() or self._deploys:
            await asyncio.sleep(0.05)
