"""The Kubernetes objects of a revision (branchyard.runtime.kube.render, .names): names,
labels, env and secrets, the pods, the switch, the fallback, the ingress and the split;
and every object of the seed workflow, and deploy/, against the API's schemas."""

from __future__ import annotations

import base64
import json
import re
from dataclasses import replace
from typing import Any
from urllib.parse import urlsplit

import jsonschema
import kubernetes_validate
import pytest
import yaml
from lightkube.resources.apps_v1 import Deployment
from lightkube.resources.core_v1 import PersistentVolumeClaim, Secret, Service
from lightkube.resources.networking_v1 import Ingress

from branchyard import gitserve
from branchyard.errors import UsageError
from branchyard.manifest import Manifest
from branchyard.naming import short_hash
from branchyard.runtime import RevisionSpec
from branchyard.runtime.kube import names, render
from branchyard.runtime.kube.options import (
    KubeOptions,
    Toleration,
    index_settings,
    node_label,
    toleration,
)
from branchyard.runtime.kube.render import KubeObject
from branchyard.serving import MAX_SPLIT, MAX_WEIGHT
from tests import k8s_crds, k8s_rbac

SHA = "3f2c1ab" + "0" * 33
APP = "https://git.example.com/team/app.git"
DNS_1035 = re.compile(r"[a-z]([a-z0-9-]*[a-z0-9])?")
OLDEST, NEWEST = "1.30.0", "1.37.0"  # the Kubernetes versions we support (docs/kubernetes.md)


def spec(
    service: str = "app",
    namespace: str = "main",
    ordinal: int = 4,
    env: dict[str, str] | None = None,
    secrets: frozenset[str] = frozenset(),
    **manifest: Any,
) -> RevisionSpec:
    return RevisionSpec(
        namespace,
        service,
        ordinal,
        manifest.pop("repo_url", APP),
        SHA,
        Manifest(**{"web": "python app.py", **manifest}),
        env if env is not None else {"GREETING": "hello"},
        secrets,
    )


def one(objects: list[KubeObject], kind: type[Any]) -> Any:
    (found,) = [thing for thing in objects if isinstance(thing, kind)]
    return found


def deployments(options: KubeOptions, revision: RevisionSpec) -> list[Deployment]:
    return render.deployments(options, revision, *render.env_objects(options, revision))


def web_pod(deployment: Deployment) -> Any:
    assert deployment.spec is not None and deployment.spec.template.spec is not None
    return deployment.spec.template.spec


# names


@pytest.mark.parametrize(
    ("service", "name"),
    [
        pytest.param("app", "app", id="a-dns-label-stays"),
        pytest.param("web-2", "web-2", id="with-a-digit-and-dash"),
        pytest.param("other_app", "other-app-{h}", id="underscore"),
        pytest.param("Other_App", "other-app-{h}", id="capitals"),
        pytest.param("other.app", "other-app-{h}", id="dot"),
        pytest.param("2fa", "s-2fa-{h}", id="a-digit-first"),
        pytest.param("app-", "app-{h}", id="a-dash-last"),
        pytest.param("a" * 53, "a" * 53, id="as-long-as-it-may-be"),
        pytest.param("a" * 54, "a" * 46 + "-{h}", id="too-long-is-cut"),
    ],
)
def test_a_service_name_maps_to_a_dns_1035_label_hashed_where_it_changed(
    service: str, name: str
) -> None:
    got = names.object_name(service)
    assert got == name.format(h=short_hash(service))
    assert DNS_1035.fullmatch(got) and len(got) <= names.MAX_NAME


def test_the_mapping_is_injective_and_leaves_room_for_a_revision() -> None:
    services = ["app", "other_app", "other-app", "Other_App", "other.app", "2fa", "s-2fa"]
    services += ["x" * 63, "x" * 62 + "y", "app-", "app_"]
    mapped = {names.object_name(s) for s in services}
    assert len(mapped) == len(services)
    for service in services:
        for name in (names.revision_name(service, 99_999_999), names.object_name(service)):
            assert DNS_1035.fullmatch(name) and len(name) <= 63, name


@pytest.mark.parametrize(
    ("prefix", "namespace", "name"),
    [
        pytest.param("", "bugfix", "bugfix", id="no-prefix"),
        pytest.param("by-", "feature-login", "by-feature-login", id="prefix"),
        pytest.param("", "n" * 63, "n" * 63, id="63-fits"),
    ],
)
def test_a_namespace_is_a_kubernetes_namespace_labelled_as_ours(
    prefix: str, namespace: str, name: str
) -> None:
    made = render.namespace(KubeOptions(namespace_prefix=prefix), namespace)
    assert made.metadata is not None
    assert made.metadata.name == name
    assert made.metadata.labels == {
        "app.kubernetes.io/managed-by": "branchyard",
        "branchyard.dev/namespace": namespace,
        "pod-security.kubernetes.io/enforce": "restricted",
    }


def test_a_namespace_name_over_63_characters_is_a_clear_error() -> None:
    with pytest.raises(UsageError) as caught:
        render.namespace(KubeOptions(namespace_prefix="preview-"), "n" * 60)
    assert caught.value.message == (
        f"the Kubernetes Namespace 'preview-{'n' * 60}' would be 68 characters, more than 63: "
        "use a shorter namespace prefix than 'preview-'"
    )


@pytest.mark.parametrize(
    ("options", "namespace", "service", "public", "peer"),
    [
        pytest.param(
            KubeOptions(domain="preview.example.com"),
            "bugfix",
            "other_app",
            "http://other-app.bugfix.preview.example.com",
            "http://other-app-{h}",
            id="with-a-domain",
        ),
        pytest.param(
            KubeOptions(namespace_prefix="by-"),
            "bugfix",
            "web",
            "http://web.by-bugfix.svc.cluster.local",
            "http://web",
            id="in-the-cluster",
        ),
        pytest.param(
            KubeOptions(cluster_domain="k8s.internal"),
            "bugfix",
            "web",
            "http://web.bugfix.svc.k8s.internal",
            "http://web",
            id="the-clusters-own-domain",
        ),
    ],
)
def test_public_and_peer_urls(
    options: KubeOptions, namespace: str, service: str, public: str, peer: str
) -> None:
    assert render.public_url(options, namespace, service) == public
    assert render.peer_url(service) == peer.format(h=short_hash(service))


