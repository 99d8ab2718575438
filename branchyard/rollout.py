"""Rollouts: which revisions of a (namespace, service) slot run and take traffic.

The engine decides *what* should run (a :class:`~branchyard.model.Target` per
slot); this module does the switch, one slot at a time:

    build ─> (pinned? staged) ─> start + health ─> route ─> drain old ─> stop old

Traffic of a slot is a map of revision to weight: one revision at 100 in the
normal case, several for a canary (``weight``). A person can pin a slot
(``rollback``, ``promote``, ``weight``): new commits still build and show as
staged, but take no traffic until ``unpin`` or ``promote``. Builds of the last
:data:`~branchyard.serving.KEEP_BUILDS` revisions of each slot are kept, so going
back is a start, not a build. Every running revision is supervised by the
runtime; when its supervisor gives up, the revision is marked crashed and taken
out of traffic.

What to do is decided by :mod:`branchyard.serving`, over a :class:`SlotView` read
once; each change it decides is written with one :meth:`Store.apply`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from branchyard import serving
from branchyard.errors import BranchyardError, BuildFailed, UsageError, reason_of
from branchyard.git import Repos
from branchyard.manifest import CONFIG_FILE, PROCFILE, parse_manifest
from branchyard.model import Revision, RevisionState
from branchyard.naming import BASELINE
from branchyard.retry import Retry, Sleep, retry
from branchyard.runtime import (
    Build,
    Instance,
    InstanceState,
    LogName,
    RevisionSpec,
    Runtime,
    Traffic,
)
from branchyard.serving import DAEMON_STOPPED, NO_CHANGE, Change, SlotView, Staging
from branchyard.store import Store

log = logging.getLogger(__name__)

Slot = tuple[str, str]
DRAIN_GRACE = 30.0  # seconds in-flight requests get to finish on a retired revision


@dataclass
class Running:
    revision: Revision
    build: Build
    instance: Instance


@dataclass(frozen=True)
class FailureLog:
    """The log that shows why a revision failed or crashed, and the command that prints it."""

    log: LogName
    command: str

    @property
    def build(self) -> bool:
        """Whether it is the build log (it failed to build), else its processes' output."""
        return self.log.build


def logs_command(namespace: str, service: str, ordinal: int, build: bool) -> str:
    """The exact ``branchyard logs`` command for one revision's output or build log."""
    where = "" if namespace == BASELINE else f"-n {namespace} "
    return f"branchyard {where}logs {service} --revision {ordinal}" + (" --build" if build else "")


