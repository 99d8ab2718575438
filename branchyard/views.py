"""The read side: what the API and the dashboard read, from the parts that know it.

``daemon`` builds one :class:`Views` over the parts a page or an answer reads: the
store (repos, revisions, pins, events), the rollouts (what runs, its weights), the
runtime (logs, URLs), the watcher (why a repo cannot be read), the settings repo
(its history), the engine (what it plans: targets, branch heads, a person's
settings), and a :data:`~branchyard.runtime.Review` of the Kubernetes objects of a
revision (``k8s render``: ``daemon`` renders them with its Kubernetes options, which
it has also while the local runtime runs), and the daemon's webhook secret (what a
repo without its own signs its webhooks with). The API and the dashboard read through it
alone, and ask the engine only to act. :mod:`branchyard.readmodel` works out what a
slot's snapshot means.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from branchyard import readmodel, shapes
from branchyard.engine import Engine
from branchyard.errors import NotFound
from branchyard.model import Overlay, Repo, Revision, Target
from branchyard.naming import BASELINE, env_var_for
from branchyard.planner import Slot
from branchyard.readmodel import Head, Snapshot, Status
from branchyard.rollout import FailureLog, Rollouts
from branchyard.runtime import InstanceState, LogName, Pause, Review, Reviewed, Runtime
from branchyard.settings import Change, Settings
from branchyard.store import Store
from branchyard.text import redacted_url
from branchyard.watcher import Watching


class Views:
    """Every read of the API and the dashboard, each answered from the part that knows it."""

    def __init__(
        self,
        engine: Engine,
        store: Store,
        runtime: Runtime,
        rollouts: Rollouts,
        watcher: Watching,
        settings: Settings,
        review: Review,
        webhook_secret: str,
    ) -> None:
        self._engine = engine
        self._store = store
        self._runtime = runtime
        self._rollouts = rollouts
        self._watcher = watcher
        self._settings = settings
        self._review = review
        self._webhook_secret = webhook_secret

    # what is planned

    def target(self, namespace: str, service: str) -> Target:
        """What ``service`` in ``namespace`` follows; NotFound (naming what there is) if
        the engine plans no such service."""
        return self._engine.target(namespace, service)

    def slots(self, namespace: str | None = None) -> list[Slot]:
        """Every planned slot, the baseline's first; only ``namespace``'s if it is given
        (NotFound if it has none)."""
        slots = sorted(self._engine.targets, key=lambda slot: (slot[0] != BASELINE, slot))
        if namespace is None:
            return slots
        mine = [slot for slot in slots if slot[0] == namespace]
        if not mine:
            self.target(namespace, "")
        return mine

    def namespaces(self) -> list[shapes.Namespace]:
        """Each namespace with its branch and services, the baseline first."""
        found: dict[str, shapes.Namespace] = {}
        for namespace, service in self.slots():
            branch = self._engine.targets[namespace, service].branch
            entry = found.setdefault(
                namespace, {"namespace": namespace, "branch": branch, "services": []}
            )
            entry["services"].append(service)
        return list(found.values())

    # repos

    def repos(self) -> list[Repo]:
        """The registered repos, by name."""
        return self._store.repos()

    def repo_rows(self) -> list[shapes.RepoRow]:
        """``repo ls``: each repo with its branch count and why it cannot be read now."""
        heads = self._engine.heads
        return [
            {
                "name": r.name,
                "url": redacted_url(r.url),
                "default_branch": r.default_branch,
                "branches": len(heads[r.name].branches) if r.name in heads else 0,
                "error": self._watcher.errors.get(r.name, ""),
            }
            for r in self._store.repos()
        ]

    def webhook_secret(self, repo: Repo) -> str:
        """What a repo's webhooks are signed with: its own secret, else the daemon's."""
        return repo.webhook_secret or self._webhook_secret

    # one slot

    def snapshot(self, slot: Slot) -> Snapshot:
        """What the read model works the slot's state out from."""
        latest = next(iter(self._store.revisions(slot, limit=1)), None)
        running = self._rollouts.live(slot)
        head = self._engine.behind(slot)
        return Snapshot(
            latest=latest,
            live=self._store.revision(running.revision.id) if running else None,
            restarting=running is not None and running.instance.state is not InstanceState.RUNNING,
            exit_code=running.instance.exit_code if running else None,
            restarts=running.instance.restarts if running else 0,
            weights=self._rollouts.weights(slot),
            pinned=self._store.pin(slot),
            behind=Head(head.branch, head.sha) if head else None,
        )

    def status(self, slot: Slot) -> Status:
        """The slot's state, by the read model's one rule."""
        return readmodel.status(self.snapshot(slot))

    async def row(self, slot: Slot) -> shapes.ServiceRow:
        """A line of ``ps``, with the end of the log that says why the newest revision
        failed: its build's output if it failed to build, else its processes'."""
        seen = self.snapshot(slot)
        latest = seen.latest
        failure = await self.failure(latest) if latest else None
        last_lines = await self._runtime.last_lines(failure.log) if failure else []
        command = failure.command if failure else ""
        return readmodel.service_row(*slot, seen, self.public_url(slot), last_lines, command)

    async def rows(self, namespace: str | None = None) -> list[shapes.ServiceRow]:
        """``ps``: a row per slot (of ``namespace`` if given), the baseline's first."""
        return [await self.row(slot) for slot in self.slots(namespace)]

    def revisions(self, slot: Slot) -> list[Revision]:
        """The slot's revisions, newest first."""
        return self._store.revisions(slot)

    def weights(self, slot: Slot) -> dict[int, int]:
        """ordinal -> weight of the revisions that take traffic."""
        return self._rollouts.weights(slot)

    def rollback_to(self, slot: Slot) -> Revision | None:
        """The revision a rollback with none named would go back to."""
        return self._rollouts.going_back(slot)[1]

    async def failure(self, revision: Revision) -> FailureLog | None:
        """For a failed or crashed revision, the log that says why and its command."""
        return await self._rollouts.failure_log(revision)

    def settings(self, namespace: str, service: str) -> Overlay:
        """What a person set for the service, with its version."""
        return self._engine.settings_of(namespace, service)

    def secrets(self, namespace: str, service: str) -> dict[str, str]:
        """The service's secrets: name -> value."""
        return self._engine.secrets_of(namespace, service)

    async def history(self, slot: Slot) -> list[Change]:
        """The commits that changed the slot's settings, newest first."""
        return await self._settings.history(slot)

    async def kubernetes(self, slot: Slot) -> Reviewed:
        """The Kubernetes objects the slot's newest revision would be applied as (YAML,
        secrets redacted), its peer URLs as the Kubernetes runtime gives them, and what
        in them no pod reaches; NotFound before its first revision."""
        namespace, service = slot
        target = self.target(namespace, service)
        latest = next(iter(self._store.revisions(slot, limit=1)), None)
        if latest is None:
            raise NotFound(f"{service} in {namespace} has no revision yet")
        given = {env_var_for(peer): peer for peer in target.peers}
        peers = {key: peer for key, peer in given.items() if key not in target.settings.env}
        return await self._review(await self._rollouts.spec(latest), peers)

    # logs

    def log_of(self, slot: Slot, build: bool, ordinal: int | None) -> LogName:
        """The log ``logs`` reads: revision ``ordinal``'s if given, else the live
        revision's (the newest's if none is live, or for its ``build`` log)."""
        namespace, service = slot
        history = self._store.revisions(slot)
        if ordinal is not None:
            chosen = next((r for r in history if r.ordinal == ordinal), None)
            if chosen is None:
                raise NotFound(f"{service} in {namespace} has no revision v{ordinal}")
        else:
            running = self._rollouts.live(slot)
            chosen = running.revision if running and not build else next(iter(history), None)
        if chosen is None:
            raise NotFound(f"{service} in {namespace} has no revision yet")
        return LogName(namespace, service, chosen.ordinal, build)

    async def readable(self, log: LogName) -> None:
        """Raise NotFound if ``log`` can no longer be read (a pod scaled away), saying why."""
        why = await self._runtime.missing_log(log)
        if why is not None:
            raise NotFound(why)

    def read_log(
        self, log: LogName, lines: int | None = None, pause: Pause | None = None
    ) -> AsyncIterator[bytes]:
        """``log`` as it is now (its last ``lines``); with ``pause``, followed."""
        return self._runtime.read_log(log, lines, pause)

    async def tail_log(self, log: LogName, size: int) -> bytes:
        """The last ``size`` bytes of ``log``."""
        return await self._runtime.tail_log(log, size)

    # addresses and events

    def public_url(self, slot: Slot) -> str:
        """Where people reach the slot's live revision."""
        return self._runtime.public_url(*slot)

    def home_url(self) -> str:
        """The daemon's own pages, as the router serves them."""
        return self._runtime.home_url()

    def events(
        self, after: int = 0, namespace: str | None = None, limit: int = 200
    ) -> list[shapes.Event]:
        """Events after id ``after`` (only ``namespace``'s, if given), oldest first: the
        last ``limit`` of them."""
        return self._store.events(after, namespace, limit)
