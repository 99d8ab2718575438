"""Weights and the Ingress on Kubernetes, end to end: the real daemon (``up --runtime
kubernetes``), real git repos pushed to, the real CLI and the test control plane's API
server, with the Gateway API's CRDs (the ``gateway_api`` fixture, installed before the
daemon connects) and without them, with a domain and without."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import pytest
from lightkube import ApiError, Client, KubeConfig
from lightkube.resources.core_v1 import Namespace
from lightkube.resources.networking_v1 import Ingress

from branchyard.runtime.kube.render import HTTPRoute
from tests.conftest import (
    Cluster,
    Daemon,
    ServiceRepo,
    free_port,
    start_daemon,
    stop_cleanly,
    wait_for,
)
from tests.test_kube_workflow import OTHER, names_of, replicas, repo_files, services

pytestmark = [pytest.mark.k8s, pytest.mark.integration, pytest.mark.timeout(300)]

DOMAIN = "preview.example.com"


@pytest.fixture(scope="module")
def client(k8s: Cluster) -> Iterator[Client]:
    with Client(config=KubeConfig.from_file(k8s.kubeconfig)) as opened:
        yield opened


@dataclass
class Kube:
    """A test's side of the cluster: its Namespaces' prefix, a client, its repos, and
    the daemon it starts (:meth:`start`)."""

    cluster: Cluster
    client: Client
    home: Path
    make_repo: Callable[..., ServiceRepo]
    prefix: str = field(default_factory=lambda: f"x{uuid.uuid4().hex[:6]}-")
    started: list[Daemon] = field(default_factory=list)

    def start(self, *extra: str) -> Daemon:
        """The daemon on the test cluster, with more options if given."""
        daemon = start_daemon(
            self.home,
            "--poll-interval", "1", "--drain-grace", "0", "--runtime", "kubernetes",
            "--kubeconfig", str(self.cluster.kubeconfig), "--namespace-prefix", self.prefix,
            "--build-timeout", "1", "--git-listen", "127.0.0.1:0", *extra,
        )  # fmt: skip
        self.started.append(daemon)
        return daemon

    def where(self, namespace: str) -> str:
        """The Kubernetes Namespace of a branchyard namespace."""
        return self.prefix + namespace

    def services(self, namespace: str = "main") -> dict[str, str]:
        return services(self.client, self.where(namespace))


@pytest.fixture
def kube(
    k8s: Cluster, client: Client, tmp_path: Path, make_repo: Callable[..., ServiceRepo]
) -> Iterator[Kube]:
    """At the test's end, its daemons are stopped (cleanly: exit 0, no traceback) and
    its Namespaces deleted (a daemon that stops leaves what it made running)."""
    made = Kube(k8s, client, tmp_path / "home", make_repo)
    yield made
    for daemon in made.started:
        stop_cleanly(daemon)
    for namespace in client.list(Namespace):
        name = namespace.metadata.name if namespace.metadata else None
        if name and name.startswith(made.prefix):
            client.delete(Namespace, name)


def live(daemon: Daemon, namespace: str, service: str) -> int | None:
    found: dict[str, Any] | None = daemon.row(namespace, service)["live"]
    return None if found is None else int(found["ordinal"])


def serves(daemon: Daemon, service: str, ordinal: int) -> bool:
    return live(daemon, "main", service) == ordinal


def deploy(daemon: Daemon, repo: ServiceRepo, revisions: int) -> None:
    """Add ``repo`` and push until its revision ``revisions`` serves in main."""
    daemon.cli("repo", "add", str(repo.origin))
    for ordinal in range(1, revisions + 1):
        if ordinal > 1:
            repo.commit({"change.txt": str(ordinal)}, f"change {ordinal}")
            repo.push()
        wait_for(partial(serves, daemon, repo.name, ordinal), 60, f"v{ordinal} live")


def route(client: Client, namespace: str, name: str) -> dict[str, Any] | None:
    """The HTTPRoute ``name``'s spec, or None if there is none."""
    try:
        found = client.get(HTTPRoute, name, namespace=namespace)
    except ApiError as exc:
        if exc.status.code == 404:
            return None
        raise
    spec: dict[str, Any] = found["spec"]
    return spec


