"""The planner: what should run, and what to change to get there. Pure.

Branch heads, the namespace names already handed out, people's settings, the
services a person removed, and what runs now go in; the desired targets and a
list of actions, each with a reason, come out. The engine carries the actions
out; nothing here touches git, processes or the clock.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from branchyard.model import Overlay, Repo, RepoHeads, Target
from branchyard.naming import BASELINE, namespace_for_branch

Slot = tuple[str, str]  # (namespace, service)
NO_SETTINGS = Overlay(version="")


class ActionKind(enum.StrEnum):
    DEPLOY = "deploy"
    REMOVE = "remove"


@dataclass(frozen=True)
class Action:
    kind: ActionKind
    namespace: str
    service: str
    reason: str
    target: Target | None = None  # set for DEPLOY


@dataclass(frozen=True)
class Plan:
    namespaces: Mapping[str, str]  # branch -> namespace, for every non-default branch seen
    heads: Mapping[Slot, str]  # slot -> head sha, removed-by-hand slots included
    targets: Mapping[Slot, Target]
    actions: tuple[Action, ...]


def assign_namespaces(branches: Iterable[str], known: Mapping[str, str]) -> dict[str, str]:
    """Give every branch a namespace, keeping the ones handed out before.

    A namespace, once named, keeps its name: a branch already known keeps its
    namespace whatever arrives later. New branches are named in an order that
    does not depend on the order they were seen in: first those whose name
    already is a namespace name, so that ``a-b`` keeps its own name when it
    arrives with ``A_B``, then the others, sorted.
    """
    wanted = set(branches)
    result = {branch: ns for branch, ns in known.items() if branch in wanted}
    taken = {BASELINE, *result.values()}
    for branch in sorted(wanted - result.keys(), key=lambda b: (namespace_for_branch(b) != b, b)):
        namespace = namespace_for_branch(branch, taken)
        result[branch] = namespace
        taken.add(namespace)
    return result


def _placements(
    repos: Iterable[Repo], heads: Mapping[str, RepoHeads]
) -> Iterable[tuple[Repo, str, str, bool]]:
    """(repo, branch, sha, is_default) for every branch head of every repo."""
    for repo in repos:
        seen = heads.get(repo.name)
        if seen is None:
            continue
        default = repo.default_branch or seen.default_branch
        for branch, sha in sorted(seen.branches.items()):
            yield repo, branch, sha, branch == default


def place(
    repos: Iterable[Repo], heads: Mapping[str, RepoHeads], namespaces: Mapping[str, str]
) -> dict[Slot, tuple[Repo, str, str]]:
    """slot -> (repo, branch, sha) for every branch head."""
    placed: dict[Slot, tuple[Repo, str, str]] = {}
    for repo, branch, sha, is_default in _placements(repos, heads):
        namespace = BASELINE if is_default else namespaces[branch]
        placed[(namespace, repo.name)] = (repo, branch, sha)
    return placed


def desired_targets(
    placed: Mapping[Slot, tuple[Repo, str, str]],
    settings: Mapping[Slot, Overlay],
    removed: Mapping[Slot, str],
) -> dict[Slot, Target]:
    """Every (namespace, service) that should run, with its commit, settings and peers.

    A slot a person removed stays out while its head is the commit it had then.
    """
    placed = {slot: p for slot, p in placed.items() if removed.get(slot) != p[2]}
    by_namespace: dict[str, set[str]] = {}
    for namespace, service in placed:
        by_namespace.setdefault(namespace, set()).add(service)
    baseline = by_namespace.get(BASELINE, set())
    targets: dict[Slot, Target] = {}
    for (namespace, service), (repo, branch, sha) in placed.items():
        visible = (by_namespace[namespace] | baseline) - {service}
        targets[(namespace, service)] = Target(
            namespace=namespace,
            service=service,
            repo=repo.name,
            url=repo.url,
            branch=branch,
            sha=sha,
            settings=settings.get((namespace, service), NO_SETTINGS),
            peers=tuple(sorted(visible)),
        )
    return targets


def _why(target: Target, current_key: str | None) -> str:
    if current_key is None:
        return f"new: {target.branch}@{target.sha[:7]}"
    sha, version, peers = current_key.split(":", 2)
    if sha != target.sha:
        return f"new commit {sha[:7]} -> {target.sha[:7]}"
    if version != target.settings.version:
        return f"settings changed ({version or 'none'} -> {target.settings.version})"
    return f"peers changed ({peers or 'none'} -> {','.join(target.peers) or 'none'})"


def plan(
    repos: Iterable[Repo],
    heads: Mapping[str, RepoHeads],
    known_namespaces: Mapping[str, str],
    settings: Mapping[Slot, Overlay],
    removed: Mapping[Slot, str],
    current: Mapping[Slot, str],
) -> Plan:
    """Compare the desired targets with ``current`` (slot -> key of its latest revision).

    A slot whose latest revision has the target's key needs nothing, whether
    that revision is live, still building, or failed: a failed revision is
    retried by the next push or settings change, not in a loop.
    """
    repos = list(repos)
    branches = {branch for _, branch, _, is_default in _placements(repos, heads) if not is_default}
    if any(repo.name not in heads for repo in repos):
        # A repo not read yet (at start, or unreachable since) may hold any branch named
        # before: its namespace keeps its name for when the repo is read.
        branches |= known_namespaces.keys()
    namespaces = assign_namespaces(branches, known_namespaces)
    placed = place(repos, heads, namespaces)
    targets = desired_targets(placed, settings, removed)
    actions: list[Action] = []
    for slot, target in sorted(targets.items()):
        key = current.get(slot)
        if key != target.key:
            actions.append(Action(ActionKind.DEPLOY, *slot, _why(target, key), target))
    branch_of = {namespace: branch for branch, namespace in known_namespaces.items()}
    for slot in sorted(current.keys() - targets.keys()):
        reason = _removal_reason(slot, repos, heads, removed, branch_of)
        actions.append(Action(ActionKind.REMOVE, *slot, reason))
    slot_heads = {slot: sha for slot, (_, _, sha) in placed.items()}
    return Plan(namespaces, slot_heads, targets, tuple(actions))


def _removal_reason(
    slot: Slot,
    repos: Iterable[Repo],
    heads: Mapping[str, RepoHeads],
    removed: Mapping[Slot, str],
    branch_of: Mapping[str, str],
) -> str:
    """Why ``slot`` goes: removed by hand, its repo removed, or its branch gone."""
    namespace, service = slot
    if slot in removed:
        return "removed by hand until the next push"
    if service not in {repo.name for repo in repos}:
        return f"repo {service} was removed"
    seen = heads.get(service)
    if seen is None:
        return f"no branch heads of repo {service} are known"
    if namespace == BASELINE:
        return "its default branch is gone"
    branch = branch_of.get(namespace)
    if branch is None:
        return "its branch is gone"
    if branch in seen.branches:
        return f"branch {branch} is its default branch now"
    return f"branch {branch} was deleted"
