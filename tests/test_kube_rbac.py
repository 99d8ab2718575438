"""branchyard's ClusterRole (deploy/branchyard.yaml) on the test control plane: the real
daemon does its work with that role alone, authenticated as its ServiceAccount with a token
the API server issued (tests/k8s_rbac.py), and the API server's authorizer grants that
ServiceAccount nothing beyond what the runtime uses."""

from __future__ import annotations

import http.client
import json
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from lightkube import ApiError, Client, KubeConfig
from lightkube.models.authorization_v1 import ResourceAttributes, SubjectAccessReviewSpec
from lightkube.models.meta_v1 import ObjectMeta
from lightkube.resources.apps_v1 import Deployment
from lightkube.resources.authorization_v1 import SubjectAccessReview
from lightkube.resources.core_v1 import ConfigMap, Namespace, Pod, ServiceAccount
from lightkube.resources.rbac_authorization_v1 import ClusterRole, ClusterRoleBinding

from branchyard.runtime.kube.names import MANAGED_BY, MANAGER, NAMESPACE, SERVICE
from branchyard.runtime.processes import Ports
from tests import k8s_node, k8s_rbac
from tests.conftest import Cluster, Daemon, ServiceRepo, git, start_daemon, stop_cleanly, wait_for
from tests.test_kube_workflow import gone, names_of, replicas, repo_files, services, settled

pytestmark = [pytest.mark.k8s, pytest.mark.integration, pytest.mark.timeout(300)]

Right = tuple[str, str, str]  # (API group, resource or resource/subresource, verb)
EXTRA_VERBS = {  # verbs discovery does not list, which RBAC checks on these resources
    ("rbac.authorization.k8s.io", "clusterroles"): ("bind", "escalate"),
    ("rbac.authorization.k8s.io", "roles"): ("bind", "escalate"),
    ("", "users"): ("impersonate",),
    ("", "groups"): ("impersonate",),
    ("", "serviceaccounts"): ("impersonate",),
}
OUTSIDER = "kube-system"  # a Namespace that is not branchyard's, where rights are checked


@pytest.fixture(scope="module")
def admin(k8s: Cluster) -> Iterator[Client]:
    with Client(config=KubeConfig.from_file(k8s.kubeconfig)) as opened:
        yield opened


@pytest.fixture(scope="module")
def kubeconfig(
    k8s: Cluster, admin: Client, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Path]:
    """A kubeconfig of branchyard's ServiceAccount, with deploy/branchyard.yaml's rights;
    the rights and the account are removed at the end."""
    k8s_rbac.grant(admin)
    try:
        yield k8s_rbac.service_account_kubeconfig(
            k8s.kubeconfig, tmp_path_factory.mktemp("rbac") / "branchyard.kubeconfig"
        )
    finally:
        namespace, name = k8s_rbac.account()
        admin.delete(ClusterRoleBinding, name)
        admin.delete(ClusterRole, name)
        admin.delete(Namespace, namespace)


def served(k8s: Cluster) -> set[Right]:
    """Every (group, resource, verb) the API server serves, from its discovery documents
    (the preferred version of each group)."""
    versions = ["/api/v1"] + [
        f"/apis/{group['preferredVersion']['groupVersion']}"
        for group in json.loads(k8s_rbac.read(k8s.kubeconfig, "/apis"))["groups"]
    ]
    found: set[Right] = set()
    for path in versions:
        group = path.removeprefix("/api/v1").removeprefix("/apis/").rpartition("/")[0]
        for resource in json.loads(k8s_rbac.read(k8s.kubeconfig, path))["resources"]:
            for verb in resource["verbs"] + list(EXTRA_VERBS.get((group, resource["name"]), ())):
                found.add((group, resource["name"], verb))
    return found


def allowed(admin: Client, user: str, groups: list[str], right: Right) -> bool:
    """The API server's authorizer's answer: may ``user`` do ``right`` in a Namespace that
    is not branchyard's (or cluster-wide, for what has no namespace)?"""
    group, resource, verb = right
    kind, _, subresource = resource.partition("/")
    review = SubjectAccessReview(
        spec=SubjectAccessReviewSpec(
            user=user,
            groups=groups,
            resourceAttributes=ResourceAttributes(
                group=group, resource=kind, subresource=subresource, verb=verb, namespace=OUTSIDER
            ),
        )
    )
    answer = admin.create(review)
    return bool(answer.status and answer.status.allowed)


def post(daemon: Daemon, path: str) -> dict[str, Any]:
    """An API call with the daemon's token."""
    token = (daemon.home / "token").read_text().strip()
    connection = http.client.HTTPConnection("127.0.0.1", int(daemon.info["api"].rsplit(":", 1)[1]))
    try:
        connection.request("POST", path, headers={"Authorization": f"Bearer {token}"})
        response = connection.getresponse()
        body = response.read()
        assert response.status == 200, body
        answer: dict[str, Any] = json.loads(body)
        return answer
    finally:
        connection.close()