# labels


def test_every_object_carries_the_labels_of_what_it_belongs_to() -> None:
    options = KubeOptions(domain="preview.example.com")
    revision = spec(
        "other_app",
        "bugfix",
        env={"A": "1", "TOKEN": "t"},
        secrets=frozenset({"TOKEN"}),
        repo_url="https://deployer:t0ken@forge.example/other_app.git",
    )
    service = names.object_name("other_app")
    made = [
        *render.revision_objects(options, revision),
        render.revision_service(options, revision),
        render.fallback(options, "bugfix", "web"),
        render.route(options, "bugfix", "other_app", {3: 90, 4: 10}),
    ]
    per_revision = {"branchyard.dev/revision": "4", "branchyard.dev/commit": SHA}
    seen = set()
    for thing in made:
        assert thing.metadata is not None and thing.metadata.labels is not None
        labels = thing.metadata.labels
        kind = str(thing.kind)
        seen.add(kind)
        assert labels["app.kubernetes.io/managed-by"] == "branchyard", kind
        if kind == "Namespace":
            continue
        owner = "web" if labels.get("branchyard.dev/fallback") else service
        assert labels["branchyard.dev/service"] == owner, kind
        mine = kind == "Deployment" or thing.metadata.name == f"{service}-v4"
        assert (per_revision.items() <= labels.items()) is mine, kind
    assert seen == {
        "Namespace", "ConfigMap", "Secret", "Deployment", "Service", "Ingress", "HTTPRoute"
    }  # fmt: skip


# env and secrets


def env_names(revision: RevisionSpec) -> tuple[str, str | None]:
    config, secret = render.env_objects(KubeOptions(), revision)
    assert config.metadata is not None
    return str(config.metadata.name), secret.metadata.name if secret and secret.metadata else None


@pytest.mark.parametrize(
    ("before", "after", "config_changes", "secret_changes"),
    [
        pytest.param({"A": "1", "S": "x"}, {"S": "x", "A": "1"}, False, False, id="same-content"),
        pytest.param({"A": "1", "S": "x"}, {"A": "2", "S": "x"}, True, False, id="a-value"),
        pytest.param({"A": "1", "S": "x"}, {"A": "1", "S": "y"}, False, True, id="a-secret"),
        pytest.param({"A": "1", "S": "x"}, {"A": "1", "B": "", "S": "x"}, True, False, id="a-key"),
    ],
)
def test_env_objects_are_named_by_their_content(
    before: dict[str, str], after: dict[str, str], config_changes: bool, secret_changes: bool
) -> None:
    secrets = frozenset({"S"})
    first = env_names(spec(env=before, secrets=secrets))
    second = env_names(spec(env=after, secrets=secrets, ordinal=5))
    assert first[0].startswith("app-env-") and str(first[1]).startswith("app-secret-")
    assert (first[0] != second[0], first[1] != second[1]) == (config_changes, secret_changes)


def test_secrets_are_never_in_the_configmap_and_only_in_the_secret() -> None:
    revision = spec(
        env={"A": "1", "TOKEN": "s3cret", "KEY": "k3y"}, secrets=frozenset({"TOKEN", "KEY"})
    )
    config, secret = render.env_objects(KubeOptions(), revision)
    assert config.data == {"A": "1"} and config.immutable
    assert secret is not None and secret.immutable
    assert secret.data == {"KEY": "azN5", "TOKEN": "czNjcmV0"}  # base64
    text = render.review(KubeOptions(), revision)
    assert "s3cret" not in text and "czNjcmV0" not in text and "KEY: (redacted)" in text


def test_no_secrets_no_secret_and_pods_read_env_from_both() -> None:
    assert render.env_objects(KubeOptions(), spec())[1] is None
    pod = web_pod(one(render.revision_objects(KubeOptions(), spec()), Deployment))
    assert [e.configMapRef.name for e in pod.containers[0].envFrom] == [env_names(spec())[0]]
    with_secret = spec(env={"T": "x"}, secrets=frozenset({"T"}))
    config, secret = env_names(with_secret)
    pod = web_pod(one(render.revision_objects(KubeOptions(), with_secret), Deployment))
    refs = pod.containers[0].envFrom
    assert (refs[0].configMapRef.name, refs[1].secretRef.name) == (config, secret)


# the pods


@pytest.mark.parametrize(
    ("health_timeout", "build_timeout", "deadline"),
    [
        pytest.param(30.0, 300, 330, id="defaults"),
        pytest.param(2.5, 300, 303, id="rounded-up"),
        pytest.param(5.0, 0, 5, id="no-build-time"),
    ],
)
def test_the_web_deployment_is_ready_on_its_health_path_within_the_deadline(
    health_timeout: float, build_timeout: int, deadline: int
) -> None:
    revision = spec(health_path="/healthz", health_timeout=health_timeout)
    made = deployments(KubeOptions(build_timeout=build_timeout), revision)
    (web,) = made
    assert web.metadata is not None and web.spec is not None
    assert web.metadata.name == "app-v4"
    assert web.spec.replicas == 1 and web.spec.progressDeadlineSeconds == deadline
    assert web.spec.selector.matchLabels == {
        "branchyard.dev/service": "app", "branchyard.dev/revision": "4",
        "branchyard.dev/process": "web",
    }  # fmt: skip
    container = web_pod(web).containers[0]
    assert container.readinessProbe.httpGet.path == "/healthz"
    assert container.readinessProbe.httpGet.port == 8080
    env = {e.name: e.value for e in container.env}
    assert (env["HOST"], env["PORT"]) == ("0.0.0.0", "8080")  # the probe reaches the pod's IP


