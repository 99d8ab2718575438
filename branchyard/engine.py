"""The engine: the one place that acts on the planner's decisions.

It keeps what the watcher saw and people set, asks :func:`branchyard.planner.plan`
what to change, and carries each action out through the seams of ``runtime``
(a :class:`~branchyard.runtime.Runtime` and a :class:`~branchyard.runtime.Traffic`):
build, start, wait until healthy, route, stop the old revision. It makes none of
its parts: ``daemon`` wires them and hands them over. Each
(namespace, service) slot has at most one deploy in flight; a newer target
cancels the older one. Requests to reconcile are coalesced: a burst of pushes
plans once. A plan, or a deploy, that a fault ended (the store could not be
written: a full disk) is tried again with backoff, 2 s, 4 s, ... 60 s, so that
what was pushed meanwhile deploys once the fault is gone.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import Collection, Coroutine, Iterable, Mapping
from dataclasses import replace
from datetime import UTC, datetime

from branchyard import serving
from branchyard.errors import (
    BranchyardError,
    Conflict,
    NotFound,
    RemoteUnreachable,
    UsageError,
    is_temporary,
    reason_of,
)
from branchyard.git import (
    Heads,
    Repos,
    check_branch_name,
    choose_default_branch,
    configured_default_branch,
    local_path,
    ls_remote,
)
from branchyard.model import Clock, Overlay, Repo, RepoHeads, Revision, RevisionState, Target
from branchyard.naming import dns_label, env_var_for, service_name_from_url
from branchyard.planner import NO_SETTINGS, ActionKind, Slot, plan
from branchyard.retry import BACKOFF, Retry
from branchyard.rollout import Rollouts
from branchyard.runtime import Runtime, Traffic
from branchyard.serving import DAEMON_STOPPED
from branchyard.settings import Settings, check_version, describe_change, validate_env
from branchyard.status import StatusReporter
from branchyard.store import Store
from branchyard.text import redacted_url
from branchyard.vault import Vault
from branchyard.watcher import Watching

log = logging.getLogger(__name__)

BURST_SETTLE = 0.3  # seconds a deploy that cancelled an older one waits before building
FIRST_LOOK_TIMEOUT = 10.0  # seconds the first plan waits for every repo to be read
_SERVICE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")


async def _ended(deploy: asyncio.Task[object]) -> None:
    """Wait until a cancelled deploy has ended, without cancelling it again if the
    waiter is cancelled meanwhile (as ``gather`` would).

    A cancelled deploy may be stopping what it had started; a second cancel would cut
    that short and leave it running. In a burst of pushes the deploy that cancelled
    it is itself cancelled a moment later, while it waits here: that cancel is its
    own, and the first deploy still finishes its stop.
    """
    await asyncio.wait([deploy])


class Engine:
    def __init__(
        self,
        store: Store,
        runtime: Runtime,
        traffic: Traffic,
        rollouts: Rollouts,
        watcher: Watching,
        sources: Repos,
        settings: Settings,
        vault: Vault,
        status: StatusReporter,
        clock: Clock,
    ) -> None:
        self.store = store
        self.runtime = runtime
        self.traffic = traffic
        self.rollouts = rollouts
        self.watcher = watcher
        self.sources = sources
        self.settings_repo = settings
        self.vault = vault
        self.status = status
        self.clock = clock
        self._reports: set[asyncio.Task[bool]] = set()
        self.heads: dict[str, RepoHeads] = {}
        self.overlays: dict[Slot, Overlay] = {}
        self.targets: dict[Slot, Target] = {}
        self._current: dict[Slot, str] = {}
        self._deploys: dict[Slot, asyncio.Task[object]] = {}  # each slot's newest deploy
        self._unended: set[asyncio.Task[object]] = set()  # every deploy, superseded ones too
        self._faults: dict[Slot, int] = {}  # deploys of a slot that ended by a fault, in a row
        self._replans: set[asyncio.Task[None]] = set()  # plans due after such a fault
        self._wake = asyncio.Event()
        self._loop_task: asyncio.Task[None] | None = None

    # life cycle

    async def start(self) -> None:
        """Recover from whatever the last daemon left, then start watching."""
        killed = await self.runtime.recover()
        if killed:
            log.warning("stopped %d processes a previous daemon left running", killed)
            self.store.event("recovered", f"stopped {killed} leftover processes")
        served = self.store.active_revisions() + self.store.stopped(DAEMON_STOPPED)
        recovery = serving.recovery(served, self.store.pins())
        self.store.apply(recovery.change)
        self.overlays = await self.settings_repo.open()
        if self.settings_repo.set_aside:
            log.warning("%s", self.settings_repo.set_aside)
            self.store.event("settings", self.settings_repo.set_aside)
        await self._restore(recovery.restore)
        for revision in self.store.latest_revisions():
            if revision.state is RevisionState.FAILED:
                # Tried and failed before: built again only when its commit, settings
                # or peers change, as if this daemon had never stopped.
                self._current[(revision.namespace, revision.service)] = revision.key
        self._loop_task = asyncio.create_task(self._loop(), name="engine")
        for repo in self.store.repos():
            self.watcher.watch(repo)

    def report(self, revision: Revision) -> None:
        """Tell the forge (if one is configured) how a revision of its commit is doing:
        ``daemon`` makes this a listener of the store's revision changes."""
        if not self.status.enabled:
            return
        url = self.runtime.public_url(revision.namespace, revision.service)
        description = f"{revision.service} v{revision.ordinal} {revision.state.value}"
        if revision.reason:
            description += f": {revision.reason}"
        task = asyncio.get_running_loop().create_task(
            self.status.report(
                revision.url,
                revision.sha,
                revision.state.value,
                url,
                description,
                context=f"branchyard/{revision.namespace}",
            )
        )
        self._reports.add(task)
        task.add_done_callback(self._reports.discard)

    async def _restore(self, revisions: Iterable[Revision]) -> None:
        """Bring back what served when the last daemon ended, from the kept builds."""

        async def restore(revision: Revision) -> None:
            slot = (revision.namespace, revision.service)
            self.traffic.down(*slot)
            try:
                await self.rollouts.build(revision)
            except Exception as exc:
                if not is_temporary(exc):
                    self.rollouts.failed(revision, exc)
                    return
                # Its repo cannot be fetched now (its mirror is gone): start-up does
                # not wait for it, the revision is built again with backoff meanwhile.
                self._current[slot] = revision.key
                self._track(slot, self.rollouts.go_live(revision, retry=True), f"restore {slot}")
                return
            if await self.rollouts.go_live(revision):
                self._current[slot] = revision.key

        await asyncio.gather(*(restore(r) for r in revisions))

    async def close(self) -> None:
        if self._loop_task:
            self._loop_task.cancel()
            await asyncio.wait([self._loop_task])
        for replan in self._replans:
            replan.cancel()
        await self.watcher.close()
        self.rollouts.closing = True
        for task in self._deploys.values():
            task.cancel()
        # A superseded deploy may still be stopping what it started, after the deploy
        # that waited for it was cancelled here: wait for every one to end.
        while self._unended:
            await asyncio.wait(list(self._unended))
        await self.rollouts.close()

    def request_reconcile(self) -> None:
        self._wake.set()

    async def on_heads(self, heads: RepoHeads) -> None:
        """What the watcher saw in one repo (``daemon`` makes this its callback)."""
        self.heads[heads.repo] = heads
        self.store.event("push", f"{heads.repo}: {len(heads.branches)} branch heads")
        repo = next((r for r in self.store.repos() if r.name == heads.repo), None)
        if repo is not None and repo.default_branch is None:
            # Registered before the default branch was fixed at `repo add`: fix it now.
            seen = Heads(heads.default_branch or None, dict(heads.branches), heads.dangling_head)
            configured = await configured_default_branch(local_path(repo.url))
            chosen = choose_default_branch(seen, configured)
            self.store.update_repo(replace(repo, default_branch=chosen))
            self._say_default_branch(repo.name, chosen, heads.dangling_head)
        self.request_reconcile()

    def poke(self, repo: str) -> None:
        """Look at a repo's branch heads now, whatever its poll interval (a webhook said
        it changed)."""
        self.watcher.poke(repo)

    def note(self, kind: str, message: str) -> None:
        """Record an event that happened outside the engine (a token rotated, a webhook)."""
        self.store.event(kind, message)

    def _say_default_branch(self, name: str, branch: str, dangling_head: bool) -> None:
        """Record which branch deploys to the baseline, and warn if HEAD named none there is."""
        change = f"(change it with: branchyard repo set {name} --default-branch BRANCH)"
        if not dangling_head:
            self.store.event("repo", f"{name}: default branch {branch} {change}")
            return
        message = (
            f"{name}: HEAD names no existing branch; {branch} deploys to the baseline {change}"
        )
        log.warning("%s", message)
        self.store.event("warning", message)

    async def _loop(self) -> None:
        # Plan once with every repo's heads rather than once per repo as they come.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(FIRST_LOOK_TIMEOUT):
                await self.watcher.first_look()
        failures = 0
        while True:
            await self._wake.wait()
            self._wake.clear()
            try:
                await self._reconcile()
            except Exception as exc:
                # The store could not be written (a full disk): the heads it was given are
                # still here, so plan again after a backoff rather than at the next push.
                failures += 1
                pending = Retry(failures, BACKOFF.delay(failures), exc)
                log.exception("%s", pending.note("plan"))
                self._wake.set()
                await self.clock.sleep(pending.delay)
            else:
                failures = 0

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
            if slot not in self.rollouts.shares:
                self.traffic.down(*slot)
        for action in result.actions:
            slot = (action.namespace, action.service)
            log.info("%s %s:%s (%s)", action.kind, *slot, action.reason)
            if action.kind is ActionKind.DEPLOY and action.target is not None:
                self._current[slot] = action.target.key
                self._start_deploy(action.target, action.reason)
            else:
                if slot not in removed:  # rm recorded its own
                    self.store.event("removed", action.reason, slot)
                self._current.pop(slot, None)
                await self._cancel_deploy(slot)
                self.rollouts.retire_slot(slot, action.reason)
                self.store.set_pin(slot, None)
                await self.runtime.discard(*slot)
        # Peer addresses only for what a wanted service can see.
        await self.runtime.sync_peers(
            {(t.namespace, peer) for t in self.targets.values() for peer in t.peers}
        )

    # deploying

    def _start_deploy(self, target: Target, reason: str) -> None:
        slot = (target.namespace, target.service)
        previous = self._deploys.pop(slot, None)
        if previous:
            previous.cancel()
        self._track(slot, self._deploy(target, reason, previous), f"deploy {slot}")

    def _track(self, slot: Slot, work: Coroutine[object, object, object], name: str) -> None:
        """Run ``work`` as the slot's deploy: a newer target cancels it, closing waits."""
        task = asyncio.create_task(work, name=name)
        self._deploys[slot] = task
        self._unended.add(task)
        task.add_done_callback(lambda t: self._deploy_ended(slot, t))

    def _deploy_ended(self, slot: Slot, task: asyncio.Task[object]) -> None:
        self._unended.discard(task)
        newest = self._deploys.get(slot) is task
        if newest:
            del self._deploys[slot]
        if task.cancelled():
            return
        exc = task.exception()
        if exc is None:
            self._faults.pop(slot, None)
            return
        log.error("deploy of %s:%s failed: %s", *slot, reason_of(exc), exc_info=exc)
        if newest and not self.rollouts.closing:
            # It ended before a revision could say why (the store could not be written):
            # the slot's target is not deployed, so the next plan, after a backoff, does.
            self._current.pop(slot, None)
            self._faults[slot] = failures = self._faults.get(slot, 0) + 1
            replan = asyncio.create_task(self._replan(BACKOFF.delay(failures)))
            self._replans.add(replan)
            replan.add_done_callback(self._replans.discard)

    async def _replan(self, delay: float) -> None:
        await self.clock.sleep(delay)
        self.request_reconcile()

    async def _cancel_deploy(self, slot: Slot) -> None:
        task = self._deploys.pop(slot, None)
        if task:
            task.cancel()
            await _ended(task)

    async def _deploy(
        self, target: Target, reason: str, previous: asyncio.Task[object] | None
    ) -> None:
        if previous:
            await _ended(previous)
            # A burst of pushes: let it settle, so that only its newest commit is built.
            await self.clock.sleep(BURST_SETTLE)
        slot = (target.namespace, target.service)
        live = self.rollouts.live(slot)
        if live is not None and live.revision.key == target.key:
            return
        source = self.sources(target.url)
        try:
            await source.ensure(target.sha)
            subject = await source.subject(target.sha)
        except Exception:  # the build meets it again, and the revision says why
            subject = ""
        latest = next(iter(self.store.revisions(slot, limit=1)), None)
        (revision,) = self.store.apply(serving.deployment(latest, target, subject, reason))
        try:
            env = await self._env(target)
            self.store.set_env(revision.id, env)
            revision = replace(revision, env=env)
            build = await self.rollouts.build_retrying(revision)
        except asyncio.CancelledError:
            self.rollouts.cancelled(revision)
            raise
        except Exception as exc:
            self.rollouts.failed(revision, exc)
            return
        pin = self.store.pin(slot)
        staging = serving.landing(pin, revision, self.rollouts.live(slot) is not None)
        if staging is None:
            await self.rollouts.go_live(revision)
            return
        if staging.restore:
            with contextlib.suppress(BranchyardError):
                await self.rollouts.pin_to(slot, staging.pin, "restore")
        await self.rollouts.stage(revision, build, staging)

    async def _env(self, target: Target) -> dict[str, str]:
        """The env a target's processes get (but PORT, which the runtime picks)."""
        env: dict[str, str] = {}
        for peer in target.peers:
            env[env_var_for(peer)] = await self.runtime.peer_url(target.namespace, peer)
        env.update(target.settings.env)
        env.update(
            BRANCHYARD_NAMESPACE=target.namespace,
            BRANCHYARD_SERVICE=target.service,
            BRANCHYARD_REVISION=target.sha,
            BRANCHYARD_BRANCH=target.branch,
        )
        return env

    # commands

    async def add_repo(
        self, url: str, name: str | None, default_branch: str | None, webhook_secret: str = ""
    ) -> Repo:
        if url.startswith("-"):
            raise UsageError(f"{redacted_url(url)!r} is not a path or URL of a git repository")
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
        if default_branch is not None:
            await check_branch_name(default_branch)
        try:
            heads = await ls_remote(url)
        except RemoteUnreachable as exc:
            raise RemoteUnreachable(
                f"cannot reach {redacted_url(url)} now (temporary; try again): {exc.message}"
            ) from None
        except BranchyardError as exc:
            raise UsageError(
                f"{redacted_url(url)} is not a git repository I can read: {exc.message}"
            ) from None
        chosen = default_branch or choose_default_branch(
            heads, await configured_default_branch(path)
        )
        repo = Repo(service, url, chosen, webhook_secret)
        self.store.add_repo(repo)
        self.store.event("repo", f"added {service} from {redacted_url(url)}")
        if default_branch is None:
            self._say_default_branch(service, chosen, heads.dangling_head)
        self.watcher.watch(repo)
        return repo

    async def change_repo(
        self, name: str, default_branch: str | None, webhook_secret: str | None
    ) -> Repo:
        """Change a registered repo's default branch or webhook secret (None: keep it)."""
        repo = next((r for r in self.store.repos() if r.name == name), None)
        if repo is None:
            raise NotFound(f"no repo named {name!r} (see: branchyard repo ls)")
        if default_branch is None and webhook_secret is None:
            raise UsageError("nothing to change: give --default-branch or --webhook-secret")
        changes = []
        if default_branch is not None and default_branch != repo.default_branch:
            await check_branch_name(default_branch)
            changes.append(f"default branch {default_branch} (was {repo.default_branch})")
            repo = replace(repo, default_branch=default_branch)
        if webhook_secret is not None and webhook_secret != repo.webhook_secret:
            changes.append("webhook secret " + ("set" if webhook_secret else "removed"))
            repo = replace(repo, webhook_secret=webhook_secret)
        if changes:
            self.store.update_repo(repo)
            self.store.event("repo", f"{name}: {', '.join(changes)}")
            self.request_reconcile()
        return repo

    async def remove_repo(self, name: str) -> None:
        url = next((r.url for r in self.store.repos() if r.name == name), "")
        self.store.remove_repo(name)
        await self.sources.drop(url)
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

    def settings_of(self, namespace: str, service: str) -> Overlay:
        """What a person set for a service, with the version it is at."""
        self.target(namespace, service)
        return self.overlays.get((namespace, service), NO_SETTINGS)

    async def set_env(
        self,
        namespace: str,
        service: str,
        env: Mapping[str, str],
        version: str,
        author: str,
        message: str = "",
    ) -> tuple[Overlay, bool]:
        """Replace the env, if it is still at ``version``; (settings, whether they changed)."""
        slot = (namespace, service)
        async with self.settings_repo.lock:
            current = self.settings_of(namespace, service)
            check_version(version, current.version, f"{service} in {namespace}")
            change = describe_change(current.env, env)
            if not change:
                return current, False
            message = message or f"edit {service} in {namespace}: {change}"
            return await self._commit(slot, env, current.secrets, author, message), True

    async def change_env(
        self,
        namespace: str,
        service: str,
        assign: Mapping[str, str],
        unset: Collection[str],
        author: str,
    ) -> tuple[Overlay, bool]:
        """Set and unset variables of the env as it is now; (settings, whether they changed)."""
        slot = (namespace, service)
        both = sorted(set(assign) & set(unset))
        if both:
            raise UsageError(f"both set and unset: {', '.join(both)}")
        if not assign and not unset:
            raise UsageError("nothing to change: give variables to set or unset")
        validate_env(assign)
        async with self.settings_repo.lock:
            current = self.settings_of(namespace, service)
            missing = sorted(k for k in unset if k not in current.env)
            if missing:
                raise UsageError(f"not set in {namespace}:{service}: {', '.join(missing)}")
            env = {k: v for k, v in {**current.env, **assign}.items() if k not in unset}
            change = describe_change(current.env, env)
            if not change:
                return current, False
            overlay = await self._commit(slot, env, current.secrets, author, f"env {change}")
            return overlay, True

    async def set_secrets(
        self, namespace: str, service: str, changes: Mapping[str, str | None], author: str
    ) -> Overlay:
        """Set (a value) or unset (None) secrets; git records only that they changed.

        A value is kept only if its commit is made: if the commit fails, the
        secrets are put back as they were.
        """
        slot = (namespace, service)
        validate_env({k: v for k, v in changes.items() if v is not None})
        async with self.settings_repo.lock:
            current = self.settings_of(namespace, service)
            missing = [k for k, v in changes.items() if v is None and k not in current.secrets]
            if missing:
                raise UsageError(f"no secret {', '.join(missing)} in {namespace}:{service}")
            now = (
                datetime.fromtimestamp(self.clock.now(), UTC)
                .isoformat(timespec="microseconds")
                .replace("+00:00", "Z")
            )
            marks = {k: f"changed {now}" for k, v in changes.items() if v is not None}
            removed = {k for k, v in changes.items() if v is None}
            secrets = {k: v for k, v in {**current.secrets, **marks}.items() if k not in removed}
            verb = "set" if any(v is not None for v in changes.values()) else "unset"
            message = f"{verb} secret {' '.join(sorted(changes))}"
            before = self.vault.values(slot)
            self.vault.update(slot, changes)
            try:
                return await self._commit(slot, current.env, secrets, author, message)
            except (BranchyardError, OSError):
                self.vault.update(slot, {k: before.get(k) for k in changes})
                raise

    async def _commit(
        self,
        slot: Slot,
        env: Mapping[str, str],
        secrets: Mapping[str, str],
        author: str,
        message: str,
    ) -> Overlay:
        """Commit one change (the settings lock held), make it current and roll it out."""
        overlay = await self.settings_repo.write(slot, env, author, message, secrets)
        self.overlays[slot] = overlay
        self.store.event("settings", f"{message} ({overlay.version})", slot)
        self.request_reconcile()
        return overlay

    def secrets_of(self, namespace: str, service: str) -> dict[str, str]:
        self.target(namespace, service)
        return self.vault.values((namespace, service))

    # rollouts a person asks for

    async def rollback(self, namespace: str, service: str, ordinal: int | None) -> Revision:
        self.target(namespace, service)
        return await self.rollouts.pin_to((namespace, service), ordinal, "rollback")

    async def promote(self, namespace: str, service: str, ordinal: int) -> Revision:
        self.target(namespace, service)
        return await self.rollouts.pin_to((namespace, service), ordinal, "promote")

    async def restart(self, namespace: str, service: str) -> Revision:
        self.target(namespace, service)
        return await self.rollouts.restart((namespace, service))

    async def unpin(self, namespace: str, service: str) -> tuple[Revision | None, bool]:
        """Follow the branch again: its head goes live, built first if it must be.
        (the revision that went live, whether the head is being built)."""
        target = self.target(namespace, service)
        slot = (namespace, service)
        if self.store.pin(slot) is None:
            return None, False  # it follows its branch already (a failed head stays failed)
        revision = await self.rollouts.unpin(slot, target.key)
        live = self.rollouts.live(slot)
        if live is not None and live.revision.key == target.key:
            return revision, False
        if slot not in self._deploys:
            self._start_deploy(target, f"unpinned: back to the head of {target.branch}")
        return revision, True

    def behind(self, slot: Slot) -> Target | None:
        """The branch head, if an older commit serves ``slot`` (see :func:`serving.behind`)."""
        live = self.rollouts.live(slot)
        latest = next(iter(self.store.revisions(slot, limit=1)), None)
        return serving.behind(self.targets.get(slot), live.revision if live else None, latest)

    async def weight(self, namespace: str, service: str, percents: Mapping[int, int]) -> None:
        self.target(namespace, service)
        await self.rollouts.split((namespace, service), percents)

    async def gc(self) -> dict[str, int]:
        """Prune every slot's builds and the environment cache; what was freed."""
        freed = sum([await self.rollouts.prune(slot) for slot in list(self.targets)])
        return {"builds_bytes": freed, **await self.runtime.gc()}