def absent(admin: Client, namespace: str) -> bool:
    try:
        admin.get(Namespace, namespace)
    except ApiError as exc:
        return exc.status.code == 404
    return False


def test_the_role_grants_the_service_account_nothing_the_runtime_does_not_use(
    k8s: Cluster, admin: Client, kubeconfig: Path
) -> None:
    namespace, name = k8s_rbac.account()
    groups = [
        "system:serviceaccounts",
        f"system:serviceaccounts:{namespace}",
        "system:authenticated",
    ]
    account = f"system:serviceaccount:{namespace}:{name}"
    # What any ServiceAccount of that namespace may do without a binding of its own
    # (discovery, asking what it may do): not the role's.
    bare = "nobody-" + uuid.uuid4().hex[:6]
    admin.create(ServiceAccount(metadata=ObjectMeta(name=bare, namespace=namespace)))
    everything = served(k8s) | k8s_rbac.USED  # httproutes are checked, served or not
    mine = {right for right in everything if allowed(admin, account, groups, right)}
    anyone = {
        r for r in mine if allowed(admin, f"system:serviceaccount:{namespace}:{bare}", groups, r)
    }
    assert mine - anyone == k8s_rbac.USED
    assert ("", "secrets", "get") not in mine and ("", "nodes", "list") not in mine
    assert not any(resource.startswith("serviceaccounts") for _, resource, _ in mine - anyone)


def test_the_daemon_deploys_rolls_back_deletes_a_branch_and_gcs_with_the_role_alone(
    k8s: Cluster,
    admin: Client,
    kubeconfig: Path,
    tmp_path: Path,
    make_repo: Callable[..., ServiceRepo],
) -> None:
    prefix = f"r{uuid.uuid4().hex[:6]}-"
    main, bugfix = f"{prefix}main", f"{prefix}bugfix"
    daemon = start_daemon(
        tmp_path / "home",
        *("--poll-interval", "1", "--drain-grace", "0", "--runtime", "kubernetes"),
        *("--kubeconfig", str(kubeconfig), "--namespace-prefix", prefix, "--build-timeout", "1"),
        *("--git-listen", f"127.0.0.1:{Ports().take()}"),
    )
    try:
        repos = {name: make_repo(name, repo_files()) for name in ("app", "web")}
        for repo in repos.values():
            daemon.cli("repo", "add", str(repo.origin))
        wait_for(lambda: settled(daemon, admin, prefix, "main", 2), 60, "the baseline")

        # a branch: its Namespace made, a first deploy there; its pod's log read
        app = repos["app"]
        app.checkout("bugfix")
        app.commit({"change.txt": "1"}, "app on bugfix")
        app.push()
        first = wait_for(lambda: settled(daemon, admin, prefix, "bugfix", 1), 60, "bugfix")
        assert services(admin, bugfix) == {"app": first["app"], "web": "external"}
        (pod,) = names_of(admin, Pod, bugfix)
        pod_log = tmp_path / "web.log"
        k8s_node.write_log(pod_log, ["serving on 8080"])
        k8s_node.give_logs(admin, bugfix, pod, pod_log)
        assert "serving on 8080" in daemon.cli("-n", "bugfix", "logs", "app").stdout

        # the next deploy, then a rollback to the first
        app.commit({"change.txt": "2"}, "again")
        app.push()
        wait_for(lambda: services(admin, bugfix)["app"] != first["app"], 60, "the next deploy")
        daemon.cli("-n", "bugfix", "rollback", "app")
        wait_for(lambda: services(admin, bugfix)["app"] == first["app"], 60, "rolled back")
        assert replicas(admin, bugfix, f"app-v{first['app']}") == 1

        # the branch deleted: its Namespace goes
        git("checkout", "-q", "main", cwd=app.clone)
        git("push", "-q", "origin", "--delete", "bugfix", cwd=app.clone)
        wait_for(lambda: gone(admin, bugfix), 60, "the Namespace deleted")
        wait_for(lambda: absent(admin, bugfix), 60, "the Namespace emptied and gone")

        # gc: what an earlier daemon left for services the store no longer knows
        ours = {MANAGED_BY: MANAGER}
        left = {**ours, NAMESPACE: "old"}  # as this daemon's (its prefix's) are labelled
        admin.create(Namespace(metadata=ObjectMeta(name=f"{prefix}old", labels=left)))
        ghost = ConfigMap(
            metadata=ObjectMeta(name="ghost-env", namespace=main, labels={**ours, SERVICE: "ghost"})
        )
        admin.create(ghost)
        kept = names_of(admin, Deployment, main)
        assert post(daemon, "/api/gc")["kubernetes_objects_deleted"] == 2
        assert gone(admin, f"{prefix}old") and "ghost-env" not in names_of(admin, ConfigMap, main)
        assert names_of(admin, Deployment, main) == kept
    finally:
        try:
            stop_cleanly(daemon)
        finally:
            admin.delete(Namespace, main)
    assert "forbidden" not in daemon.log.lower(), daemon.log[-3000:]