def test_workers_get_a_deployment_each_without_probe_port_or_service() -> None:
    revision = spec("other_app", workers=(("clock", "python clock.py"), ("mail_out", "m")))
    made = render.revision_objects(KubeOptions(), revision)
    deployments = [thing for thing in made if isinstance(thing, Deployment)]
    prefix = names.revision_name("other_app", 4)
    mail = names.object_name("mail_out")
    assert [d.metadata.name for d in deployments if d.metadata] == [
        prefix, f"{prefix}-clock", f"{prefix}-{mail}"
    ]  # fmt: skip
    for worker, command in zip(deployments[1:], ["python clock.py", "m"], strict=True):
        container = web_pod(worker).containers[0]
        assert container.readinessProbe is None and container.ports is None
        assert container.command[-1] == command
        assert not {"HOST", "PORT"} & {e.name for e in container.env}
    (service,) = [thing for thing in made if isinstance(thing, Service)]
    assert service.spec is not None and service.spec.selector is not None
    assert service.spec.selector["branchyard.dev/process"] == "web"


@pytest.mark.parametrize(
    ("manifest_image", "options", "image"),
    [
        pytest.param(None, KubeOptions(), "python:3.11-slim", id="the-default"),
        pytest.param(None, KubeOptions(image="python:3.13-slim"), "python:3.13-slim", id="option"),
        pytest.param(
            None, KubeOptions(git_image="mirror.test/git:2"), "python:3.11-slim", id="git-image"
        ),
        pytest.param("registry.test/web:1", KubeOptions(), "registry.test/web:1", id="manifest"),
    ],
)
def test_the_image_comes_from_the_manifest_else_the_options(
    manifest_image: str | None, options: KubeOptions, image: str
) -> None:
    pod = web_pod(deployments(options, spec(image=manifest_image))[0])
    assert [c.image for c in pod.initContainers] == [options.git_image, image]
    assert pod.containers[0].image == image


@pytest.mark.parametrize(
    ("text", "label"),
    [
        ("pool=previews", ("pool", "previews")),
        ("branchyard.test/node=real", ("branchyard.test/node", "real")),
        ("example.com/gpu=", ("example.com/gpu", "")),
        ("pool", "'pool' is not KEY=VALUE"),
        ("=x", "'' is not a label key"),
        ("Bad_Prefix/x=y", "'Bad_Prefix/x' is not a label key"),
        ("pool=no spaces", "'no spaces' is not a label value"),
        ("pool=" + "v" * 64, f"'{'v' * 64}' is not a label value"),
    ],
)
def test_a_node_label_is_key_equals_value_as_kubernetes_allows_them(
    text: str, label: tuple[str, str] | str
) -> None:
    if isinstance(label, str):
        with pytest.raises(ValueError, match=re.escape(label)):
            node_label(text)
    else:
        assert node_label(text) == label


@pytest.mark.parametrize(
    ("text", "tolerated"),
    [
        ("dedicated=previews:NoSchedule", Toleration("dedicated", "previews", "NoSchedule")),
        ("real-node:NoSchedule", Toleration("real-node", None, "NoSchedule")),
        ("spot=true:NoExecute", Toleration("spot", "true", "NoExecute")),
        ("dedicated=previews", "'dedicated=previews' is not KEY[=VALUE]:EFFECT"),
        ("dedicated:Never", "'dedicated:Never' is not KEY[=VALUE]:EFFECT"),
        ("a b:NoSchedule", "'a b' is not a label key"),
    ],
)  # fmt: skip
def test_a_toleration_is_written_as_kubectl_taint_writes_a_taint(
    text: str, tolerated: Toleration | str
) -> None:
    if isinstance(tolerated, str):
        with pytest.raises(ValueError, match=re.escape(tolerated)):
            toleration(text)
    else:
        assert toleration(text) == tolerated


def test_every_pod_runs_only_on_the_nodes_it_is_told_and_tolerates_their_taints() -> None:
    options = KubeOptions(
        node_selector={"pool": "previews"},
        tolerations=(
            Toleration("pool", "previews", "NoSchedule"),
            Toleration("spot", None, "NoExecute"),
        ),
    )
    for deployment in deployments(options, spec(workers=(("clock", "c"),))):
        pod = web_pod(deployment)
        assert pod.nodeSelector == {"pool": "previews"}
        assert [t.to_dict() for t in pod.tolerations] == [
            {"key": "pool", "operator": "Equal", "value": "previews", "effect": "NoSchedule"},
            {"key": "spot", "operator": "Exists", "effect": "NoExecute"},
        ]
    anywhere = web_pod(deployments(KubeOptions(), spec())[0])
    assert (anywhere.nodeSelector, anywhere.tolerations) == (None, None)


def test_the_install_and_only_it_gets_the_daemons_index_settings_unless_the_env_sets_them() -> None:
    index = {"PIP_INDEX_URL": "http://10.0.0.1:3141/simple", "PIP_TRUSTED_HOST": "10.0.0.1"}
    options = KubeOptions(install_env={**index, "UV_INDEX_URL": "http://10.0.0.1/uv"})
    revision = spec(env={"UV_INDEX_URL": "https://own.test/simple"}, workers=(("clock", "c"),))
    for deployment in deployments(options, revision):
        pod = web_pod(deployment)
        fetch, install = pod.initContainers
        got = {e.name: e.value for e in install.env}
        assert got.items() >= index.items()
        assert "UV_INDEX_URL" not in got  # the revision's own, from its ConfigMap, wins
        for container in (fetch, *pod.containers):
            assert not {e.name for e in container.env} & {*index, "UV_INDEX_URL"}


# the install cache

CACHED = KubeOptions(install_cache=2 * 1024**3)