def backends(client: Client, namespace: str, name: str) -> dict[str, int]:
    """Backend Service -> weight of the HTTPRoute ``name`` (nothing without one)."""
    spec = route(client, namespace, name)
    rules = spec["rules"] if spec else []
    return {ref["name"]: ref["weight"] for rule in rules for ref in rule["backendRefs"]}


def test_weights_without_the_gateway_api_are_refused_changing_nothing(kube: Kube) -> None:
    where = kube.where("main")
    daemon = kube.start()
    deploy(daemon, kube.make_repo("app", repo_files()), 2)
    done = daemon.cli("weight", "app", "v1=80", "v2=20", check=False)
    assert done.returncode == 1
    assert done.stdout == ""
    assert done.stderr == (
        "error: weights need the Gateway API (HTTPRoute, gateway.networking.k8s.io), "
        f"which the cluster at {server(kube.cluster)} does not serve; install its CRDs and a "
        "GAMMA implementation, then restart branchyard\n"
    )
    row = daemon.row("main", "app")
    assert (row["pinned"], row["weights"], row["state"]) == (None, {"2": 100}, "live")
    assert kube.services() == {"app": "2"}
    assert replicas(kube.client, where, "app-v1") == 0  # never started again
    kinds = [line.split()[2] for line in daemon.cli("events").stdout.splitlines()]
    assert "live" in kinds and "weight" not in kinds


def server(k8s: Cluster) -> str:
    config = KubeConfig.from_file(k8s.kubeconfig).get()
    assert config is not None
    return config.cluster.server


@pytest.mark.usefixtures("gateway_api")
def test_weights_are_an_httproute_over_a_service_per_revision_until_one_revision_serves(
    kube: Kube,
) -> None:
    where = kube.where("main")
    daemon = kube.start()
    deploy(daemon, kube.make_repo("app", repo_files()), 3)

    # a split with the live revision: a Service per revision, the route's backends carry
    # the weights, the Service app selects the heaviest (for the Ingress)
    said = daemon.cli("weight", "app", "v2=20", "v3=80").stdout
    assert said == "main:app traffic: v2=20 v3=80 (pinned)\n"
    split = {"app-v2": 20, "app-v3": 80}
    wait_for(lambda: backends(kube.client, where, "app") == split, 60, "the route 20/80")
    spec = route(kube.client, where, "app")
    assert spec is not None and spec["parentRefs"] == [
        {"group": "", "kind": "Service", "name": "app", "port": 80}
    ]
    assert kube.services() == {"app": "3", "app-v2": "2", "app-v3": "3"}
    assert daemon.row("main", "app")["weights"] == {"2": 20, "3": 80}

    # a new weight: the route follows, the Service of the revision it left goes
    daemon.cli("weight", "app", "v1=60", "v2=40")
    wait_for(
        lambda: backends(kube.client, where, "app") == {"app-v1": 60, "app-v2": 40}, 60, "60/40"
    )
    wait_for(lambda: "app-v3" not in kube.services(), 60, "app-v3's Service gone")
    assert kube.services() == {"app": "1", "app-v1": "1", "app-v2": "2"}
    wait_for(lambda: replicas(kube.client, where, "app-v3") == 0, 60, "v3 out of the split")

    # one revision again: no route, no Service per revision
    daemon.cli("promote", "app", "v1")
    wait_for(lambda: route(kube.client, where, "app") is None, 60, "the route deleted")
    wait_for(lambda: kube.services() == {"app": "1"}, 60, "one Service")
    assert daemon.row("main", "app")["weights"] == {"1": 100}
    wait_for(lambda: replicas(kube.client, where, "app-v2") == 0, 60, "v2 out of traffic")


