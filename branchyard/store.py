"""The store: branchyard's state in one SQLite file under the home.

Repos, the namespace each branch was given, stable peer ports, services a
person removed, every revision ever attempted, and an event log. One
connection, used from the daemon's event loop only; every write commits at
once, so a crash loses nothing that was acknowledged. Who wants to hear of
revision changes (the forge status reports) is connected by ``daemon`` through
:meth:`Store.listen`.

The event log keeps the latest :data:`KEEP_EVENTS` events; each event's text is
made printable and cut to :data:`EVENT_LIMIT` characters, since it may carry
what a webhook or a git server sent.

A file that is not an SQLite database, or not one of ours, is refused with a
:class:`~branchyard.errors.UsageError` that names it.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

from branchyard.errors import Conflict, NotFound, UsageError
from branchyard.model import Repo, Revision, RevisionState
from branchyard.serving import Change, NewEvent, NewRevision, PinChange, Slot, StateChange
from branchyard.shapes import Event
from branchyard.text import redacted_url, shown

SCHEMA = """
CREATE TABLE IF NOT EXISTS repos (
    name TEXT PRIMARY KEY, url TEXT NOT NULL UNIQUE, default_branch TEXT, added_at REAL NOT NULL,
    webhook_secret TEXT NOT NULL DEFAULT ''
);
CREATE TABLE IF NOT EXISTS namespaces (branch TEXT PRIMARY KEY, namespace TEXT NOT NULL UNIQUE);
CREATE TABLE IF NOT EXISTS removed (
    namespace TEXT NOT NULL, service TEXT NOT NULL, sha TEXT NOT NULL,
    PRIMARY KEY (namespace, service)
);
CREATE TABLE IF NOT EXISTS addresses (
    namespace TEXT NOT NULL, service TEXT NOT NULL, port INTEGER NOT NULL,
    PRIMARY KEY (namespace, service)
);
CREATE TABLE IF NOT EXISTS revisions (
    id INTEGER PRIMARY KEY, namespace TEXT NOT NULL, service TEXT NOT NULL,
    ordinal INTEGER NOT NULL, repo TEXT NOT NULL, url TEXT NOT NULL, branch TEXT NOT NULL,
    sha TEXT NOT NULL, subject TEXT NOT NULL DEFAULT '', key TEXT NOT NULL,
    settings_version TEXT NOT NULL, env TEXT NOT NULL DEFAULT '{}', state TEXT NOT NULL,
    reason TEXT NOT NULL DEFAULT '', port INTEGER, created_at REAL NOT NULL,
    changed_at REAL NOT NULL, UNIQUE (namespace, service, ordinal)
);
CREATE TABLE IF NOT EXISTS pins (
    namespace TEXT NOT NULL, service TEXT NOT NULL, ordinal INTEGER NOT NULL,
    PRIMARY KEY (namespace, service)
);
CREATE TABLE IF NOT EXISTS processes (
    pgid INTEGER PRIMARY KEY, started TEXT NOT NULL, what TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY, at REAL NOT NULL, kind TEXT NOT NULL,
    namespace TEXT, service TEXT, message TEXT NOT NULL
);
"""

SCHEMA_VERSION = 2
KEEP_EVENTS = 10_000
EVENT_LIMIT = 2048  # characters of one event's message
_REVISION_COLUMNS = (
    "id, namespace, service, ordinal, repo, url, branch, sha, subject, key, settings_version, "
    "env, state, reason, port, created_at, changed_at"
)


def _revision(row: sqlite3.Row) -> Revision:
    values = dict(row)
    values["state"] = RevisionState(values["state"])
    values["env"] = json.loads(values["env"])
    return Revision(**values)


class Store:
    def __init__(
        self,
        path: Path,
        clock: Callable[[], float] = time.time,
        keep_events: int = KEEP_EVENTS,
    ) -> None:
        try:
            self._db = sqlite3.connect(path, isolation_level=None)
        except sqlite3.Error as exc:
            raise UsageError(f"cannot open the store {path}: {exc}") from None
        self._db.row_factory = sqlite3.Row
        try:
            self._prepare(path)
        except BaseException as exc:
            self._db.close()
            if isinstance(exc, sqlite3.OperationalError):
                raise UsageError(f"cannot open the store {path}: {exc}") from None
            if isinstance(exc, sqlite3.DatabaseError):
                raise UsageError(
                    f"{path} is not a usable store ({exc}): move it away or restore a copy"
                ) from None
            raise
        self._clock = clock
        self._keep_events = keep_events
        self._listeners: list[Callable[[Revision], None]] = []

    def listen(self, listener: Callable[[Revision], None]) -> None:
        """Tell ``listener`` of every new revision and every change of a revision's state."""
        self._listeners.append(listener)

    def _told(self, revision: Revision) -> Revision:
        for listener in self._listeners:
            listener(revision)
        return revision

    def _prepare(self, path: Path) -> None:
        (check,) = self._db.execute("PRAGMA quick_check(1)").fetchone()
        if check != "ok":
            raise sqlite3.DatabaseError(check)
        self._db.execute("PRAGMA journal_mode=WAL")
        # No fsync per commit (each took up to a few ms, on the loop the router shares):
        # a crash of the daemon loses nothing, a power cut at most the last writes.
        self._db.execute("PRAGMA synchronous=NORMAL")
        (version,) = self._db.execute("PRAGMA user_version").fetchone()
        if version not in (0, SCHEMA_VERSION) or (
            version == 0 and self._db.execute("SELECT name FROM sqlite_master").fetchone()
        ):
            raise UsageError(f"{path} was written by another version of branchyard; move it away")
        self._db.executescript(SCHEMA)
        self._db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    def close(self) -> None:
        self._db.close()

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[None]:
        """All or nothing (the connection autocommits otherwise)."""
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    # repos

    def add_repo(self, repo: Repo) -> None:
        for row in self._db.execute(
            "SELECT name, url FROM repos WHERE name = ? OR url = ?", (repo.name, repo.url)
        ):
            what = f"name {repo.name!r}" if row["name"] == repo.name else redacted_url(repo.url)
            raise Conflict(f"repo {row['name']} is already registered with {what}")
        self._db.execute(
            "INSERT INTO repos VALUES (?, ?, ?, ?, ?)",
            (repo.name, repo.url, repo.default_branch, self._clock(), repo.webhook_secret),
        )

    def update_repo(self, repo: Repo) -> None:
        """Store ``repo``'s default branch and webhook secret (matched by name)."""
        changed = self._db.execute(
            "UPDATE repos SET default_branch = ?, webhook_secret = ? WHERE name = ?",
            (repo.default_branch, repo.webhook_secret, repo.name),
        ).rowcount
        if changed == 0:
            raise NotFound(f"no repo named {repo.name!r} (see: branchyard repo ls)")

    def remove_repo(self, name: str) -> None:
        if self._db.execute("DELETE FROM repos WHERE name = ?", (name,)).rowcount == 0:
            raise NotFound(f"no repo named {name!r} (see: branchyard repo ls)")

    def repos(self) -> list[Repo]:
        rows = self._db.execute(
            "SELECT name, url, default_branch, webhook_secret FROM repos ORDER BY name"
        )
        return [Repo(r["name"], r["url"], r["default_branch"], r["webhook_secret"]) for r in rows]

    # namespaces handed out to branches

    def namespaces(self) -> dict[str, str]:
        return dict(self._db.execute("SELECT branch, namespace FROM namespaces").fetchall())

    def set_namespaces(self, assigned: Mapping[str, str]) -> None:
        with self._transaction():
            self._db.execute("DELETE FROM namespaces")
            self._db.executemany("INSERT INTO namespaces VALUES (?, ?)", assigned.items())

    # services removed by hand until their next push

    def removed(self) -> dict[Slot, str]:
        rows = self._db.execute("SELECT namespace, service, sha FROM removed")
        return {(r["namespace"], r["service"]): r["sha"] for r in rows}

    def set_removed(self, slot: Slot, sha: str) -> None:
        self._db.execute("INSERT OR REPLACE INTO removed VALUES (?, ?, ?)", (*slot, sha))

    def forget_removed(self, keep: Mapping[Slot, str]) -> None:
        """Drop every removal mark that no longer matches a head (the service was pushed)."""
        for slot, sha in self.removed().items():
            if keep.get(slot) != sha:
                self._db.execute("DELETE FROM removed WHERE namespace = ? AND service = ?", slot)

    # stable peer ports

    def address(self, slot: Slot) -> int | None:
        row = self._db.execute(
            "SELECT port FROM addresses WHERE namespace = ? AND service = ?", slot
        ).fetchone()
        return int(row["port"]) if row else None

    def addresses(self) -> list[tuple[str, str, int]]:
        rows = self._db.execute("SELECT namespace, service, port FROM addresses")
        return [(r["namespace"], r["service"], r["port"]) for r in rows]

    def set_address(self, slot: Slot, port: int) -> None:
        self._db.execute("INSERT OR REPLACE INTO addresses VALUES (?, ?, ?)", (*slot, port))

    # revisions

    def apply(self, change: Change) -> list[Revision]:
        """Write a decided ``change`` in one transaction: all its rows, or none (a revision
        that is not there is :class:`~branchyard.errors.NotFound`, an ordinal taken is
        :class:`~branchyard.errors.Conflict`). The revisions it made or changed, as they
        are now, each told to the listeners."""
        now = self._clock()
        changed: list[int] = []
        with self._transaction():
            if change.new is not None:
                changed.append(self._insert_revision(change.new, now))
            for state in change.states:
                self._set_state(state, now)
                changed.append(state.revision_id)
            if change.pin is not None:
                self._set_pin(change.pin)
            for event in change.events:
                self._event(event, now)
        return [self._told(self.revision(revision_id)) for revision_id in changed]

    def _insert_revision(self, new: NewRevision, now: float) -> int:
        target = new.target
        try:
            cursor = self._db.execute(
                "INSERT INTO revisions (namespace, service, ordinal, repo, url, branch, sha, "
                "subject, key, settings_version, state, created_at, changed_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    target.namespace,
                    target.service,
                    new.ordinal,
                    target.repo,
                    target.url,
                    target.branch,
                    target.sha,
                    new.subject,
                    target.key,
                    target.settings.version,
                    new.state.value,
                    now,
                    now,
                ),
            )
        except sqlite3.IntegrityError:
            raise Conflict(
                f"{target.service} in {target.namespace} has a v{new.ordinal} already"
            ) from None
        return int(cursor.lastrowid or 0)

    def _set_state(self, change: StateChange, now: float) -> None:
        updated = self._db.execute(
            "UPDATE revisions SET state = ?, reason = ?, port = COALESCE(?, port), "
            "changed_at = ? WHERE id = ?",
            (change.state.value, change.reason, change.port, now, change.revision_id),
        ).rowcount
        if updated == 0:
            raise NotFound(f"no revision {change.revision_id}")

    def revision(self, revision_id: int) -> Revision:
        row = self._db.execute(
            f"SELECT {_REVISION_COLUMNS} FROM revisions WHERE id = ?", (revision_id,)
        ).fetchone()
        if row is None:
            raise NotFound(f"no revision {revision_id}")
        return _revision(row)

    def set_state(
        self, revision_id: int, state: RevisionState, reason: str = "", port: int | None = None
    ) -> Revision:
        (revision,) = self.apply(Change(states=(StateChange(revision_id, state, reason, port),)))
        return revision

    def set_env(self, revision_id: int, env: Mapping[str, str]) -> None:
        """Record the env a revision runs with, so a rollback runs it the same way."""
        self._db.execute(
            "UPDATE revisions SET env = ? WHERE id = ?", (json.dumps(dict(env)), revision_id)
        )

    def revisions(self, slot: Slot, limit: int = -1) -> list[Revision]:
        """The slot's revisions, newest first; at most ``limit`` of them if it is not -1."""
        rows = self._db.execute(
            f"SELECT {_REVISION_COLUMNS} FROM revisions WHERE namespace = ? AND service = ? "
            "ORDER BY ordinal DESC LIMIT ?",
            (*slot, limit),
        )
        return [_revision(r) for r in rows]

    def latest_revisions(self) -> list[Revision]:
        """The newest revision of every slot that ever had one."""
        rows = self._db.execute(
            f"SELECT {_REVISION_COLUMNS} FROM revisions AS r WHERE ordinal = "
            "(SELECT MAX(ordinal) FROM revisions WHERE namespace = r.namespace "
            "AND service = r.service)"
        )
        return [_revision(r) for r in rows]

    def stopped(self, reason: str) -> list[Revision]:
        """The stopped revisions whose reason is ``reason``."""
        rows = self._db.execute(
            f"SELECT {_REVISION_COLUMNS} FROM revisions WHERE state = ? AND reason = ?",
            (RevisionState.STOPPED.value, reason),
        )
        return [_revision(r) for r in rows]

    def active_revisions(self) -> list[Revision]:
        states = tuple(s.value for s in RevisionState if s.active)
        rows = self._db.execute(
            f"SELECT {_REVISION_COLUMNS} FROM revisions WHERE state IN (?, ?, ?)", states
        )
        return [_revision(r) for r in rows]

    # pins: a slot whose traffic a person fixed (rollback, promote, weight)

    def pin(self, slot: Slot) -> int | None:
        row = self._db.execute(
            "SELECT ordinal FROM pins WHERE namespace = ? AND service = ?", slot
        ).fetchone()
        return int(row["ordinal"]) if row else None

    def pins(self) -> dict[Slot, int]:
        rows = self._db.execute("SELECT namespace, service, ordinal FROM pins")
        return {(r["namespace"], r["service"]): r["ordinal"] for r in rows}

    def set_pin(self, slot: Slot, ordinal: int | None) -> None:
        self._set_pin(PinChange(slot, ordinal))

    def _set_pin(self, pin: PinChange) -> None:
        if pin.ordinal is None:
            self._db.execute("DELETE FROM pins WHERE namespace = ? AND service = ?", pin.slot)
        else:
            self._db.execute(
                "INSERT OR REPLACE INTO pins VALUES (?, ?, ?)", (*pin.slot, pin.ordinal)
            )

    # process groups started, so that a daemon killed with -9 is cleaned up after

    def add_process(self, pgid: int, started: str, what: str) -> None:
        self._db.execute("INSERT OR REPLACE INTO processes VALUES (?, ?, ?)", (pgid, started, what))

    def remove_process(self, pgid: int) -> None:
        self._db.execute("DELETE FROM processes WHERE pgid = ?", (pgid,))

    def processes(self) -> list[tuple[int, str, str]]:
        rows = self._db.execute("SELECT pgid, started, what FROM processes")
        return [(r["pgid"], r["started"], r["what"]) for r in rows]

    # events

    def event(self, kind: str, message: str, slot: Slot | None = None) -> None:
        """Record an event, and forget those beyond the latest ``keep_events``."""
        self._event(NewEvent(kind, message, slot), self._clock())

    def _event(self, event: NewEvent, now: float) -> None:
        namespace, service = event.slot or (None, None)
        cursor = self._db.execute(
            "INSERT INTO events (at, kind, namespace, service, message) VALUES (?, ?, ?, ?, ?)",
            (now, event.kind, namespace, service, shown(event.message, EVENT_LIMIT)),
        )
        self._db.execute(
            "DELETE FROM events WHERE id <= ?", ((cursor.lastrowid or 0) - self._keep_events,)
        )

    def events(self, after: int = 0, namespace: str | None = None, limit: int = 200) -> list[Event]:
        """Events with an id above ``after``, oldest first (the last ``limit`` if many)."""
        where, args = "id > ?", list[object]([after])
        if namespace is not None:
            where += " AND namespace = ?"
            args.append(namespace)
        rows = self._db.execute(
            f"SELECT * FROM (SELECT id, at, kind, namespace, service, message FROM events "
            f"WHERE {where} ORDER BY id DESC LIMIT ?) ORDER BY id",
            (*args, limit),
        )
        return [
            {
                "id": r["id"],
                "at": r["at"],
                "kind": r["kind"],
                "namespace": r["namespace"],
                "service": r["service"],
                "message": r["message"],
            }
            for r in rows
        ]