def installs(options: KubeOptions, revision: RevisionSpec, key: str | None) -> list[Any]:
    """The pods of ``revision``'s Deployments (web and workers), its environment ``key``'s."""
    config, secret = render.env_objects(options, revision)
    return [web_pod(d) for d in render.deployments(options, revision, config, secret, key)]


@pytest.mark.parametrize(
    ("options", "claim_class"),
    [
        pytest.param(CACHED, None, id="the-clusters-default-class"),
        pytest.param(replace(CACHED, install_cache_class="fast-rwx"), "fast-rwx", id="a-class"),
        pytest.param(
            replace(CACHED, install_cache_class="nfs", install_cache_access="ReadWriteMany"),
            "nfs",
            id="a-shared-class",
        ),
    ],
)
def test_the_install_cache_is_one_claim_of_the_namespace_labelled_as_ours(
    options: KubeOptions, claim_class: str | None
) -> None:
    made = render.revision_objects(replace(options, namespace_prefix="p-"), spec(), "k")
    claim = one(made, PersistentVolumeClaim)
    assert claim.to_dict() == {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": {
            "name": "branchyard-install-cache",
            "namespace": "p-main",
            "labels": {"app.kubernetes.io/managed-by": "branchyard"},
        },
        "spec": {
            "accessModes": [options.install_cache_access],
            "resources": {"requests": {"storage": "2Gi"}},
            **({"storageClassName": claim_class} if claim_class else {}),
        },
    }
    assert [type(thing).__name__ for thing in made][:2] == ["Namespace", "PersistentVolumeClaim"]
    assert not [t for t in render.revision_objects(KubeOptions(), spec()) if t.kind == claim.kind]


@pytest.mark.parametrize("service", ["app", "other_app"])
def test_only_the_install_mounts_the_cache_and_only_its_services_part_of_it(service: str) -> None:
    revision = spec(service, "bugfix", workers=(("clock", "python clock.py"),))
    pods = installs(CACHED, revision, "k")
    assert len(pods) == 2  # web and the worker
    for pod in pods:
        fetch, install = pod.initContainers
        (cache,) = [m for m in install.volumeMounts if m.name == "cache"]
        assert (cache.mountPath, cache.subPath, cache.readOnly) == (
            "/cache", names.object_name(service), None
        )  # fmt: skip
        for other in (fetch, *pod.containers):
            assert "cache" not in {m.name for m in other.volumeMounts}
        (volume,) = [v for v in pod.volumes if v.name == "cache"]
        assert volume.persistentVolumeClaim.claimName == "branchyard-install-cache"
        assert volume.persistentVolumeClaim.readOnly is None


def test_the_install_takes_its_key_only_as_its_env_never_in_the_scripts_text() -> None:
    steps = ("make 'a b'",)
    revision = spec(build=steps, env={"GREETING": "hi", "PIP_NO_BINARY": ":all:"})
    key = render.install_key(CACHED, revision, "e1")
    for pod in installs(CACHED, revision, "e1"):
        fetch, install = pod.initContainers
        assert install.command == ["sh", "-c", render.CACHED_INSTALL, "install", *steps]
        assert {e.name: e.value for e in install.env}["INSTALL_KEY"] == key
        for other in (fetch, *pod.containers):
            assert "INSTALL_KEY" not in {e.name for e in other.env}
    assert re.fullmatch("[0-9a-f]{10}", key)
    assert "INSTALL_KEY" not in render.INSTALL and "/cache" not in render.INSTALL


@pytest.mark.parametrize(
    ("options", "revision", "environment", "same"),
    [
        pytest.param(CACHED, spec(ordinal=5, web="gunicorn app"), "e1", True,
                     id="another-revision-of-the-same-environment"),
        pytest.param(CACHED, spec(env={"GREETING": "bye"}), "e1", True, id="another-env"),
        pytest.param(CACHED, spec(), "e2", False, id="another-environment"),
        pytest.param(CACHED, spec(image="python:3.12-slim"), "e1", False, id="the-yamls-image"),
        pytest.param(replace(CACHED, image="py:3.13"), spec(), "e1", False, id="up-image"),
        pytest.param(replace(CACHED, install_env={"PIP_INDEX_URL": "http://i.test/"}), spec(),
                     "e1", False, id="the-daemons-index"),
        pytest.param(CACHED, spec(env={"GREETING": "hello", "UV_INDEX_URL": "http://u.test/"}),
                     "e1", False, id="the-revisions-index"),
    ],
)  # fmt: skip
def test_the_key_is_the_environments_with_the_image_and_the_index_settings(
    options: KubeOptions, revision: RevisionSpec, environment: str, same: bool
) -> None:
    first = render.install_key(CACHED, spec(), "e1")
    assert (render.install_key(options, revision, environment) == first) is same


def test_a_revisions_pods_are_the_same_at_every_render_and_as_before_without_the_option() -> None:
    revision = spec(workers=(("clock", "python clock.py"),), build=("make",))
    cached = [p.to_dict() for p in installs(CACHED, revision, "e1")]
    assert cached == [p.to_dict() for p in installs(CACHED, revision, "e1")]
    plain = [p.to_dict() for p in installs(KubeOptions(), revision, None)]
    assert plain == [p.to_dict() for p in installs(KubeOptions(), revision, "e1")]
    assert plain == [p.to_dict() for p in installs(CACHED, revision, None)]  # a tree unkeyed
    for pod in plain:
        assert pod["initContainers"][1]["command"][2] == render.INSTALL
        assert {v["name"] for v in pod["volumes"]} == {"workspace", "tmp", "home"}


