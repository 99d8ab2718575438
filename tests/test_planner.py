"""Unit tests for the planner: branch heads and what runs in, targets and actions out."""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Mapping
from typing import Any

import pytest

from branchyard.model import Overlay, Repo, RepoHeads
from branchyard.planner import (
    NO_SETTINGS,
    Action,
    ActionKind,
    Plan,
    Slot,
    assign_namespaces,
    plan,
)

OLD = "1111111" + "a" * 33
NEW = "2222222" + "b" * 33
WEB_SHA = "3333333" + "c" * 33
MAIN_SHA = "4444444" + "d" * 33


def sha6(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:6]


def repo(name: str, default_branch: str | None = None) -> Repo:
    return Repo(name, f"/srv/git/{name}.git", default_branch)


def seen(name: str, branches: Mapping[str, str], default: str = "main") -> RepoHeads:
    return RepoHeads(name, default, dict(branches))


def run(
    repos: list[Repo],
    heads: list[RepoHeads],
    *,
    known: Mapping[str, str] | None = None,
    settings: Mapping[Slot, Overlay] | None = None,
    removed: Mapping[Slot, str] | None = None,
    current: Mapping[Slot, str] | None = None,
) -> Plan:
    return plan(
        repos,
        {h.repo: h for h in heads},
        known or {},
        settings or {},
        removed or {},
        current or {},
    )


def summary(actions: tuple[Action, ...]) -> list[tuple[str, str, str, str]]:
    return [(a.kind.value, a.namespace, a.service, a.reason) for a in actions]


def key(sha: str, version: str = "", peers: str = "") -> str:
    return f"{sha}:{version}:{peers}"


# -- assign_namespaces ---------------------------------------------------------------


BRANCHES = ["feature/x", "feature_x", "Feature-X", "main"]
ASSIGNED = {
    "Feature-X": "feature-x",
    "feature/x": f"feature-x-{sha6('feature/x')}",
    "feature_x": f"feature-x-{sha6('feature_x')}",
    "main": f"main-{sha6('main')}",
}


@pytest.mark.parametrize(
    "order",
    [pytest.param(list(p), id="-".join(p)) for p in itertools.permutations(BRANCHES)],
)
def test_namespaces_do_not_depend_on_the_order_branches_were_seen_in(order: list[str]) -> None:
    assert assign_namespaces(order, {}) == ASSIGNED


@pytest.mark.parametrize(
    ("branches", "known", "assigned"),
    [
        pytest.param(
            ["feature/x", "feature_x"],
            {"feature_x": "feature-x"},
            {"feature_x": "feature-x", "feature/x": f"feature-x-{sha6('feature/x')}"},
            id="known-holder-keeps-plain-name",
        ),
        pytest.param(
            ["bugfix"],
            {"bugfix": "something-else"},
            {"bugfix": "something-else"},
            id="known-kept-even-if-unusual",
        ),
        pytest.param(
            ["bugfix"],
            {"gone": "bugfix", "bugfix": "bugfix-123456"},
            {"bugfix": "bugfix-123456"},
            id="gone-branches-dropped",
        ),
        pytest.param(
            ["bugfix"],
            {"gone": "bugfix"},
            {"bugfix": "bugfix"},
            id="a-gone-branch-frees-its-namespace",
        ),
        pytest.param([], {"gone": "gone"}, {}, id="nothing-left"),
    ],
)
def test_known_namespaces_are_kept_for_branches_still_there(
    branches: list[str], known: dict[str, str], assigned: dict[str, str]
) -> None:
    assert assign_namespaces(branches, known) == assigned


def collisions(plain: str, other: str) -> list[Any]:
    """The ways a branch named ``plain`` (a namespace name already) and ``other``
    (which folds to it) can arrive: together, or either one later."""
    first = {plain: plain, other: f"{plain}-{sha6(other)}"}
    return [
        pytest.param([[other, plain]], first, id=f"{other}-with-{plain}"),
        pytest.param([[plain], [other]], first, id=f"{plain}-then-{other}"),
        pytest.param(
            [[other], [plain]],
            {other: plain, plain: f"{plain}-{sha6(plain)}"},
            id=f"{other}-then-{plain}-leaves-the-namespace-named",
        ),
    ]