@pytest.mark.usefixtures("gateway_api")
def test_a_split_a_daemon_left_goes_once_the_next_one_serves_the_pin_alone(kube: Kube) -> None:
    where = kube.where("main")
    port = f"127.0.0.1:{free_port()}"  # the same for both: pods' templates stay the same
    daemon = kube.start("--git-listen", port)
    deploy(daemon, kube.make_repo("app", repo_files()), 2)
    daemon.cli("weight", "app", "v1=30", "v2=70")
    wait_for(lambda: backends(kube.client, where, "app") == {"app-v1": 30, "app-v2": 70}, 60)

    # a restart keeps the pin and drops the split: the route and the Services per
    # revision the daemon before made go too (it was killed: it could clean up nothing)
    daemon.kill()
    kube.started.remove(daemon)
    assert backends(kube.client, where, "app") == {"app-v1": 30, "app-v2": 70}
    again = kube.start("--git-listen", port)
    wait_for(lambda: route(kube.client, where, "app") is None, 60, "the route deleted")
    wait_for(lambda: kube.services() == {"app": "2"}, 60, "one Service, on the pin")
    assert again.row("main", "app")["weights"] == {"2": 100}


def hosts(client: Client, namespace: str) -> dict[str, tuple[str, str, str]]:
    """Ingress name -> (its host, its class, the Service it sends to)."""
    found = {}
    for entry in client.list(Ingress, namespace=namespace):
        assert entry.metadata is not None and entry.spec is not None and entry.spec.rules
        (rule,) = entry.spec.rules
        assert rule.host is not None and rule.http is not None
        (path,) = rule.http.paths
        assert path.path == "/" and path.backend.service is not None
        assert path.backend.service.port is not None and path.backend.service.port.number == 80
        found[entry.metadata.name or ""] = (
            rule.host,
            entry.spec.ingressClassName or "",
            path.backend.service.name,
        )
    return found


def test_with_a_domain_each_service_has_an_ingress_and_its_url(kube: Kube) -> None:
    main, bugfix = kube.where("main"), kube.where("bugfix")
    daemon = kube.start("--domain", DOMAIN, "--ingress-class", "nginx")
    deploy(daemon, kube.make_repo("other_app", repo_files()), 1)
    app = kube.make_repo("app", repo_files())
    deploy(daemon, app, 1)
    app.checkout("bugfix")
    app.commit({"change.txt": "1"}, "app on bugfix")
    app.push()
    wait_for(lambda: live(daemon, "bugfix", "app") == 1, 60, "app in bugfix")

    wanted = {
        "app": (f"app.main.{DOMAIN}", "nginx", "app"),
        OTHER: (f"other-app.main.{DOMAIN}", "nginx", OTHER),
    }
    wait_for(lambda: hosts(kube.client, main) == wanted, 60, "the baseline's Ingresses")
    # other_app in bugfix is an ExternalName fallback: no Ingress of its own
    wait_for(lambda: kube.services("bugfix") == {"app": "1", OTHER: "external"}, 60, "bugfix")
    assert hosts(kube.client, bugfix) == {"app": (f"app.bugfix.{DOMAIN}", "nginx", "app")}

    assert daemon.cli("-n", "bugfix", "url", "app").stdout == f"http://app.bugfix.{DOMAIN}\n"
    assert daemon.cli("url", "other_app").stdout == f"http://other-app.main.{DOMAIN}\n"
    urls = {(r["namespace"], r["service"]): r["url"] for r in daemon.ps_json("-A")}
    assert urls == {
        ("main", "app"): f"http://app.main.{DOMAIN}",
        ("main", "other_app"): f"http://other-app.main.{DOMAIN}",
        ("bugfix", "app"): f"http://app.bugfix.{DOMAIN}",
    }


def test_without_a_domain_no_ingress_is_made_and_the_url_is_the_in_cluster_name(kube: Kube) -> None:
    where = kube.where("main")
    daemon = kube.start()
    deploy(daemon, kube.make_repo("other_app", repo_files()), 1)
    in_cluster = f"http://{OTHER}.{where}.svc.cluster.local"
    assert daemon.cli("url", "other_app").stdout == f"{in_cluster}\n"
    assert daemon.row("main", "other_app")["url"] == in_cluster
    assert kube.services() == {OTHER: "1"}
    assert names_of(kube.client, Ingress, where) == []