@pytest.mark.parametrize(
    ("environment", "settings"),
    [
        pytest.param({}, {}, id="none"),
        pytest.param(
            {"PIP_INDEX_URL": "http://i.test/simple", "HOME": "/root", "PIP_FIND_LINKS": "/w"},
            {"PIP_INDEX_URL": "http://i.test/simple"},
            id="only-index-urls-no-paths",
        ),
        pytest.param(
            {"UV_INDEX_URL": "http://i.test/", "PIP_EXTRA_INDEX_URL": "http://a.test/ http://b/"},
            {"UV_INDEX_URL": "http://i.test/", "PIP_EXTRA_INDEX_URL": "http://a.test/ http://b/"},
            id="uv-and-a-list",
        ),
    ],
)
def test_index_settings_are_the_index_variables_of_the_daemons_environment(
    environment: dict[str, str], settings: dict[str, str]
) -> None:
    assert index_settings(environment) == settings


def test_an_index_url_with_credentials_is_refused_without_showing_them() -> None:
    with pytest.raises(ValueError) as caught:
        index_settings({"PIP_EXTRA_INDEX_URL": "http://a.test/ https://u:S3CRET@b.test/simple"})
    assert str(caught.value) == (
        "PIP_EXTRA_INDEX_URL carries credentials (http://a.test/ https://u:***@b.test/simple), "
        "which every install container's spec would show: name an index pods reach without them"
    )


def test_user_text_reaches_a_shell_only_as_an_argument() -> None:
    web = 'python app.py --greet "it\'s $HOME"; echo `id`'
    steps = ("make 'a b'", "echo $PATH > x")
    url = "https://git.example.com/a b/it's.git"
    revision = spec(web=web, build=steps, repo_url=url)
    pod = web_pod(deployments(KubeOptions(), revision)[0])
    fetch, install = pod.initContainers
    assert fetch.command == ["sh", "-c", render.FETCH, "fetch", url, SHA]
    assert install.command == ["sh", "-c", render.INSTALL, "install", *steps]
    assert pod.containers[0].command == ["sh", "-c", render.RUN, "web", web]


@pytest.mark.parametrize(
    ("repo_url", "git_url", "fetched"),
    [
        pytest.param(APP, None, APP, id="remote-from-its-url"),
        pytest.param("git@host:team/app.git", None, "git@host:team/app.git", id="scp-style"),
        pytest.param("/srv/repos/app", "http://by:9418/", "http://by:9418/app", id="local"),
        pytest.param("file:///srv/app", "http://by:9418", "http://by:9418/app", id="file-url"),
    ],
)
def test_pods_fetch_remote_repos_from_their_url_and_local_ones_from_the_daemon(
    repo_url: str, git_url: str | None, fetched: str
) -> None:
    options = KubeOptions(git_url=git_url)
    assert render.source_url(options, spec(repo_url=repo_url)) == fetched


def test_a_local_repo_without_a_git_server_is_a_clear_error() -> None:
    with pytest.raises(UsageError) as caught:
        render.revision_objects(KubeOptions(), spec(repo_url="/srv/repos/app"))
    assert caught.value.message == (
        "app is a repo on this machine (/srv/repos/app): pods fetch it from the daemon's git "
        "server, and none is set (branchyard up --git-listen)"
    )


# a private repo's login

TOKEN = "t0ken-8d1f0c"
LOGINS = [
    pytest.param(
        f"https://deployer:{TOKEN}@forge.example/team/app.git", "deployer", TOKEN, id="user-token"
    ),
    pytest.param(f"https://{TOKEN}@forge.example/team/app.git", TOKEN, "", id="a-token-as-user"),
    pytest.param(
        "https://deployer:t0ken%40%2F8d1f0c@forge.example/team/app.git",
        "deployer",
        "t0ken@/8d1f0c",
        id="percent-encoded",
    ),
]


def shown_anywhere(text: str, login: tuple[str, str]) -> list[str]:
    """The parts of ``login`` (its token) that ``text`` shows, as given or in base64."""
    secret = [part for part in login if part.startswith("t0ken")]
    encoded = [base64.b64encode(part.encode()).decode() for part in secret]
    return [part for part in [*secret, *encoded] if part in text]


@pytest.mark.parametrize(("repo_url", "username", "password"), LOGINS)
def test_a_private_repos_login_is_a_secret_of_its_service_and_in_no_pod_spec(
    repo_url: str, username: str, password: str
) -> None:
    options = KubeOptions(namespace_prefix="by-")
    revision = spec("other_app", "bugfix", repo_url=repo_url, workers=(("clock", "c"),))
    login = render.login_secret(options, revision)
    assert login is not None and login.metadata is not None and login.data is not None
    service = names.object_name("other_app")
    assert (login.metadata.name, login.metadata.namespace) == (f"{service}-git", "by-bugfix")
    assert login.metadata.labels == names.service_labels("other_app")  # no revision's own
    assert login.type == "kubernetes.io/basic-auth" and not login.immutable  # kept up to date
    decoded = {k: base64.b64decode(v).decode() for k, v in login.data.items()}
    assert decoded == {"username": username, "password": password}
    made = render.revision_objects(options, revision)
    assert login in made
    bare = "https://forge.example/team/app.git"
    assert render.source_url(options, revision) == bare
    pods = [web_pod(thing) for thing in made if isinstance(thing, Deployment)]
    assert len(pods) == 2  # web and the worker
    for pod in pods:
        assert shown_anywhere(json.dumps(pod.to_dict()), (username, password)) == []
        assert username not in json.dumps(pod.to_dict())
        fetch, install = pod.initContainers
        assert fetch.command == ["sh", "-c", render.FETCH, "fetch", bare, SHA]
        assert [(e.name, e.value) for e in fetch.env] == [("HOME", "/home/service")]
        assert fetch.envFrom is None
        mounted = {m.mountPath: (m.name, m.readOnly) for m in fetch.volumeMounts}
        assert mounted[render.LOGIN] == ("login", True)
        for container in (install, *pod.containers):  # pushed code runs in these
            assert "login" not in {m.name for m in container.volumeMounts}
        (volume,) = [v for v in pod.volumes if v.name == "login"]
        assert volume.secret.secretName == f"{service}-git"
        assert volume.secret.defaultMode == 0o440 and volume.secret.items is None