@pytest.mark.parametrize(
    ("arrivals", "assigned"),
    [
        *collisions("a-b", "A_B"),
        *collisions("feature-x", "feature/x"),
        pytest.param(
            [["feature/x"], ["feature-x", "Feature_X"], ["FEATURE.X"]],
            {
                "feature/x": "feature-x",
                "feature-x": f"feature-x-{sha6('feature-x')}",
                "Feature_X": f"feature-x-{sha6('Feature_X')}",
                "FEATURE.X": f"feature-x-{sha6('FEATURE.X')}",
            },
            id="three-arrivals",
        ),
        pytest.param(
            [["main"], ["Main"]],
            {"main": f"main-{sha6('main')}", "Main": f"main-{sha6('Main')}"},
            id="never-the-baseline",
        ),
    ],
)
def test_colliding_branches_keep_the_names_they_were_given(
    arrivals: list[list[str]], assigned: dict[str, str]
) -> None:
    """Each list of ``arrivals`` is seen by one plan, on top of the branches before it."""
    known: dict[str, str] = {}
    branches: list[str] = []
    for arrival in arrivals:
        branches += arrival
        named = assign_namespaces(branches, known)
        assert {b: named[b] for b in known} == known, "a namespace changed its name"
        known = named
    assert known == assigned


@pytest.mark.parametrize(
    ("branches", "known"),
    [
        pytest.param(["feature/x", "feature_x", "Feature.X"], {}, id="three-fold-alike"),
        pytest.param(["修复", "修正", "🚀"], {}, id="three-hash-only"),
        pytest.param(["a/b", "a_b"], {"a_b": "a-b"}, id="known-plain-name"),
        # "a-b-" + sha6("a_b") is a legal branch name; it sorts first and takes that label
        # literally, then "a_b" collides with "a/b" and is handed the very same hashed form.
        pytest.param(["a/b", "a_b", f"a-b-{sha6('a_b')}"], {}, id="literal-hashed-name"),
        pytest.param(["修复", f"b-{sha6('修复')}"], {}, id="literal-b-hash-name"),
    ],
)
def test_every_branch_gets_a_namespace_of_its_own(
    branches: list[str], known: dict[str, str]
) -> None:
    assigned = assign_namespaces(branches, known)
    assert sorted(assigned) == sorted(branches)
    assert len(set(assigned.values())) == len(branches), assigned
    assert "main" not in assigned.values()


# -- plan: targets --------------------------------------------------------------------


def test_one_repo_with_main_deploys_into_the_baseline() -> None:
    result = run([repo("app")], [seen("app", {"main": OLD})])
    target = result.targets[("main", "app")]
    assert (target.namespace, target.service, target.branch, target.sha) == (
        "main",
        "app",
        "main",
        OLD,
    )
    assert (target.repo, target.url) == ("app", "/srv/git/app.git")
    assert target.peers == ()
    assert target.settings == NO_SETTINGS
    assert target.key == key(OLD)
    assert result.namespaces == {}
    assert summary(result.actions) == [("deploy", "main", "app", "new: main@1111111")]
    assert result.actions[0].target == target


def test_the_same_branch_name_in_two_repos_lands_in_one_namespace() -> None:
    result = run(
        [repo("app"), repo("web")],
        [
            seen("app", {"main": MAIN_SHA, "feature/Login": OLD}),
            seen("web", {"main": MAIN_SHA, "feature/Login": WEB_SHA}),
        ],
    )
    assert result.namespaces == {"feature/Login": "feature-login"}
    assert sorted(result.targets) == [
        ("feature-login", "app"),
        ("feature-login", "web"),
        ("main", "app"),
        ("main", "web"),
    ]
    assert result.targets[("feature-login", "app")].peers == ("web",)
    assert result.targets[("feature-login", "web")].peers == ("app",)
    assert result.targets[("feature-login", "web")].sha == WEB_SHA
    assert result.targets[("main", "app")].peers == ("web",)


