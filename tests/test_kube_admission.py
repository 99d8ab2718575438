"""The real API server's Pod Security admission: every pod branchyard renders is admitted
in the ``restricted`` Namespace it makes, and the same pod made less locked down in any
one way is refused there, so the label is enforced and the pods meet it."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import Any

import pytest
from lightkube import ApiError, Client, KubeConfig
from lightkube.models.core_v1 import HostPathVolumeSource, PodSpec, Volume
from lightkube.models.meta_v1 import ObjectMeta
from lightkube.resources.core_v1 import Namespace, Pod

from branchyard.manifest import Manifest
from branchyard.runtime import RevisionSpec
from branchyard.runtime.kube import render
from branchyard.runtime.kube.options import KubeOptions
from tests.conftest import Cluster

pytestmark = [pytest.mark.k8s, pytest.mark.timeout(300)]  # the first test starts the cluster

SHA = "3f2c1ab" * 5 + "3f2c1"
REFUSED = 'violates PodSecurity "restricted:latest"'


@pytest.fixture(scope="module")
def config(k8s: Cluster) -> KubeConfig:
    return KubeConfig.from_file(k8s.kubeconfig)


@pytest.fixture
def options(config: KubeConfig) -> Iterator[KubeOptions]:
    """Options with a prefix of this test's own, and their baseline Namespace applied."""
    options = KubeOptions(namespace_prefix=f"t{uuid.uuid4().hex[:6]}-")
    made = render.namespace(options, "main")
    with Client(config=config, field_manager="branchyard") as client:
        client.apply(made)
        try:
            yield options
        finally:
            assert made.metadata is not None and made.metadata.name is not None
            client.delete(Namespace, made.metadata.name)


PUBLIC = "https://git.example/app.git"
PRIVATE = "https://deployer:t0ken@git.example/app.git"  # its fetch mounts the login's Secret


def pod_specs(
    options: KubeOptions, repo_url: str = PUBLIC, key: str | None = None
) -> list[PodSpec]:
    """The pods of a revision with a worker, a build step and a secret (and with an
    install cache, its environment ``key``'s)."""
    revision = RevisionSpec(
        "main",
        "app",
        1,
        repo_url,
        SHA,
        Manifest(web="python app.py", workers=(("clock", "python clock.py"),), build=("make",)),
        {"GREETING": "hi", "TOKEN": "t"},
        frozenset({"TOKEN"}),
    )
    made = []
    config, secret = render.env_objects(options, revision)
    for deployment in render.deployments(options, revision, config, secret, key):
        assert deployment.spec is not None and deployment.spec.template.spec is not None
        made.append(deployment.spec.template.spec)
    return made


def create(config: KubeConfig, options: KubeOptions, spec: PodSpec) -> None:
    """Create a pod of ``spec`` in the options' baseline Namespace, as a dry run: the API
    server admits it (or not) as it would a ReplicaSet's, and nothing runs."""
    where = f"{options.namespace_prefix}main"
    pod = Pod(metadata=ObjectMeta(name=f"probe-{uuid.uuid4().hex[:6]}", namespace=where), spec=spec)
    with Client(config=config, dry_run=True) as client:
        client.create(pod)


@pytest.mark.parametrize("repo_url", [PUBLIC, PRIVATE], ids=["public", "private"])
def test_every_pod_branchyard_renders_is_admitted_in_its_restricted_namespace(
    config: KubeConfig, options: KubeOptions, repo_url: str
) -> None:
    specs = pod_specs(options, repo_url)
    assert len(specs) == 2  # web and the worker
    for spec in specs:
        create(config, options, spec)


def test_a_pod_whose_install_mounts_the_install_cache_is_admitted_there_too(
    config: KubeConfig, options: KubeOptions
) -> None:
    specs = pod_specs(replace(options, install_cache=1024**3), key="e1")
    for spec in specs:
        assert spec.volumes is not None and spec.volumes[-1].persistentVolumeClaim is not None
        create(config, options, spec)


def _escalates(spec: Any) -> None:
    spec.containers[0].securityContext.allowPrivilegeEscalation = True


def _keeps_capabilities(spec: Any) -> None:
    spec.containers[0].securityContext.capabilities = None


def _runs_as_root(spec: Any) -> None:
    spec.securityContext.runAsNonRoot = False
    spec.securityContext.runAsUser = 0


def _has_no_seccomp_profile(spec: Any) -> None:
    spec.securityContext.seccompProfile = None


def _mounts_the_host(spec: Any) -> None:
    spec.volumes.append(Volume(name="host", hostPath=HostPathVolumeSource(path="/")))


def _an_init_container_escalates(spec: Any) -> None:
    spec.initContainers[1].securityContext.allowPrivilegeEscalation = True


LOOSENED: dict[str, Callable[[Any], None]] = {
    "privilege-escalation": _escalates,
    "capabilities-kept": _keeps_capabilities,
    "root": _runs_as_root,
    "no-seccomp": _has_no_seccomp_profile,
    "a-host-path": _mounts_the_host,
    "an-init-container-escalates": _an_init_container_escalates,
}


@pytest.mark.parametrize("loosen", LOOSENED.values(), ids=LOOSENED.keys())
def test_a_pod_less_locked_down_is_refused_there(
    config: KubeConfig, options: KubeOptions, loosen: Callable[[Any], None]
) -> None:
    (spec, _) = pod_specs(options)
    loosen(spec)
    with pytest.raises(ApiError) as refused:
        create(config, options, spec)
    assert refused.value.status.code == 403
    assert REFUSED in str(refused.value.status.message)