@pytest.mark.parametrize(("repo_url", "username", "password"), LOGINS)
def test_k8s_render_shows_a_logins_secret_redacted(
    repo_url: str, username: str, password: str
) -> None:
    text = render.review(KubeOptions(), spec(repo_url=repo_url))
    assert shown_anywhere(text, (username, password)) == []
    documents = {f"{d['kind']}/{d['metadata']['name']}": d for d in yaml.safe_load_all(text)}
    assert documents["Secret/app-git"]["stringData"] == {
        "username": "(redacted)", "password": "(redacted)"
    }  # fmt: skip
    assert documents["Secret/app-git"]["type"] == "kubernetes.io/basic-auth"
    assert "data" not in documents["Secret/app-git"]


@pytest.mark.parametrize(
    "repo_url",
    [
        pytest.param(APP, id="a-public-remote"),
        pytest.param("git@host:team/app.git", id="scp-style-ssh"),
        pytest.param("ssh://git@host/team/app.git", id="ssh"),
        pytest.param("/srv/repos/app", id="local"),
    ],
)
def test_a_url_without_a_login_gets_no_secret_and_no_mount(repo_url: str) -> None:
    options = KubeOptions(git_url="http://by:9418")
    revision = spec(repo_url=repo_url)
    assert render.login_secret(options, revision) is None
    made = render.revision_objects(options, revision)
    assert not [thing for thing in made if isinstance(thing, Secret)]
    pod = web_pod(one(made, Deployment))
    assert {v.name for v in pod.volumes} == {"workspace", "tmp", "home"}
    assert render.LOGIN not in {m.mountPath for m in pod.initContainers[0].volumeMounts}


@pytest.mark.parametrize(
    "repo_url",
    [
        "https://h/app.git?access_token=S3CRET",
        "https://u:p@h/app.git?private_token=S3CRET",
        "ssh://git:S3CRET@host/app.git",
    ],
)
def test_credentials_a_pod_cannot_get_from_a_secret_are_refused_without_showing_them(
    repo_url: str,
) -> None:
    with pytest.raises(UsageError) as caught:
        render.revision_objects(KubeOptions(), spec(repo_url=repo_url))
    assert "S3CRET" not in caught.value.message and "***" in caught.value.message
    assert caught.value.message.startswith("app's repo URL carries credentials (")
    assert "(https://USER:TOKEN@host/…), which pods get from a Secret" in caught.value.message


def test_pods_run_as_nobody_without_a_service_account_token() -> None:
    for deployment in deployments(KubeOptions(), spec(workers=(("clock", "c"),))):
        pod = web_pod(deployment)
        assert pod.automountServiceAccountToken is False
        assert pod.enableServiceLinks is False
        assert pod.securityContext.runAsNonRoot and pod.securityContext.runAsUser == 65534
        for container in [*pod.initContainers, *pod.containers]:
            assert container.securityContext.allowPrivilegeEscalation is False
            assert container.securityContext.capabilities.drop == ["ALL"]


@pytest.mark.parametrize(
    "repo_url",
    [APP, "https://deployer:t0ken@git.example.com/team/app.git"],
    ids=["public", "private"],
)
def test_every_container_has_a_read_only_root_and_writes_only_tmp_home_and_its_workspace(
    repo_url: str,
) -> None:
    revision = spec(workers=(("clock", "c"),), build=("make",), repo_url=repo_url)
    for deployment in deployments(KubeOptions(), revision):
        pod = web_pod(deployment)
        volumes = {v.name: v for v in pod.volumes}
        assert all(v.emptyDir is not None for n, v in volumes.items() if n != "login")
        assert {volumes[n].emptyDir.sizeLimit for n in ("tmp", "home")} == {"256Mi"}
        for container in [*pod.initContainers, *pod.containers]:
            assert container.securityContext.readOnlyRootFilesystem is True
            mounts = {m.mountPath: m for m in container.volumeMounts}
            writable = {path for path, m in mounts.items() if not m.readOnly}
            env = {e.name: e.value for e in container.env}
            assert env["HOME"] == "/home/service" and "/home/service" in writable
            if container in pod.initContainers:  # they fetch, install and build
                assert writable == {"/tmp", "/home/service", "/workspace"}
            else:  # what runs reads its checkout and venv, and cannot change them
                assert writable == {"/tmp", "/home/service"}
                assert mounts["/workspace"].readOnly is True


@pytest.mark.parametrize(
    ("stop_grace", "web_grace", "worker_grace"),
    [
        pytest.param(10, 15, 10, id="the-default-stop-grace"),
        pytest.param(30, 35, 30, id="up-stop-grace"),
        pytest.param(0, 5, 0, id="none"),
    ],
)
def test_a_web_pod_keeps_serving_until_kube_proxy_moved_then_gets_its_stop_grace(
    stop_grace: int, web_grace: int, worker_grace: int
) -> None:
    made = deployments(KubeOptions(stop_grace=stop_grace), spec(workers=(("clock", "c"),)))
    web, worker = (web_pod(d) for d in made)
    pause = web.containers[0].lifecycle.preStop
    assert (pause.sleep.seconds, pause.exec, pause.httpGet) == (render.UNROUTED, None, None)
    assert web.terminationGracePeriodSeconds == web_grace
    assert worker.containers[0].lifecycle is None  # no Service sends to a worker
    assert worker.terminationGracePeriodSeconds == worker_grace