def test_a_peer_only_in_the_baseline_is_visible() -> None:
    result = run(
        [repo("app"), repo("web"), repo("db")],
        [
            seen("app", {"main": MAIN_SHA, "bugfix": OLD}),
            seen("web", {"main": MAIN_SHA}),
            seen("db", {"main": MAIN_SHA}),
        ],
    )
    assert ("bugfix", "web") not in result.targets
    assert result.targets[("bugfix", "app")].peers == ("db", "web")
    assert result.targets[("bugfix", "app")].key == key(OLD, "", "db,web")


def test_a_repo_default_branch_override_sends_that_branch_to_the_baseline() -> None:
    result = run(
        [repo("app", default_branch="develop")],
        [seen("app", {"main": OLD, "develop": NEW}, default="main")],
    )
    assert result.targets[("main", "app")].branch == "develop"
    assert result.targets[("main", "app")].sha == NEW
    assert result.namespaces == {"main": f"main-{sha6('main')}"}
    assert result.targets[(f"main-{sha6('main')}", "app")].sha == OLD


def test_each_repo_s_own_default_branch_goes_to_the_baseline() -> None:
    result = run(
        [repo("app"), repo("web")],
        [seen("app", {"main": OLD}), seen("web", {"master": WEB_SHA}, default="master")],
    )
    assert sorted(result.targets) == [("main", "app"), ("main", "web")]
    assert result.targets[("main", "web")].branch == "master"
    assert result.namespaces == {}


def test_a_repo_the_watcher_has_not_seen_yet_gets_nothing() -> None:
    result = run([repo("app"), repo("web")], [seen("app", {"main": OLD})])
    assert list(result.targets) == [("main", "app")]


def test_the_namespaces_of_a_repo_not_read_yet_keep_their_names() -> None:
    known = {"A_B": "a-b"}
    result = run([repo("app"), repo("web")], [seen("app", {"main": OLD, "a-b": NEW})], known=known)
    assert result.namespaces == {"A_B": "a-b", "a-b": f"a-b-{sha6('a-b')}"}
    assert list(result.targets) == [("a-b-" + sha6("a-b"), "app"), ("main", "app")]

    heads = [seen("app", {"main": OLD, "a-b": NEW}), seen("web", {"main": WEB_SHA})]
    assert run([repo("app"), repo("web")], heads, known=result.namespaces).namespaces == {
        "a-b": f"a-b-{sha6('a-b')}"
    }, "once every repo is read, a branch that is gone frees its name"


def test_heads_of_an_unregistered_repo_are_ignored() -> None:
    result = run([repo("app")], [seen("app", {"main": OLD}), seen("web", {"main": WEB_SHA})])
    assert list(result.targets) == [("main", "app")]


def test_settings_reach_their_target() -> None:
    overlay = Overlay("abc1234", {"GREETING": "hi"})
    result = run(
        [repo("app")],
        [seen("app", {"main": OLD, "bugfix": NEW})],
        settings={("bugfix", "app"): overlay},
    )
    assert result.targets[("bugfix", "app")].settings == overlay
    assert result.targets[("bugfix", "app")].key == key(NEW, "abc1234", "")
    assert result.targets[("main", "app")].settings == NO_SETTINGS


# -- plan: actions --------------------------------------------------------------------


TWO_REPOS = [repo("app"), repo("web")]


