"""The Kubernetes runtime and traffic layer on their own, against the test control plane:
real API server and controllers, kwok's node passing readiness only for commands marked
``sim-ready``. Each test has Namespaces of its own (a prefix), as the cluster is shared."""

from __future__ import annotations

import asyncio
import base64
import uuid
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import replace
from typing import Any

import pytest
from lightkube import ApiError, Client, KubeConfig
from lightkube.models.meta_v1 import ObjectMeta
from lightkube.resources.apps_v1 import Deployment, ReplicaSet
from lightkube.resources.core_v1 import Namespace, PersistentVolumeClaim, Secret, Service

from branchyard.errors import BuildFailed, UsageError
from branchyard.manifest import Manifest
from branchyard.runtime import InstanceState, RevisionSpec
from branchyard.runtime.kube.connection import Connection
from branchyard.runtime.kube.namespaces import Namespaces, NameTaken
from branchyard.runtime.kube.options import KubeOptions
from branchyard.runtime.kube.runtime import KubeInstance, KubeRuntime
from branchyard.runtime.kube.traffic import KubeTraffic
from tests.conftest import Cluster, wait_for

pytestmark = [pytest.mark.k8s, pytest.mark.timeout(300)]  # the first test starts the cluster

GOOD = "python -m http.server $PORT  # sim-ready"
BAD = "python -m http.server $PORT"  # its readiness probe never passes
SHA = "3f2c1ab" * 5 + "3f2c1"


@pytest.fixture(scope="module")
def client(k8s: Cluster) -> Iterator[Client]:
    with Client(config=KubeConfig.from_file(k8s.kubeconfig)) as opened:
        yield opened


@pytest.fixture
def prefix() -> str:
    return f"t{uuid.uuid4().hex[:6]}-"


def spec(namespace: str, service: str, ordinal: int, web: str = GOOD, **env: str) -> RevisionSpec:
    return RevisionSpec(
        namespace,
        service,
        ordinal,
        f"https://git.example/{service}.git",
        SHA,
        Manifest(web=web, health_timeout=1),
        {"BRANCHYARD_SERVICE": service, **env},
    )


class World:
    """A runtime and its traffic layer, and the events they reported."""

    def __init__(self, runtime: KubeRuntime) -> None:
        self.runtime = runtime
        self.traffic = KubeTraffic(runtime.switchboard)
        self.events: list[str] = []
        self.known: set[tuple[str, str]] = set()

    async def start(self, revision: RevisionSpec) -> KubeInstance:
        build = await self.runtime.build(revision)
        return await self.runtime.start(build, lambda _: None)

    async def serve(self, revision: RevisionSpec) -> KubeInstance:
        instance = await self.start(revision)
        self.traffic.route(revision.namespace, revision.service, [(instance.address, 100)])
        await self.traffic.drain(instance.address, 0)
        return instance


def run(
    k8s: Cluster, prefix: str, scenario: Callable[[World], Awaitable[None]], crash: bool = False
) -> list[str]:
    """Run ``scenario`` with a runtime on the test cluster; the events it reported."""

    async def main() -> list[str]:
        events: list[str] = []
        options = KubeOptions(
            kubeconfig=str(k8s.kubeconfig), namespace_prefix=prefix, build_timeout=1
        )
        world: World | None = None

        def report(kind: str, message: str, slot: tuple[str, str] | None) -> None:
            events.append(message)

        runtime = await KubeRuntime.connect(
            options, report, lambda: "http://localhost/", lambda: world.known if world else set()
        )
        world = World(runtime)
        world.events = events
        try:
            await runtime.recover()
            await scenario(world)
        finally:
            runtime.detach()
            await runtime.close()
        return events

    return asyncio.run(main())


def service(client: Client, namespace: str, name: str) -> Service:
    return client.get(Service, name, namespace=namespace)


def selected(client: Client, namespace: str, name: str) -> str | None:
    found = service(client, namespace, name).spec
    assert found is not None
    return (found.selector or {}).get("branchyard.dev/revision")


def replicas(client: Client, namespace: str, name: str) -> int | None:
    found = client.get(Deployment, name, namespace=namespace).spec
    return found.replicas if found else None


def test_a_good_revision_serves_once_available_and_a_bad_one_fails_leaving_the_old_serving(
    k8s: Cluster, client: Client, prefix: str
) -> None:
    async def scenario(world: World) -> None:
        first = await world.serve(spec("main", "app", 1))
        assert first.state is InstanceState.RUNNING
        assert selected(client, f"{prefix}main", "app") == "1"
        with pytest.raises(BuildFailed) as failed:
            await world.start(spec("main", "app", 2, web=BAD))
        assert failed.value.message == "not ready: health check GET / did not pass within 2 s"

    events = run(k8s, prefix, scenario)
    assert selected(client, f"{prefix}main", "app") == "1"
    assert replicas(client, f"{prefix}main", "app-v2") == 0
    assert replicas(client, f"{prefix}main", "app-v1") == 1
    namespace = client.get(Namespace, f"{prefix}main")
    assert namespace.metadata is not None and namespace.metadata.labels is not None
    assert namespace.metadata.labels["app.kubernetes.io/managed-by"] == "branchyard"
    assert f"made Namespace {prefix}main" in events
    assert any(e.startswith(f"app-v2 in {prefix}main failed: not ready") for e in events)