@pytest.mark.parametrize(
    ("manifest", "options", "limits", "requests"),
    [
        pytest.param({}, KubeOptions(), ("1000m", "512Mi"), ("250m", "128Mi"), id="the-defaults"),
        pytest.param(
            {},
            KubeOptions(memory=2 * 1024**3, cpu=2.5),
            ("2500m", "2Gi"),
            ("625m", "512Mi"),
            id="up-box-memory-and-box-cpu",
        ),
        pytest.param(
            {"memory": 256 * 1024**2, "cpu": 0.5},
            KubeOptions(memory=2 * 1024**3, cpu=2),
            ("500m", "256Mi"),
            ("125m", "64Mi"),
            id="branchyard-yaml-wins",
        ),
        pytest.param(
            {"memory": 100 * 1024**2 + 512, "cpu": 0.01},
            KubeOptions(),
            ("10m", "104858112"),
            ("2m", "26214528"),
            id="odd-sizes-stay-exact",
        ),
    ],
)
def test_every_container_requests_a_quarter_of_its_cpu_and_memory_limits(
    manifest: dict[str, Any],
    options: KubeOptions,
    limits: tuple[str, str],
    requests: tuple[str, str],
) -> None:
    for deployment in deployments(options, spec(workers=(("clock", "c"),), **manifest)):
        pod = web_pod(deployment)
        for container in [*pod.initContainers, *pod.containers]:
            got = container.resources
            assert (got.limits["cpu"], got.limits["memory"]) == limits
            assert (got.requests["cpu"], got.requests["memory"]) == requests


# traffic


def test_the_live_service_selects_one_revision_on_port_80() -> None:
    service = render.live_service(KubeOptions(namespace_prefix="by-"), "bugfix", "2fa", 7)
    assert service.metadata is not None and service.spec is not None
    assert (service.metadata.name, service.metadata.namespace) == (
        names.object_name("2fa"),
        "by-bugfix",
    )
    assert service.spec.selector == names.selector("2fa", 7)
    (port,) = service.spec.ports or []
    assert (port.port, port.targetPort) == (80, 8080)


@pytest.mark.parametrize(
    ("prefix", "domain", "target"),
    [
        pytest.param("", "cluster.local", "other-app-{h}.main.svc.cluster.local", id="baseline"),
        pytest.param(
            "by-", "cluster.local", "other-app-{h}.by-main.svc.cluster.local", id="prefixed"
        ),
        pytest.param("", "corp.test", "other-app-{h}.main.svc.corp.test", id="a-cluster-domain"),
    ],
)
def test_a_missing_peer_falls_back_to_the_baseline_by_dns(
    prefix: str, domain: str, target: str
) -> None:
    options = KubeOptions(namespace_prefix=prefix, cluster_domain=domain)
    made = render.fallback(options, "bugfix", "other_app")
    assert made.metadata is not None and made.spec is not None
    assert made.metadata.name == names.object_name("other_app")
    assert made.metadata.namespace == f"{prefix}bugfix"
    assert made.spec.type == "ExternalName" and made.spec.selector is None
    assert made.spec.externalName == target.format(h=short_hash("other_app"))


@pytest.mark.parametrize(
    ("options", "host", "ingress_class"),
    [
        pytest.param(KubeOptions(), None, None, id="no-domain-no-ingress"),
        pytest.param(
            KubeOptions(domain="preview.example.com"),
            "other-app.bugfix.preview.example.com",
            None,
            id="domain",
        ),
        pytest.param(
            KubeOptions(domain="p.test", ingress_class="nginx"),
            "other-app.bugfix.p.test",
            "nginx",
            id="domain-and-class",
        ),
    ],
)
def test_an_ingress_only_with_a_domain(
    options: KubeOptions, host: str | None, ingress_class: str | None
) -> None:
    made = render.revision_objects(options, spec("other_app", "bugfix"))
    ingresses = [thing for thing in made if isinstance(thing, Ingress)]
    if host is None:
        assert ingresses == []
        return
    (ingress,) = ingresses
    assert ingress.spec is not None and ingress.spec.rules is not None
    assert ingress.spec.ingressClassName == ingress_class
    (rule,) = ingress.spec.rules
    assert rule.host == host
    assert rule.http is not None
    (path,) = rule.http.paths
    assert path.backend.service is not None
    assert path.backend.service.name == names.object_name("other_app")


def test_weights_are_backends_of_a_route_on_the_service_each_revision_its_own() -> None:
    options = KubeOptions()
    route = render.route(options, "bugfix", "web", {4: 10, 3: 90})
    assert route["spec"] == {
        "parentRefs": [{"group": "", "kind": "Service", "name": "web", "port": 80}],
        "rules": [
            {
                "backendRefs": [
                    {"name": "web-v3", "port": 80, "weight": 90},
                    {"name": "web-v4", "port": 80, "weight": 10},
                ]
            }
        ],
    }
    own = render.revision_service(options, spec("web", "bugfix", ordinal=3))
    assert own.metadata is not None and own.spec is not None
    assert own.metadata.name == "web-v3" and own.spec.selector == names.selector("web", 3)


ROUTES = [
    pytest.param("web", {3: 90, 4: 10}, id="a-canary"),
    pytest.param("other_app", {1: 0, 2: 1}, id="a-weight-of-0-a-hashed-name"),
    pytest.param("a" * 53, {n: MAX_WEIGHT for n in range(1, MAX_SPLIT + 1)}, id="the-most"),
]


@pytest.mark.parametrize(("service", "weights"), ROUTES)
def test_every_route_validates_against_the_gateway_apis_schema(
    service: str, weights: dict[int, int]
) -> None:
    options = KubeOptions(namespace_prefix="team-")
    route = yaml.safe_load(render.to_yaml([render.route(options, "bugfix", service, weights)]))
    jsonschema.validate(route, k8s_crds.gateway_api_schema("HTTPRoute"))


@pytest.mark.parametrize(
    "weights",
    [
        pytest.param({n: 1 for n in range(1, MAX_SPLIT + 2)}, id="too-many-backends"),
        pytest.param({1: MAX_WEIGHT + 1, 2: 1}, id="too-heavy"),
        pytest.param({1: -1, 2: 1}, id="negative"),
    ],
)
def test_a_route_beyond_what_a_split_allows_does_not_validate(weights: dict[int, int]) -> None:
    route = yaml.safe_load(render.to_yaml([render.route(KubeOptions(), "main", "web", weights)]))
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(route, k8s_crds.gateway_api_schema("HTTPRoute"))