@pytest.mark.parametrize(
    ("heads", "settings", "current", "actions"),
    [
        pytest.param(
            [seen("app", {"main": NEW})],
            {},
            {("main", "app"): key(NEW)},
            [],
            id="unchanged-key-no-action",
        ),
        pytest.param(
            [seen("app", {"main": NEW}), seen("web", {"main": WEB_SHA})],
            {("main", "app"): Overlay("abc1234", {"A": "1"})},
            {("main", "app"): key(NEW, "abc1234", "web"), ("main", "web"): key(WEB_SHA, "", "app")},
            [],
            id="failed-revision-with-target-key-not-retried",
        ),
        pytest.param(
            [seen("app", {"main": NEW})],
            {},
            {("main", "app"): key(OLD)},
            [("deploy", "main", "app", "new commit 1111111 -> 2222222")],
            id="new-sha",
        ),
        pytest.param(
            [seen("app", {"main": NEW})],
            {("main", "app"): Overlay("abc1234", {"A": "1"})},
            {("main", "app"): key(NEW)},
            [("deploy", "main", "app", "settings changed (none -> abc1234)")],
            id="settings-first-set",
        ),
        pytest.param(
            [seen("app", {"main": NEW})],
            {("main", "app"): Overlay("def5678", {"A": "2"})},
            {("main", "app"): key(NEW, "abc1234")},
            [("deploy", "main", "app", "settings changed (abc1234 -> def5678)")],
            id="settings-version-changed",
        ),
        pytest.param(
            [seen("app", {"main": NEW}), seen("web", {"main": WEB_SHA})],
            {},
            {("main", "app"): key(NEW), ("main", "web"): key(WEB_SHA, "", "app")},
            [("deploy", "main", "app", "peers changed (none -> web)")],
            id="peer-appeared",
        ),
        pytest.param(
            [seen("app", {"main": NEW})],
            {},
            {("main", "app"): key(NEW, "", "web"), ("main", "web"): key(WEB_SHA, "", "app")},
            [
                ("deploy", "main", "app", "peers changed (web -> none)"),
                ("remove", "main", "web", "no branch heads of repo web are known"),
            ],
            id="peer-repo-gone",
        ),
        pytest.param(
            [seen("app", {"main": NEW})],
            {},
            {("main", "app"): key(NEW), ("bugfix", "app"): key(OLD)},
            [("remove", "bugfix", "app", "its branch is gone")],
            id="branch-deleted",
        ),
        pytest.param(
            [seen("app", {"main": NEW, "zeta": OLD, "alpha": OLD})],
            {},
            {("beta", "app"): key(OLD)},
            [
                ("deploy", "alpha", "app", "new: alpha@1111111"),
                ("deploy", "main", "app", "new: main@2222222"),
                ("deploy", "zeta", "app", "new: zeta@1111111"),
                ("remove", "beta", "app", "its branch is gone"),
            ],
            id="deploys-sorted-then-removes",
        ),
    ],
)
def test_actions_follow_from_comparing_targets_with_what_runs(
    heads: list[RepoHeads],
    settings: dict[Slot, Overlay],
    current: dict[Slot, str],
    actions: list[tuple[str, str, str, str]],
) -> None:
    result = run(TWO_REPOS, heads, settings=settings, current=current)
    assert summary(result.actions) == actions
    for action in result.actions:
        if action.kind is ActionKind.DEPLOY:
            assert action.target == result.targets[(action.namespace, action.service)]
        else:
            assert action.target is None


def test_a_second_plan_on_the_first_plan_s_keys_does_nothing() -> None:
    repos = [repo("app"), repo("web")]
    heads = [
        seen("app", {"main": MAIN_SHA, "bugfix": OLD}),
        seen("web", {"main": MAIN_SHA, "bugfix": WEB_SHA}),
    ]
    first = run(repos, heads)
    assert len(first.actions) == 4
    current = {slot: target.key for slot, target in first.targets.items()}
    second = run(repos, heads, known=first.namespaces, current=current)
    assert second.actions == ()
    assert second.targets == first.targets


