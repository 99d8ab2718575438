"""branchyard's own rights on a cluster, as deploy/branchyard.yaml grants them: its
Namespace, ServiceAccount, ClusterRole and binding applied to a test control plane, and
a kubeconfig that authenticates as that ServiceAccount with a token from the API
(TokenRequest), as a pod running the daemon would.

The tests (tests/test_kube_rbac.py) and the bench (bench/kube.py) run the real daemon
with that kubeconfig, so it works with exactly the role's rights and no more.
"""

from __future__ import annotations

import base64
import json
import ssl
import urllib.request
from pathlib import Path
from typing import Any

import yaml
from lightkube import Client, KubeConfig, codecs
from lightkube.models.authentication_v1 import TokenRequestSpec
from lightkube.models.meta_v1 import ObjectMeta
from lightkube.resources.core_v1 import ServiceAccount

DEPLOY = Path(__file__).resolve().parent.parent / "deploy" / "branchyard.yaml"
RIGHTS = ("Namespace", "ServiceAccount", "ClusterRole", "ClusterRoleBinding")
"""The objects of deploy/branchyard.yaml that make branchyard's identity and rights (not
its volume, Deployment and Service: no pod runs the daemon here)."""
TOKEN_SECONDS = 3600

_APPLIED = ("list", "create", "patch", "delete")  # applied server-side, found, deleted
USED: frozenset[tuple[str, str, str]] = frozenset(
    {("", "namespaces", "get")}  # whether one of that name is branchyard's
    | {("", "namespaces", verb) for verb in _APPLIED}
    | {("", kind, verb) for kind in ("services", "configmaps", "secrets") for verb in _APPLIED}
    | {("", "persistentvolumeclaims", "create"), ("", "persistentvolumeclaims", "patch")}
    | {("apps", "deployments", verb) for verb in (*_APPLIED, "watch")}
    | {("networking.k8s.io", "ingresses", verb) for verb in _APPLIED}
    | {("gateway.networking.k8s.io", "httproutes", verb) for verb in _APPLIED}
    | {("", "pods", "list"), ("", "pods", "watch"), ("", "pods/log", "get")}
)
"""(API group, resource, verb): every call the Kubernetes runtime makes, so every right it
needs (a server-side apply is a patch, and a create where the object is missing)."""


def manifest() -> list[dict[str, Any]]:
    """The objects of deploy/branchyard.yaml, as dicts."""
    return [thing for thing in yaml.safe_load_all(DEPLOY.read_text()) if thing]


def granted() -> set[tuple[str, str, str]]:
    """(API group, resource, verb) that deploy/branchyard.yaml's ClusterRole grants."""
    (role,) = [thing for thing in manifest() if thing["kind"] == "ClusterRole"]
    return {
        (group, resource, verb)
        for rule in role["rules"]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }


def account() -> tuple[str, str]:
    """The ServiceAccount's (namespace, name)."""
    (found,) = [thing for thing in manifest() if thing["kind"] == "ServiceAccount"]
    return found["metadata"]["namespace"], found["metadata"]["name"]


def grant(client: Client) -> None:
    """Apply branchyard's Namespace, ServiceAccount, ClusterRole and binding (server-side,
    as ``kubectl apply --server-side`` would)."""
    for thing in manifest():
        if thing["kind"] in RIGHTS:
            client.apply(codecs.from_dict(thing), field_manager="branchyard-tests", force=True)


def service_account_kubeconfig(admin: Path, destination: Path) -> Path:
    """A kubeconfig for the cluster of the kubeconfig ``admin`` whose user is branchyard's
    ServiceAccount, with a token the API server issues for it; written to ``destination``."""
    namespace, name = account()
    with Client(config=KubeConfig.from_file(admin)) as client:
        request = ServiceAccount.Token(
            metadata=ObjectMeta(name=name, namespace=namespace),
            spec=TokenRequestSpec(audiences=[], expirationSeconds=TOKEN_SECONDS),
        )
        issued = client.create(request, name, namespace=namespace)
    assert issued.status is not None
    config = json.loads(admin.read_text())
    user = f"system:serviceaccount:{namespace}:{name}"
    config["users"] = [{"name": user, "user": {"token": issued.status.token}}]
    for context in config["contexts"]:
        context["context"]["user"] = user
    destination.write_text(json.dumps(config, indent=2) + "\n")
    destination.chmod(0o600)
    return destination


def read(kubeconfig: Path, path: str) -> bytes:
    """GET ``path`` of the API server as the kubeconfig's user (discovery, ``/metrics``):
    what lightkube has no call for."""
    config = json.loads(kubeconfig.read_text())
    cluster = config["clusters"][0]["cluster"]
    authority = base64.b64decode(cluster["certificate-authority-data"]).decode()
    token = config["users"][0]["user"]["token"]
    request = urllib.request.Request(
        cluster["server"] + path, headers={"Authorization": f"Bearer {token}"}
    )
    context = ssl.create_default_context(cadata=authority)
    with urllib.request.urlopen(request, timeout=30, context=context) as answer:
        body: bytes = answer.read()
        return body