# YAML


def test_the_yaml_is_in_apply_order_and_reads_back() -> None:
    options = KubeOptions(domain="d.test")
    revision = spec(env={"T": "x"}, secrets=frozenset({"T"}))
    made = render.revision_objects(replace(options, install_cache=1024**3), revision, "e1")
    shuffled = [*reversed(made), render.route(options, "main", "app", {4: 100})]
    documents = list(yaml.safe_load_all(render.to_yaml(shuffled)))
    assert [d["kind"] for d in documents] == [
        "Namespace", "PersistentVolumeClaim", "ConfigMap", "Secret", "Deployment", "Service",
        "Ingress", "HTTPRoute",
    ]  # fmt: skip
    assert list(documents[4])[:3] == ["apiVersion", "kind", "metadata"]
    assert documents[4]["spec"]["template"]["spec"]["initContainers"][0]["command"][2] == (
        render.FETCH
    )


# against the API's schemas


def seed_workflow() -> list[KubeObject]:
    """The objects of the seed workflow: app, other_app and web in the baseline; app
    branched into bugfix (a secret, a worker, split 90/10 between two revisions, an install
    cache), with fallbacks there for the other two; Ingresses; and billing, from a private
    repo (its login's Secret, mounted by its fetch)."""
    options = KubeOptions(
        domain="preview.example.com",
        ingress_class="nginx",
        git_url="http://by.test:9418",
        node_selector={"pool": "previews"},
        tolerations=(Toleration("pool", None, "NoSchedule"),),
    )
    made: list[KubeObject] = []
    for service in ("app", "other_app", "web"):
        made += render.revision_objects(options, spec(service, repo_url=f"/srv/{service}"))
    private = "https://deployer:t0ken@forge.example/team/billing.git"
    made += render.revision_objects(options, spec("billing", repo_url=private))
    branched = [
        spec(
            "app",
            "bugfix",
            ordinal,
            env={"GREETING": "hi", "API_TOKEN": "t0ken"},
            secrets=frozenset({"API_TOKEN"}),
            workers=(("clock", "python clock.py"),),
            build=("python -m compileall -q .",),
            health_path="/healthz",
            image="python:3.12-slim",
        )
        for ordinal in (1, 2)
    ]
    cached = replace(options, install_cache=2 * 1024**3, install_cache_class="fast-rwx")
    for revision in branched:
        made += render.revision_objects(cached, revision, "e1")
        made.append(render.revision_service(cached, revision))
    made += [render.fallback(options, "bugfix", peer) for peer in ("other_app", "web")]
    return made


def objects_to_validate() -> list[tuple[str, dict[str, Any]]]:
    made = [(f"{t.kind}/{t.metadata.name}", t.to_dict()) for t in seed_workflow() if t.metadata]
    made += [(f"deploy/{d['kind']}/{d['metadata']['name']}", d) for d in k8s_rbac.manifest()]
    return made


@pytest.mark.parametrize("version", [OLDEST, NEWEST])
def test_every_object_of_the_seed_workflow_and_deploy_validates(version: str) -> None:
    checked = set()
    for _name, data in objects_to_validate():
        kubernetes_validate.validate(data, version, strict=True)
        checked.add(data["kind"])
    assert checked == {
        "Namespace", "ConfigMap", "Secret", "Deployment", "Service", "Ingress",
        "ServiceAccount", "ClusterRole", "ClusterRoleBinding", "PersistentVolumeClaim",
    }  # fmt: skip


@pytest.mark.parametrize(
    "breaking",
    [
        pytest.param(lambda d: d["spec"].update(replicas="one"), id="a-string-for-a-number"),
        pytest.param(lambda d: d["spec"]["template"]["spec"].update(initContainer=[]), id="typo"),
        pytest.param(lambda d: d["spec"].pop("selector"), id="a-required-field-missing"),
    ],
)
def test_a_broken_object_does_not_validate(breaking: Any) -> None:
    deployment = one(render.revision_objects(KubeOptions(), spec()), Deployment).to_dict()
    kubernetes_validate.validate(deployment, NEWEST, strict=True)
    breaking(deployment)
    for version in (OLDEST, NEWEST):
        with pytest.raises(kubernetes_validate.ValidationError):
            kubernetes_validate.validate(deployment, version, strict=True)


def test_the_cluster_role_grants_exactly_what_the_runtime_uses() -> None:
    assert k8s_rbac.granted() == k8s_rbac.USED
    (role,) = [d for d in k8s_rbac.manifest() if d["kind"] == "ClusterRole"]
    assert not any("*" in str(rule) for rule in role["rules"])


def test_deploy_serves_local_repos_to_pods_at_the_url_it_gives_them() -> None:
    objects = {(d["kind"], d["metadata"]["name"]): d for d in k8s_rbac.manifest()}
    deployment = objects["Deployment", "branchyard"]
    pod = deployment["spec"]["template"]
    (container,) = pod["spec"]["containers"]
    command = container["command"]
    listen, url = (command[command.index(flag) + 1] for flag in ("--git-listen", "--git-url"))
    address = gitserve.address_of(listen, url, "127.0.0.1")
    assert address.host == "0.0.0.0"
    # pods reach it at the in-cluster name of the Service, on a port of the Service that
    # goes to the container's port it listens on
    reached = urlsplit(address.url_at(address.port))
    assert reached.scheme == "http" and reached.hostname is not None
    service_name, namespace, svc = reached.hostname.split(".")
    service = objects["Service", service_name]
    assert svc == "svc" and service["metadata"]["namespace"] == namespace
    assert deployment["metadata"]["namespace"] == namespace
    assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    (port,) = [p for p in service["spec"]["ports"] if p["port"] == reached.port]
    (target,) = [p for p in container["ports"] if p["name"] == port["targetPort"]]
    assert target["containerPort"] == address.port