@pytest.mark.parametrize(
    ("repos", "heads", "known", "gone", "reason"),
    [
        pytest.param(
            [repo("app")],
            [seen("app", {"main": NEW})],
            {"feature/x": "feature-x"},
            ("feature-x", "app"),
            "branch feature/x was deleted",
            id="branch-deleted",
        ),
        pytest.param(
            [repo("app")],
            [seen("app", {"main": NEW})],
            {},
            ("main", "web"),
            "repo web was removed",
            id="repo-removed",
        ),
        pytest.param(
            [repo("app")],
            [seen("app", {"dev": NEW})],
            {"dev": "dev"},
            ("main", "app"),
            "its default branch is gone",
            id="default-branch-deleted",
        ),
        pytest.param(
            [repo("app")],
            [seen("app", {"main": OLD, "dev": NEW}, default="dev")],
            {"dev": "dev"},
            ("dev", "app"),
            "branch dev is its default branch now",
            id="head-moved-to-the-branch",
        ),
        pytest.param(
            [repo("app"), repo("web")],
            [seen("app", {"main": NEW})],
            {},
            ("main", "web"),
            "no branch heads of repo web are known",
            id="repo-not-read",
        ),
    ],
)
def test_a_removal_says_why_the_service_went(
    repos: list[Repo], heads: list[RepoHeads], known: dict[str, str], gone: Slot, reason: str
) -> None:
    result = run(repos, heads, known=known, current={gone: key(OLD)})
    assert summary(result.actions)[-1] == ("remove", *gone, reason)


# -- plan: services removed by hand ----------------------------------------------------


def test_a_slot_removed_by_hand_stays_out_while_its_head_is_unchanged() -> None:
    result = run(
        [repo("app")],
        [seen("app", {"main": MAIN_SHA, "bugfix": OLD})],
        removed={("bugfix", "app"): OLD},
        current={("main", "app"): key(MAIN_SHA), ("bugfix", "app"): key(OLD)},
    )
    assert ("bugfix", "app") not in result.targets
    assert summary(result.actions) == [
        ("remove", "bugfix", "app", "removed by hand until the next push")
    ]
    assert result.heads[("bugfix", "app")] == OLD


def test_a_slot_removed_by_hand_and_already_stopped_needs_nothing() -> None:
    result = run(
        [repo("app")],
        [seen("app", {"main": MAIN_SHA, "bugfix": OLD})],
        removed={("bugfix", "app"): OLD},
        current={("main", "app"): key(MAIN_SHA)},
    )
    assert result.actions == ()
    assert result.namespaces == {"bugfix": "bugfix"}


def test_a_slot_removed_by_hand_is_deployed_again_after_a_push() -> None:
    result = run(
        [repo("app")],
        [seen("app", {"main": MAIN_SHA, "bugfix": NEW})],
        removed={("bugfix", "app"): OLD},
        current={("main", "app"): key(MAIN_SHA)},
    )
    assert result.targets[("bugfix", "app")].sha == NEW
    assert summary(result.actions) == [("deploy", "bugfix", "app", "new: bugfix@2222222")]


def test_peers_of_a_removed_slot_fall_back_to_the_baseline() -> None:
    result = run(
        [repo("app"), repo("web")],
        [
            seen("app", {"main": MAIN_SHA, "bugfix": OLD}),
            seen("web", {"main": MAIN_SHA, "bugfix": WEB_SHA}),
        ],
        removed={("bugfix", "app"): OLD},
    )
    assert ("bugfix", "app") not in result.targets
    assert result.targets[("bugfix", "web")].peers == ("app",)


def test_plan_heads_include_every_slot_removed_ones_too() -> None:
    result = run(
        [repo("app"), repo("web")],
        [
            seen("app", {"main": MAIN_SHA, "bugfix": OLD}),
            seen("web", {"main": WEB_SHA}),
        ],
        removed={("bugfix", "app"): OLD, ("main", "web"): WEB_SHA},
    )
    assert result.heads == {
        ("main", "app"): MAIN_SHA,
        ("bugfix", "app"): OLD,
        ("main", "web"): WEB_SHA,
    }
    assert sorted(result.targets) == [("main", "app")]


def test_removal_marks_for_another_sha_do_not_hide_the_slot() -> None:
    result = run(
        [repo("app")],
        [seen("app", {"main": MAIN_SHA})],
        removed={("main", "app"): OLD},
    )
    assert list(result.targets) == [("main", "app")]
    assert ActionKind.REMOVE not in {a.kind for a in result.actions}