def test_stop_scales_a_revision_to_0_and_a_rollback_scales_it_back_up(
    k8s: Cluster, client: Client, prefix: str
) -> None:
    where = f"{prefix}main"

    async def scenario(world: World) -> None:
        first = await world.serve(spec("main", "app", 1))
        await world.serve(spec("main", "app", 2, GREETING="hi"))
        assert selected(client, where, "app") == "2"
        await first.stop(0)
        assert replicas(client, where, "app-v1") == 0
        back = await world.serve(spec("main", "app", 1))
        assert back.state is InstanceState.RUNNING
        assert replicas(client, where, "app-v1") == 1
        assert selected(client, where, "app") == "1"

    events = run(k8s, prefix, scenario)
    assert f"scaled app-v1 in {where} to 0: kept for a rollback" in events


def test_a_fallback_is_an_external_name_until_the_peer_is_branched_in_and_after_it_left(
    k8s: Cluster, client: Client, prefix: str
) -> None:
    where = f"{prefix}bugfix"

    async def scenario(world: World) -> None:
        await world.runtime.sync_peers({("bugfix", "other_app"), ("main", "other_app")})
        await world.runtime.switchboard.settled()
        fallback = service(client, where, "other-app-181558").spec
        assert fallback is not None and fallback.type == "ExternalName"
        assert fallback.externalName == f"other-app-181558.{prefix}main.svc.cluster.local"
        assert await world.runtime.peer_url("bugfix", "other_app") == "http://other-app-181558"
        with pytest.raises(ApiError) as missing:
            client.get(Service, "other-app-181558", namespace=f"{prefix}main")
        assert missing.value.status.code == 404

        await world.serve(spec("bugfix", "other_app", 1))
        branched = service(client, where, "other-app-181558").spec
        assert branched is not None and branched.type == "ClusterIP"
        assert (branched.selector or {})["branchyard.dev/revision"] == "1"

        world.traffic.remove("bugfix", "other_app")
        await world.runtime.switchboard.settled()
        again = service(client, where, "other-app-181558").spec
        assert again is not None and again.type == "ExternalName"

    run(k8s, prefix, scenario)


def test_discard_deletes_a_services_objects_and_the_namespace_once_none_is_left(
    k8s: Cluster, client: Client, prefix: str
) -> None:
    where = f"{prefix}bugfix"

    async def scenario(world: World) -> None:
        await world.serve(spec("bugfix", "app", 1))
        await world.serve(spec("bugfix", "web", 1))
        world.traffic.remove("bugfix", "app")
        await world.runtime.discard("bugfix", "app")
        await world.runtime.switchboard.settled()
        assert deployments(client, where) == ["web-v1"]
        assert client.get(Namespace, where)
        world.traffic.remove("bugfix", "web")
        await world.runtime.discard("bugfix", "web")

    events = run(k8s, prefix, scenario)
    assert f"deleted Namespace {where}: no service of bugfix is left" in events
    wait_for(lambda: not namespace_exists(client, where), 30, "the Namespace gone")


def test_a_private_repos_login_is_kept_while_a_deployment_mounts_it_and_goes_with_its_service(
    k8s: Cluster, client: Client, prefix: str
) -> None:
    where = f"{prefix}bugfix"
    private = "https://deployer:t0ken-3c9a@git.example/app.git"

    def logins() -> dict[str, dict[str, str]]:
        found = client.list(Secret, namespace=where)
        return {
            str(s.metadata.name): {k: base64.b64decode(v).decode() for k, v in s.data.items()}
            for s in found
            if s.metadata and s.data and str(s.metadata.name).endswith("-git")
        }

    async def scenario(world: World) -> None:
        await world.serve(replace(spec("bugfix", "app", 1), repo_url=private))
        await world.serve(replace(spec("bugfix", "app", 2, GREETING="hi"), repo_url=private))
        await world.serve(spec("bugfix", "web", 1))  # a public repo: no login
        assert logins() == {"app-git": {"username": "deployer", "password": "t0ken-3c9a"}}
        await world.runtime.prune("bugfix", "app", {2})
        assert deployments(client, where) == ["app-v2", "web-v1"]
        assert list(logins()) == ["app-git"]  # app-v2 mounts it
        world.traffic.remove("bugfix", "app")
        await world.runtime.discard("bugfix", "app")
        assert deployments(client, where) == ["web-v1"]
        assert logins() == {}

    events = run(k8s, prefix, scenario)
    assert not [e for e in events if "t0ken" in e]


