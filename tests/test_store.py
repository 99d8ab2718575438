"""Unit tests for the SQLite store, on a file in a temp directory and a fake clock."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from branchyard.errors import Conflict, NotFound, UsageError
from branchyard.model import Overlay, Repo, Revision, RevisionState, Target
from branchyard.serving import Change, NewRevision, deployment
from branchyard.store import Store

SHA = "1111111" + "a" * 33
APP = Repo("app", "/srv/git/app.git")


class FakeClock:
    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "state.sqlite"


@pytest.fixture
def store(path: Path, clock: FakeClock) -> Iterator[Store]:
    opened = Store(path, clock=clock)
    yield opened
    opened.close()


def target(
    namespace: str = "main",
    service: str = "app",
    sha: str = SHA,
    version: str = "",
    peers: tuple[str, ...] = (),
) -> Target:
    return Target(
        namespace=namespace,
        service=service,
        repo=service,
        url=f"/srv/git/{service}.git",
        branch="main" if namespace == "main" else namespace,
        sha=sha,
        settings=Overlay(version),
        peers=peers,
    )


def new_revision(
    store: Store, wanted: Target, state: RevisionState = RevisionState.BUILDING
) -> Revision:
    """A new revision of ``wanted`` in ``state``, numbered after the newest of its slot."""
    newest = store.revisions((wanted.namespace, wanted.service), limit=1)
    ordinal = newest[0].ordinal + 1 if newest else 1
    (made,) = store.apply(Change(new=NewRevision(wanted, ordinal, "", state)))
    return made


# -- repos ------------------------------------------------------------------------------


def test_repos_come_back_sorted_by_name_with_their_default_branch(store: Store) -> None:
    store.add_repo(Repo("web", "https://host/team/web.git", "develop"))
    store.add_repo(APP)
    assert store.repos() == [APP, Repo("web", "https://host/team/web.git", "develop")]


@pytest.mark.parametrize(
    ("second", "message"),
    [
        pytest.param(
            Repo("app", "/elsewhere/app.git"),
            "repo app is already registered with name 'app'",
            id="same-name",
        ),
        pytest.param(
            Repo("other", "/srv/git/app.git"),
            "repo app is already registered with /srv/git/app.git",
            id="same-url",
        ),
        pytest.param(APP, "repo app is already registered with name 'app'", id="same-both"),
    ],
)
def test_adding_a_repo_twice_is_a_conflict(store: Store, second: Repo, message: str) -> None:
    store.add_repo(APP)
    with pytest.raises(Conflict) as caught:
        store.add_repo(second)
    assert caught.value.message == message
    assert caught.value.status == 409
    assert store.repos() == [APP]


def test_removing_an_unknown_repo_is_not_found(store: Store) -> None:
    store.add_repo(APP)
    with pytest.raises(NotFound) as caught:
        store.remove_repo("ghost")
    assert caught.value.message == "no repo named 'ghost' (see: branchyard repo ls)"
    assert store.repos() == [APP]


def test_a_removed_repo_can_be_added_again(store: Store) -> None:
    store.add_repo(APP)
    store.remove_repo("app")
    assert store.repos() == []
    store.add_repo(APP)
    assert store.repos() == [APP]


# -- revisions ------------------------------------------------------------------------


def test_a_new_revision_records_its_target(store: Store, clock: FakeClock) -> None:
    wanted = target("bugfix", "app", version="abc1234", peers=("db", "web"))
    revision = new_revision(store, wanted, RevisionState.BUILDING)
    assert (revision.namespace, revision.service, revision.ordinal) == ("bugfix", "app", 1)
    assert (revision.repo, revision.branch, revision.sha) == ("app", "bugfix", SHA)
    assert revision.key == wanted.key == f"{SHA}:abc1234:db,web"
    assert revision.settings_version == "abc1234"
    assert revision.state is RevisionState.BUILDING
    assert (revision.reason, revision.port) == ("", None)
    assert revision.created_at == revision.changed_at == clock.now
    assert revision.sha7 == "1111111"
    assert store.revision(revision.id) == revision


def test_deploys_number_their_revisions_up_per_slot(store: Store) -> None:
    slots = [("main", "app"), ("main", "app"), ("main", "web"), ("bugfix", "app")]
    slots += [("main", "app"), ("bugfix", "app")]
    ordinals = []
    for namespace, service in slots:
        latest = next(iter(store.revisions((namespace, service), limit=1)), None)
        change = deployment(latest, target(namespace, service), "", "new commit")
        ordinals += [r.ordinal for r in store.apply(change)]
    assert ordinals == [1, 2, 1, 1, 3, 2]
    assert [r.ordinal for r in store.revisions(("main", "app"))] == [3, 2, 1]
    assert store.revisions(("nowhere", "app")) == []


def test_set_state_updates_state_reason_port_and_time(store: Store, clock: FakeClock) -> None:
    created = new_revision(store, target(), RevisionState.BUILDING)
    clock.advance(5)
    starting = store.set_state(created.id, RevisionState.STARTING, port=8123)
    assert (starting.state, starting.reason, starting.port) == (RevisionState.STARTING, "", 8123)
    assert (starting.created_at, starting.changed_at) == (1000.0, 1005.0)
    clock.advance(5)
    failed = store.set_state(created.id, RevisionState.FAILED, "health check timed out")
    assert (failed.state, failed.reason) == (RevisionState.FAILED, "health check timed out")
    assert failed.port == 8123, "a state change without a port keeps the port"
    assert failed.changed_at == 1010.0
    assert store.revision(created.id) == failed


def test_every_listener_hears_of_each_new_revision_and_state_change_in_order(
    store: Store,
) -> None:
    heard: list[tuple[str, int, RevisionState]] = []

    def listener(name: str) -> Callable[[Revision], None]:
        return lambda revision: heard.append((name, revision.ordinal, revision.state))

    store.listen(listener("first"))
    store.listen(listener("second"))
    made = new_revision(store, target(), RevisionState.BUILDING)
    store.set_state(made.id, RevisionState.LIVE)
    store.event("live", "not a revision change")
    assert heard == [
        ("first", 1, RevisionState.BUILDING),
        ("second", 1, RevisionState.BUILDING),
        ("first", 1, RevisionState.LIVE),
        ("second", 1, RevisionState.LIVE),
    ]


def test_the_latest_revisions_are_the_newest_of_each_slot(store: Store) -> None:
    slots = [("main", "app"), ("main", "app"), ("main", "web"), ("bugfix", "app")]
    made = [new_revision(store, target(*slot), RevisionState.BUILDING) for slot in slots]
    store.set_state(made[1].id, RevisionState.FAILED, "build step `make` exited 2")
    latest = {(r.namespace, r.service): (r.ordinal, r.state) for r in store.latest_revisions()}
    assert latest == {
        ("main", "app"): (2, RevisionState.FAILED),
        ("main", "web"): (1, RevisionState.BUILDING),
        ("bugfix", "app"): (1, RevisionState.BUILDING),
    }


def test_an_unknown_revision_is_not_found(store: Store) -> None:
    with pytest.raises(NotFound, match="no revision 42"):
        store.revision(42)


def test_active_revisions_are_the_building_starting_and_live_ones(store: Store) -> None:
    by_state = {}
    for number, state in enumerate(RevisionState):
        revision = new_revision(store, target(service=f"svc{number}"), RevisionState.BUILDING)
        by_state[state] = store.set_state(revision.id, state).id
    active = {r.id for r in store.active_revisions()}
    assert active == {
        by_state[RevisionState.BUILDING],
        by_state[RevisionState.STARTING],
        by_state[RevisionState.LIVE],
    }
    assert {s for s in RevisionState if s.active} == {
        RevisionState.BUILDING,
        RevisionState.STARTING,
        RevisionState.LIVE,
    }


# -- namespaces -----------------------------------------------------------------------


def test_set_namespaces_replaces_the_whole_assignment(store: Store) -> None:
    assert store.namespaces() == {}
    store.set_namespaces({"feature/x": "feature-x", "bugfix": "bugfix"})
    assert store.namespaces() == {"feature/x": "feature-x", "bugfix": "bugfix"}
    store.set_namespaces({"bugfix": "bugfix", "hotfix": "hotfix"})
    assert store.namespaces() == {"bugfix": "bugfix", "hotfix": "hotfix"}
    store.set_namespaces({})
    assert store.namespaces() == {}


def test_a_failed_set_namespaces_keeps_the_previous_assignment(store: Store) -> None:
    before = {"feature/x": "feature-x", "bugfix": "bugfix"}
    store.set_namespaces(before)
    with pytest.raises(sqlite3.IntegrityError):
        store.set_namespaces({"a/b": "a-b", "a_b": "a-b"})
    assert store.namespaces() == before


# -- removed by hand --------------------------------------------------------------------


def test_removal_marks_are_kept_until_the_head_moves(store: Store) -> None:
    store.set_removed(("bugfix", "app"), "sha-1")
    store.set_removed(("bugfix", "web"), "sha-2")
    store.set_removed(("main", "db"), "sha-3")
    assert store.removed() == {
        ("bugfix", "app"): "sha-1",
        ("bugfix", "web"): "sha-2",
        ("main", "db"): "sha-3",
    }
    store.forget_removed({("bugfix", "app"): "sha-1", ("bugfix", "web"): "sha-9"})
    assert store.removed() == {("bugfix", "app"): "sha-1"}


def test_removing_again_replaces_the_mark(store: Store) -> None:
    store.set_removed(("bugfix", "app"), "sha-1")
    store.set_removed(("bugfix", "app"), "sha-2")
    assert store.removed() == {("bugfix", "app"): "sha-2"}
    store.forget_removed({})
    assert store.removed() == {}


# -- addresses and reopening ------------------------------------------------------------


def test_an_address_is_stable_and_replaceable(store: Store) -> None:
    assert store.address(("main", "app")) is None
    store.set_address(("main", "app"), 41001)
    store.set_address(("bugfix", "app"), 41002)
    store.set_address(("main", "app"), 41003)
    assert store.address(("main", "app")) == 41003
    assert store.address(("bugfix", "app")) == 41002


def test_state_survives_closing_and_reopening_the_store(path: Path, clock: FakeClock) -> None:
    first = Store(path, clock=clock)
    first.add_repo(APP)
    first.set_namespaces({"bugfix": "bugfix"})
    first.set_removed(("bugfix", "app"), SHA)
    first.set_address(("main", "app"), 41001)
    revision = new_revision(first, target(), RevisionState.BUILDING)
    first.set_state(revision.id, RevisionState.LIVE, port=9000)
    first.event("live", "v1 1111111 is live", ("main", "app"))
    first.close()

    second = Store(path, clock=clock)
    try:
        assert second.repos() == [APP]
        assert second.namespaces() == {"bugfix": "bugfix"}
        assert second.removed() == {("bugfix", "app"): SHA}
        assert second.address(("main", "app")) == 41001
        assert [r.id for r in second.active_revisions()] == [revision.id]
        assert second.revision(revision.id).port == 9000
        assert new_revision(second, target(), RevisionState.BUILDING).ordinal == 2
    finally:
        second.close()


# -- events -----------------------------------------------------------------------------


def test_only_the_latest_events_are_kept(path: Path, clock: FakeClock) -> None:
    store = Store(path, clock=clock, keep_events=3)
    try:
        for number in range(1, 8):
            store.event("push", f"event {number}")
        messages = [e["message"] for e in store.events()]
        assert messages == ["event 5", "event 6", "event 7"]
        assert [e["message"] for e in store.events(after=6)] == ["event 7"]
    finally:
        store.close()


def test_the_store_keeps_the_latest_10000_events_by_default(path: Path, clock: FakeClock) -> None:
    store = Store(path, clock=clock)
    try:
        for number in range(1, 10_006):
            store.event("push", f"event {number}")
        kept = store.events(limit=20_000)
        assert len(kept) == 10_000
        assert (kept[0]["message"], kept[-1]["message"]) == ("event 6", "event 10005")
    finally:
        store.close()


def test_event_text_is_printable_and_bounded(store: Store) -> None:
    store.event("webhook", "for \x1b]0;owned\x07\x1b[2Jhttp://x/" + "a" * 10_000)
    (event,) = store.events()
    message = str(event["message"])
    assert "\x1b" not in message and "\x07" not in message
    assert message.startswith("for \\x1b]0;owned\\x07\\x1b[2Jhttp://x/aaa")
    assert len(message) < 2100 and message.endswith("more characters)")


@pytest.mark.parametrize(
    ("content", "says"),
    [
        (b"this is not a database at all, just text" * 200, "is not a usable store"),
        (b"SQLite format 3\x00" + b"\xff" * 4000, "is not a usable store"),
    ],
)
def test_a_file_that_is_not_a_store_is_refused_in_one_line_naming_it(
    path: Path, content: bytes, says: str
) -> None:
    path.write_bytes(content)
    with pytest.raises(UsageError) as refused:
        Store(path)
    assert str(path) in refused.value.message and says in refused.value.message
    assert "\n" not in refused.value.message
    assert path.read_bytes() == content


def test_a_store_with_a_damaged_page_is_refused_at_open(path: Path, clock: FakeClock) -> None:
    store = Store(path, clock=clock)
    for number in range(2000):
        store.event("push", f"event {number} " + "x" * 200)
    store.close()
    data = bytearray(path.read_bytes())
    data[4096 * 3 : 4096 * 3 + 512] = b"\xa5" * 512  # a page in the middle of the events table
    path.write_bytes(bytes(data))
    with pytest.raises(UsageError, match="is not a usable store"):
        Store(path)