class Rollouts:
    def __init__(
        self,
        store: Store,
        runtime: Runtime,
        traffic: Traffic,
        sources: Repos,
        secrets: Callable[[Slot], Mapping[str, str]],
        drain_grace: float = DRAIN_GRACE,
        stop_grace: float = 10.0,
        sleep: Sleep = asyncio.sleep,
    ) -> None:
        self.store = store
        self.runtime = runtime
        self.traffic = traffic
        self.sources = sources
        self.secrets = secrets
        self.drain_grace = drain_grace
        self.stop_grace = stop_grace
        self.sleep = sleep
        self.running: dict[int, Running] = {}  # revision id -> started revision
        self.shares: dict[Slot, dict[int, int]] = {}  # slot -> revision id -> weight
        self.builds: dict[int, Build] = {}  # revision id -> build held in memory
        self._retiring: set[asyncio.Task[None]] = set()
        self.closing = False  # the daemon is stopping: a cancelled deploy was interrupted

    # what runs

    def live(self, slot: Slot) -> Running | None:
        """The revision with the most traffic in ``slot``."""
        best = serving.heaviest(self.shares.get(slot, {}))
        return None if best is None else self.running.get(best)

    def weights(self, slot: Slot) -> dict[int, int]:
        """ordinal -> weight of the revisions that take traffic."""
        return {
            self.running[rid].revision.ordinal: w
            for rid, w in self.shares.get(slot, {}).items()
            if rid in self.running
        }

    def view(self, slot: Slot) -> SlotView:
        """``slot`` as it is now: its revisions (one read of the store), traffic, what runs."""
        return self._view(slot, tuple(self.store.revisions(slot)))

    def _view(self, slot: Slot, history: tuple[Revision, ...]) -> SlotView:
        running = (r.revision for r in self.running.values())
        return SlotView(
            slot,
            history,
            self.weights(slot),
            frozenset(r.ordinal for r in running if (r.namespace, r.service) == slot),
        )

    def _route(self, slot: Slot, why: str = "") -> None:
        """Route ``slot`` to what of its traffic runs; with nothing, tell the router ``why``
        (else that the live revision is restarting, if it is)."""
        weights = self.shares.get(slot, {})
        chosen = [self.running[rid] for rid in sorted(weights) if rid in self.running]
        serving = [
            (r.instance.address, weights[r.revision.id])
            for r in chosen
            if r.instance.state is InstanceState.RUNNING
        ]
        if serving:
            self.traffic.route(*slot, serving)
        else:
            restarting = next(
                (
                    f"v{r.revision.ordinal} exited with code {r.instance.exit_code}; restarting"
                    for r in chosen
                    if r.instance.state is not InstanceState.FAILED
                ),
                "",
            )
            self.traffic.down(*slot, why or restarting)

    # building and switching

    async def spec(self, revision: Revision) -> RevisionSpec:
        source = self.sources(revision.url)
        await source.ensure(revision.sha)
        procfile = await source.read_file(revision.sha, PROCFILE)
        config = await source.read_file(revision.sha, CONFIG_FILE)
        manifest = parse_manifest(procfile, config)
        secrets = self.secrets((revision.namespace, revision.service))
        env = {**manifest.env, **revision.env, **secrets}
        return RevisionSpec(
            revision.namespace,
            revision.service,
            revision.ordinal,
            revision.url,
            revision.sha,
            manifest,
            env,
            frozenset(secrets),
        )

    async def build(self, revision: Revision) -> Build:
        """The build of ``revision``: held, found on disk, or made now."""
        held = self.builds.get(revision.id)
        if held is not None:
            return held
        build = await self.runtime.build(await self.spec(revision))
        self.builds[revision.id] = build
        return build

    async def build_retrying(self, revision: Revision) -> Build:
        """:meth:`build`, tried again with backoff while it fails for a temporary reason
        (the repo cannot be fetched); the revision stays building and says when."""
        return await retry(
            lambda: self.build(revision), lambda p: self._retrying(revision, p), sleep=self.sleep
        )

    def _retrying(self, revision: Revision, pending: Retry) -> None:
        note = pending.note("build")
        self.store.apply(serving.retrying(revision, note, first=pending.failures == 1))

    async def go_live(
        self,
        revision: Revision,
        weights: Mapping[int, int] | None = None,
        also: Change = NO_CHANGE,
        retry: bool = False,
    ) -> bool:
        """Start ``revision`` (if it is not running) and give it all traffic, or ``weights``
        (ordinal -> weight); what ``also`` changes is written with it (a pin). With
        ``retry``, its build is :meth:`build_retrying` (a restore whose repo cannot be
        fetched yet).

        Returns False, with the revision marked failed, if it cannot start; what
        served before keeps serving.
        """
        slot = (revision.namespace, revision.service)
        port = None
        if revision.id not in self.running:
            try:
                build = await (self.build_retrying if retry else self.build)(revision)
                self.store.set_state(revision.id, RevisionState.STARTING)
                instance = await self.runtime.start(build, self._on_change)
            except asyncio.CancelledError:
                self.cancelled(revision)
                raise
            except Exception as exc:
                self.failed(revision, exc)
                return False
            self.running[revision.id] = Running(revision, build, instance)
            port = instance.address[1]
        before = self.view(slot)
        switch = serving.switch(before, revision, weights, port)
        self.running[revision.id].revision = self.store.apply(switch.change + also)[0]
        ids = {r.ordinal: r.id for r in before.history}
        self.shares[slot] = {ids[ordinal]: w for ordinal, w in switch.weights.items()}
        self._route(slot)
        for ordinal in switch.retire:
            self.retire(ids[ordinal], switch.reason)
        await self._prune(self._view(slot, before.history))
        return True

    def failed(self, revision: Revision, exc: Exception) -> None:
        """End ``revision`` as failed because of ``exc``, whatever it is, so that no
        deploy stays building or starting. One outside our error tree (a bug, a
        full or read-only disk) is logged too."""
        reason = reason_of(exc)
        if not isinstance(exc, BranchyardError):
            log.error("%s:%s v%d failed: %s", *_key(revision), reason)
        self._end(revision, serving.failure(revision, reason))

    def cancelled(self, revision: Revision) -> None:
        """End a revision whose deploy was cancelled: superseded by a newer target, or
        interrupted by the daemon stopping (then the next daemon deploys it again)."""
        self._end(revision, serving.cancellation(revision, self.closing))

    def _end(self, revision: Revision, change: Change) -> None:
        self.store.apply(change)
        build = self.builds.pop(revision.id, None)
        if build is not None:
            self.runtime.release(build)

    async def stage(self, revision: Revision, build: Build, staging: Staging) -> None:
        self.builds[revision.id] = build
        self.store.apply(staging.change)
        await self.prune((revision.namespace, revision.service))

    def retire(
        self, revision_id: int, reason: str, state: RevisionState = RevisionState.STOPPED
    ) -> None:
        """Take a revision out of traffic, drain it, stop it, in the background.

        It is marked stopped only once its processes are gone, unless it was brought
        back meanwhile (a rollback to it as it drained). The task is kept,
        so a cancelled deploy never leaves a process half-stopped and
        :meth:`close` waits for it.
        """
        running = self.running.pop(revision_id, None)
        if running is None:
            return
        slot = (running.revision.namespace, running.revision.service)
        weights = self.shares.get(slot, {})
        if weights.pop(revision_id, None) is not None:
            self._route(slot)

        def stopped(_: asyncio.Task[None]) -> None:
            if revision_id not in self.running:  # not brought back while it drained
                self.store.set_state(revision_id, state, reason)

        self._stop_later(running.instance, f"retire v{running.revision.ordinal}").add_done_callback(
            stopped
        )

    def retire_slot(self, slot: Slot, reason: str) -> None:
        for rid in list(self.shares.pop(slot, {})):
            self.retire(rid, reason)
        self.traffic.remove(*slot)
        for rid in [rid for rid, b in self.builds.items() if _slot_of(b) == slot]:
            self.runtime.release(self.builds.pop(rid))

    def _on_change(self, instance: Instance) -> None:
        running = next((r for r in self.running.values() if r.instance is instance), None)
        if running is None:
            return
        slot = (running.revision.namespace, running.revision.service)
        self._route(slot)
        if instance.state is InstanceState.FAILED:
            lines = instance.last_output
            reason = f"exited with code {instance.exit_code} after {instance.restarts} restarts" + (
                f"; last output: {lines[-1]}" if lines else ""
            )
            self.store.event("crashed", f"v{running.revision.ordinal} {reason}", slot)
            self.retire(running.revision.id, reason, RevisionState.CRASHED)
            self._route(slot, f"v{running.revision.ordinal} crashed ({reason})")
        elif instance.state is InstanceState.STARTING:
            # Said as a restart begins, not at each exit: the last exit gives up instead.
            self.store.event(
                "restarting",
                f"v{running.revision.ordinal} exited with code {instance.exit_code}; restarting",
                slot,
            )

    async def failure_log(self, revision: Revision) -> FailureLog | None:
        """For a failed or crashed revision, the log that says why: its processes'
        output if it got as far as starting them, else its build log."""
        if revision.state not in (RevisionState.FAILED, RevisionState.CRASHED):
            return None
        key = _key(revision)
        log = LogName(*key)
        if not await self.runtime.has_log(log):
            log = LogName(*key, build=True)
        return FailureLog(log, logs_command(*key, log.build))

    # a person's choices

    def going_back(self, slot: Slot) -> tuple[Revision | None, Revision | None]:
        """(from, to) of a rollback with no revision named (see :func:`serving.going_back`)."""
        return serving.going_back(self.view(slot))

    async def pin_to(self, slot: Slot, ordinal: int | None, what: str) -> Revision:
        """Send all traffic to one revision and pin the slot there (rollback, promote)."""
        revision = serving.select(self.view(slot), ordinal)
        if not await self.go_live(revision, also=serving.pinning(revision, what)):
            raise BuildFailed(
                f"v{revision.ordinal} could not start: {self.store.revision(revision.id).reason}"
            )
        return revision

    async def restart(self, slot: Slot) -> Revision:
        """Start the live revision afresh and switch to the new processes, then drain
        and stop the old ones: a restart without a gap."""
        running = self.live(slot)
        if running is None:
            raise UsageError(f"{slot[1]} in {slot[0]} has no live revision to restart")
        fresh = await self.runtime.start(running.build, self._on_change)
        old, running.instance = running.instance, fresh
        self._route(slot)
        self.store.event("restart", f"v{running.revision.ordinal} restarted", slot)
        self._stop_later(old, f"restart {running.revision.ordinal}")
        return running.revision

    def _stop_later(self, instance: Instance, name: str) -> asyncio.Task[None]:
        async def drain_and_stop() -> None:
            await self.traffic.drain(instance.address, self.drain_grace)
            await instance.stop(self.stop_grace)

        task = asyncio.create_task(drain_and_stop(), name=name)
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)
        return task

    async def unpin(self, slot: Slot, head: str) -> Revision | None:
        """Drop the pin and send all traffic to the revision of the branch head (its
        target ``head`` key), if one was built: the one that goes live, else None (the
        head must be built, or already has all traffic)."""
        unpin = serving.unpinning(self.view(slot), head)
        self.store.apply(unpin.change)
        if unpin.to is None:
            return None
        return unpin.to if await self.go_live(unpin.to) else None

    async def split(self, slot: Slot, percents: Mapping[int, int]) -> None:
        """Split traffic between revisions by weight (a canary); pins the slot."""
        split = serving.split(self.view(slot), percents, self.traffic.cannot_split())
        for revision in split.revisions.values():
            if revision.id not in self.running and not await self._start(revision):
                raise BuildFailed(
                    f"v{revision.ordinal} could not start: "
                    f"{self.store.revision(revision.id).reason}"
                )
        await self.go_live(split.heaviest, split.weights, split.change)

    async def _start(self, revision: Revision) -> bool:
        try:
            build = await self.build(revision)
            instance = await self.runtime.start(build, self._on_change)
        except Exception as exc:
            self.failed(revision, exc)
            return False
        revision = self.store.set_state(revision.id, RevisionState.LIVE, port=instance.address[1])
        self.running[revision.id] = Running(revision, build, instance)
        return True

    # retention

    async def prune(self, slot: Slot) -> int:
        """Keep the builds of what runs, what is staged, and the last few; bytes freed."""
        return await self._prune(self.view(slot))

    async def _prune(self, view: SlotView) -> int:
        keep = serving.keep(view)
        for revision in view.history:
            if revision.ordinal not in keep and revision.id in self.builds:
                self.runtime.release(self.builds.pop(revision.id))
        return await self.runtime.prune(*view.slot, set(keep))

    async def close(self) -> None:
        for slot in list(self.shares):
            for rid in list(self.shares[slot]):
                self.retire(rid, DAEMON_STOPPED)
        for rid in list(self.running):
            self.retire(rid, DAEMON_STOPPED)
        await asyncio.gather(*self._retiring, return_exceptions=True)


def _key(revision: Revision) -> tuple[str, str, int]:
    return (revision.namespace, revision.service, revision.ordinal)


def _slot_of(build: Build) -> Slot:
    return (build.spec.namespace, build.spec.service)