def deployments(client: Client, namespace: str) -> list[str]:
    return sorted(
        d.metadata.name or "" for d in client.list(Deployment, namespace=namespace) if d.metadata
    )


def namespace_exists(client: Client, name: str) -> bool:
    return any(n.metadata and n.metadata.name == name for n in client.list(Namespace))


def test_a_namespace_that_is_not_branchyards_is_never_touched(
    k8s: Cluster, client: Client, prefix: str
) -> None:
    where = f"{prefix}taken"
    client.create(Namespace(metadata=ObjectMeta(name=where, labels={"team": "theirs"})))

    async def scenario(world: World) -> None:
        with pytest.raises(NameTaken) as taken:
            await world.start(spec("taken", "app", 1))
        assert taken.value.message.startswith(
            f"the Kubernetes Namespace {where} exists and is not branchyard's"
        )
        await world.runtime.discard("taken", "app")

    events = run(k8s, prefix, scenario)
    assert any("is not branchyard's" in e for e in events)
    kept = client.get(Namespace, where)
    assert kept.metadata is not None and kept.metadata.labels == {
        "team": "theirs",
        "kubernetes.io/metadata.name": where,
    }
    assert kept.status is not None and kept.status.phase == "Active"
    assert not list(client.list(Deployment, namespace=where))


def test_an_install_cache_claim_an_earlier_daemon_made_otherwise_is_kept_and_said(
    k8s: Cluster, client: Client, prefix: str
) -> None:
    where = f"{prefix}main"

    async def main() -> list[str]:
        events: list[str] = []
        for kind in ("first-class", "another-class"):  # a claim's class cannot change
            options = KubeOptions(
                kubeconfig=str(k8s.kubeconfig),
                namespace_prefix=prefix,
                install_cache=1024**3,
                install_cache_class=kind,
            )
            connection = await Connection.open(options)
            try:
                spaces = Namespaces(connection, options, lambda _, said, __: events.append(said))
                assert await spaces.ensure("main") == where
            finally:
                await connection.close()
        return events

    events = asyncio.run(main())
    claim = client.get(PersistentVolumeClaim, "branchyard-install-cache", namespace=where)
    assert claim.spec is not None and claim.spec.storageClassName == "first-class"
    made, kept = events  # the second: one line, the API server's reason without its diff
    assert made == f"made Namespace {where}"
    assert kept.startswith(
        f"the install cache branchyard-install-cache in {where} is kept as it is: "
        'PersistentVolumeClaim "branchyard-install-cache" is invalid: spec: Forbidden: spec is '
        "immutable after creation"
    )
    assert "\n" not in kept
    client.delete(Namespace, where)


def objects(client: Client, namespace: str) -> dict[str, list[str]]:
    """The uids of the Deployments, ReplicaSets and Services in ``namespace``, by kind."""
    found: dict[str, list[str]] = {}
    for kind in (Deployment, ReplicaSet, Service):
        things: list[Any] = list(client.list(kind, namespace=namespace))
        found[kind.__name__] = sorted(thing.metadata.uid for thing in things)
    return found


def test_a_runtime_after_a_crash_adopts_what_runs_without_duplicates(
    k8s: Cluster, client: Client, prefix: str
) -> None:
    where = f"{prefix}main"

    async def before(world: World) -> None:
        await world.serve(spec("main", "app", 1))

    run(k8s, prefix, before)  # detached at the end, as a daemon killed leaves it
    uids = objects(client, where)

    async def after(world: World) -> None:
        instance = await world.serve(spec("main", "app", 1))
        assert instance.state is InstanceState.RUNNING

    events = run(k8s, prefix, after)
    again = objects(client, where)
    assert again == uids
    assert [len(v) for v in uids.values()] == [1, 1, 1]
    assert not any(e.startswith("made Namespace") for e in events)


def test_weights_without_the_gateway_api_are_a_clear_error(
    k8s: Cluster, client: Client, prefix: str
) -> None:
    async def scenario(world: World) -> None:
        one = await world.serve(spec("main", "app", 1))
        two = await world.start(spec("main", "app", 2, GREETING="hi"))
        why = world.traffic.cannot_split()
        assert why.startswith(
            "weights need the Gateway API (HTTPRoute, gateway.networking.k8s.io), which the "
            "cluster at https://127.0.0.1:"
        )
        with pytest.raises(UsageError) as refused:
            world.traffic.route("main", "app", [(one.address, 90), (two.address, 10)])
        assert refused.value.message == why

    run(k8s, prefix, scenario)
    assert selected(client, f"{prefix}main", "app") == "1"
