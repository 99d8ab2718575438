"""The test cluster's real node (tests/k8s_real_node.py): what it is configured with, as
text rendered from parameters (no root needed), and, on the node itself, that a pod runs
a real python3 HTTP server and is Ready through its probe, that the host reaches it
through a ClusterIP Service (kube-proxy), that pods resolve the cluster's names through
CoreDNS, that a pod's network reaches nothing off the bridge, that the images are there
under their names, that a second node is refused and that a stop leaves nothing behind."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import pytest
from lightkube import Client, KubeConfig
from lightkube.models.core_v1 import (
    Container,
    HTTPGetAction,
    PodSpec,
    Probe,
    ServicePort,
    ServiceSpec,
)
from lightkube.models.meta_v1 import ObjectMeta
from lightkube.resources.core_v1 import Namespace, Node, Pod, Service, ServiceAccount

from tests import k8s_cluster, k8s_real_node
from tests.conftest import Cluster, wait_for
from tests.k8s_cluster import SERVICE_RANGE, ClusterError
from tests.k8s_real_node import (
    BRIDGE,
    GATEWAY,
    IMAGES,
    NODE,
    NODE_NETWORK,
    NODE_SELECTOR,
    POD_NETWORK,
    PYTHON,
    TOLERATION,
    Layout,
    NodePorts,
)

LAYOUT = Layout(Path("/c/node"))
PORTS = NodePorts(21001, 21002, 21003, 21004)

SERVER = """\
import socket, ssl, urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

ACCOUNT = "/var/run/secrets/kubernetes.io/serviceaccount"

def answer(path):
    what, *rest = path.strip("/").split("/")
    try:
        if what == "resolve":
            return socket.gethostbyname(rest[0])
        if what == "connect":
            socket.create_connection((rest[0], int(rest[1])), timeout=3).close()
            return "connected"
    except OSError as error:
        return f"error: {error}"
    if what == "routes":
        return open("/proc/net/route").read()
    if what == "version":  # the API server's, as a pod asks it
        context = ssl.create_default_context(cafile=f"{ACCOUNT}/ca.crt")
        url = "https://kubernetes.default.svc/version"
        return urllib.request.urlopen(url, context=context, timeout=5).read().decode()
    return "hello from " + socket.gethostname()

class Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_GET(self):
        body = answer(self.path).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

print("serving on 8080", flush=True)
ThreadingHTTPServer(("0.0.0.0", 8080), Handler).serve_forever()
"""


def cni() -> dict[str, Any]:
    plugins: list[dict[str, Any]] = json.loads(k8s_real_node.cni_config(LAYOUT))["plugins"]
    return plugins[0]


@pytest.mark.parametrize(
    ("field", "expected"),
    [
        ("type", "bridge"),
        ("bridge", BRIDGE),
        ("isGateway", True),
        ("isDefaultGateway", False),  # no default route in a pod
        ("ipMasq", False),  # no NAT to the outside
    ],
)
def test_the_cni_bridge_gives_pods_no_way_out(field: str, expected: object) -> None:
    assert cni()[field] == expected


def test_a_pods_routes_are_the_pod_and_service_ranges_only() -> None:
    ipam = cni()["ipam"]
    assert ipam["routes"] == [{"dst": POD_NETWORK}, {"dst": SERVICE_RANGE}]
    assert ipam["ranges"] == [[{"subnet": NODE_NETWORK, "gateway": GATEWAY}]]
    assert "0.0.0.0/0" not in k8s_real_node.cni_config(LAYOUT)


def test_the_ruleset_drops_what_would_be_forwarded_between_the_bridge_and_another_interface() -> (
    None
):
    rules = [line.strip() for line in k8s_real_node.nft_ruleset().splitlines()]
    assert "table inet branchyard_test_node {" in rules
    assert "type filter hook forward priority filter - 10; policy accept;" in rules
    assert f'iifname "{BRIDGE}" oifname != "{BRIDGE}" drop' in rules
    assert f'oifname "{BRIDGE}" iifname != "{BRIDGE}" drop' in rules


@pytest.mark.parametrize(
    ("field", "expected"),
    [
        ("address", GATEWAY),  # its API on the bridge only
        ("readOnlyPort", 0),
        ("healthzBindAddress", "127.0.0.1"),
        ("healthzPort", 21001),
        ("clusterDNS", [GATEWAY]),
        ("clusterDomain", "cluster.local"),
        ("resolvConf", ""),  # no name of the host's in a pod
        ("cgroupDriver", "cgroupfs"),
        ("failCgroupV1", False),
        ("failSwapOn", False),
        ("makeIPTablesUtilChains", False),
        ("containerRuntimeEndpoint", "unix:///c/node/containerd/containerd.sock"),
        ("authorization", {"mode": "Webhook"}),
        ("imageGCHighThresholdPercent", 100),  # the loaded images stay
    ],
)
def test_the_kubelet_configuration(field: str, expected: object) -> None:
    assert json.loads(k8s_real_node.kubelet_config(LAYOUT, PORTS))[field] == expected


def test_the_kubelet_lets_in_no_anonymous_client() -> None:
    authentication = json.loads(k8s_real_node.kubelet_config(LAYOUT, PORTS))["authentication"]
    assert authentication["anonymous"] == {"enabled": False}
    assert authentication["x509"] == {"clientCAFile": "/c/node/pki/ca.crt"}


@pytest.mark.parametrize(
    ("field", "expected"),
    [
        ("mode", "nftables"),
        ("hostnameOverride", NODE),
        ("masqueradeAll", True),
        ("nodePortAddresses", [NODE_NETWORK]),
        ("healthzBindAddress", "127.0.0.1:21002"),
        ("metricsBindAddress", "127.0.0.1:21003"),
        ("clientConnection", {"kubeconfig": "/c/kube-proxy.kubeconfig"}),
    ],
)
def test_the_kube_proxy_configuration(field: str, expected: object) -> None:
    assert json.loads(k8s_real_node.kube_proxy_config(Path("/c"), PORTS))[field] == expected


@pytest.mark.parametrize(
    "line",
    [
        'sandbox_image = "branchyard.test/pause:3.10"',
        "restrict_oom_score_adj = true",  # root here lacks CAP_SYS_RESOURCE
        'address = "/c/node/containerd/containerd.sock"',
        'root = "/c/node/containerd/root"',
        'state = "/c/node/containerd/state"',
        'conf_dir = "/c/node/cni/conf"',
    ],
)
def test_containerd_runs_on_its_own_configuration(line: str) -> None:
    assert line in [text.strip() for text in k8s_real_node.containerd_config(LAYOUT).splitlines()]


def test_the_api_server_is_forwarded_from_the_gateway_only() -> None:
    assert k8s_real_node.forwarder(6443) == [
        "socat",
        f"TCP-LISTEN:6443,bind={GATEWAY},reuseaddr,fork",
        "TCP:127.0.0.1:6443",
    ]
    endpoints = k8s_real_node.api_endpoints(6443)
    assert [e.addresses for e in endpoints.endpoints or ()] == [[GATEWAY]]
    assert [(p.name, p.port) for p in endpoints.ports or ()] == [("https", 6443)]


def test_coredns_answers_on_the_gateway_and_forwards_nothing() -> None:
    corefile = k8s_real_node.corefile(Path("/c"), PORTS)
    assert f"bind {GATEWAY}" in corefile
    assert "ready 127.0.0.1:21004" in corefile
    assert "kubeconfig /c/coredns.kubeconfig branchyard-test" in corefile
    assert "forward" not in corefile


@pytest.mark.parametrize(
    ("owner", "owner_runs", "refusal"),
    [
        (None, False, None),
        ("/elsewhere", False, None),  # a node that did not stop: cleaned up, then started
        ("/here", False, None),
        ("/here", True, "the real node already runs for /here"),
        (
            "/elsewhere",
            True,
            "a real node already runs on this machine, for the cluster in /elsewhere: "
            "stop it first",
        ),
    ],
)
def test_one_real_node_per_machine(
    owner: str | None, owner_runs: bool, refusal: str | None
) -> None:
    assert k8s_real_node.claim_refusal(owner, Path("/here"), owner_runs) == refusal


@pytest.mark.parametrize(
    ("uid", "lacking", "plugins", "problem"),
    [
        (0, set(), True, None),
        (1000, set(), True, "the real node needs root (network, mounts, cgroups)"),
        (
            0,
            {"ctr", "mmdebstrap"},
            True,
            "the real node needs Debian's containerd, mmdebstrap: run scripts/setup",
        ),
        (
            0,
            {"nsenter", "unshare"},
            True,
            "the real node needs Debian's util-linux: run scripts/setup",
        ),
        (
            0,
            {"socat"},
            False,
            "the real node needs Debian's containernetworking-plugins, socat: run scripts/setup",
        ),
    ],
)
def test_what_the_node_needs(
    uid: int, lacking: set[str], plugins: bool, problem: str | None
) -> None:
    found = k8s_real_node.node_problem(uid, lambda command: command not in lacking, plugins)
    assert found == problem


def test_an_image_archive_is_an_oci_layout_that_names_the_image() -> None:
    documents = k8s_real_node.oci_documents(PYTHON, "ab" * 32, 1234)
    index = json.loads(documents["index.json"])
    (entry,) = index["manifests"]
    assert entry["annotations"]["io.containerd.image.name"] == "branchyard.test/python:3.11"
    for name, content in documents.items():
        if name.startswith("blobs/sha256/"):
            assert name.removeprefix("blobs/sha256/") == hashlib.sha256(content).hexdigest()
    manifest = json.loads(documents[f"blobs/sha256/{entry['digest'].removeprefix('sha256:')}"])
    assert manifest["layers"][0]["digest"] == f"sha256:{'ab' * 32}"
    assert manifest["layers"][0]["size"] == 1234
    config = json.loads(documents[f"blobs/sha256/{manifest['config']['digest'][7:]}"])
    assert config["rootfs"]["diff_ids"] == [f"sha256:{'ab' * 32}"]
    assert config["config"]["Cmd"] == ["python3"]


def test_the_images_archives_are_keyed_by_what_makes_them() -> None:
    keys = {image.key() for image in IMAGES}
    assert len(keys) == len(IMAGES)
    other = k8s_real_node.Image(PYTHON.name, (*PYTHON.packages, "curl"), PYTHON.command)
    assert other.key() not in keys


@dataclass(frozen=True)
class Served:
    """A pod on the real node serving SERVER, behind the Service ``web``."""

    client: Client
    namespace: str
    pod_ip: str
    cluster_ip: str


def pod(name: str, labels: dict[str, str]) -> Pod:
    probe = Probe(httpGet=HTTPGetAction(path="/", port=8080), periodSeconds=1)
    web = Container(
        name="web",
        image=PYTHON.name,
        imagePullPolicy="Never",
        command=["python3", "-c", SERVER],
        readinessProbe=probe,
    )
    spec = PodSpec(
        tolerations=[TOLERATION],
        nodeSelector=NODE_SELECTOR,
        terminationGracePeriodSeconds=1,
        containers=[web],
    )
    return Pod(metadata=ObjectMeta(name=name, labels=labels), spec=spec)


def service(name: str, selector: dict[str, str]) -> Service:
    ports = [ServicePort(port=80, targetPort=8080)]
    return Service(metadata=ObjectMeta(name=name), spec=ServiceSpec(selector=selector, ports=ports))


def ready_ip(client: Client, name: str, namespace: str) -> str:
    def ready() -> str:
        found = client.get(Pod, name, namespace=namespace)
        conditions = (found.status.conditions if found.status else None) or ()
        is_ready = any(c.type == "Ready" and c.status == "True" for c in conditions)
        return (found.status.podIP or "") if is_ready and found.status else ""

    return wait_for(ready, 120, f"pod {name} Ready")


def get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as answer:
        return str(answer.read().decode())


@pytest.fixture(scope="module")
def served(k8s_real: Cluster) -> Iterator[Served]:
    with Client(config=KubeConfig.from_file(k8s_real.kubeconfig)) as client:
        namespace = f"t-{uuid.uuid4().hex[:8]}"
        client.create(Namespace(metadata=ObjectMeta(name=namespace)))
        accounts = partial(client.list, ServiceAccount, namespace=namespace)
        wait_for(lambda: any(True for _ in accounts()), 30, "the default ServiceAccount")
        client.create(pod("web", {"app": "web"}), namespace=namespace)
        made = client.create(service("web", {"app": "web"}), namespace=namespace)
        cluster_ip = made.spec.clusterIP if made.spec else None
        assert cluster_ip
        try:
            yield Served(client, namespace, ready_ip(client, "web", namespace), cluster_ip)
        finally:
            client.delete(Namespace, namespace)


@pytest.mark.k8s
@pytest.mark.integration
@pytest.mark.timeout(300)  # the first test on the node starts the cluster and the node
def test_a_pod_on_the_real_node_serves_http_and_is_ready_through_its_readiness_probe(
    served: Served,
) -> None:
    found = served.client.get(Pod, "web", namespace=served.namespace)
    assert found.spec is not None and found.spec.nodeName == NODE
    assert found.status is not None and found.status.containerStatuses is not None
    (status,) = found.status.containerStatuses
    assert status.ready and status.started and status.state and status.state.running
    assert served.pod_ip.startswith("10.244.128.")
    assert get(f"http://{served.pod_ip}:8080/") == "hello from web"


@pytest.mark.k8s
@pytest.mark.integration
def test_a_pods_log_is_read_through_the_api_server_from_its_kubelet(served: Served) -> None:
    lines = served.client.log("web", namespace=served.namespace, container="web")
    assert list(lines) == ["serving on 8080\n"]


@pytest.mark.k8s
@pytest.mark.integration
def test_the_host_reaches_the_pod_through_its_cluster_ip_service(served: Served) -> None:
    url = f"http://{served.cluster_ip}/"
    assert wait_for(lambda: get(url) == "hello from web", 30, f"{url} answered by web")


@pytest.mark.k8s
@pytest.mark.integration
def test_a_pod_resolves_the_api_and_another_service_by_cluster_dns(served: Served) -> None:
    other = served.client.create(service("other", {"app": "none"}), namespace=served.namespace)
    address = other.spec.clusterIP if other.spec else None
    resolve = f"http://{served.pod_ip}:8080/resolve"
    assert get(f"{resolve}/kubernetes.default.svc.cluster.local") == "10.96.0.1"
    names = [f"other.{served.namespace}.svc.cluster.local", "other"]  # and by its short name
    for name in names:
        assert wait_for(partial(lambda url: get(url) == address, f"{resolve}/{name}"), 30, name)
    assert get(f"{resolve}/deb.debian.org").startswith("error: ")  # nothing forwarded


@pytest.mark.k8s
@pytest.mark.integration
def test_a_pod_reaches_the_api_server_as_kubernetes_default_svc(served: Served) -> None:
    version = json.loads(get(f"http://{served.pod_ip}:8080/version"))  # its certificate checked
    assert version["gitVersion"] == "v1.37.2"


@pytest.mark.k8s
@pytest.mark.integration
def test_a_pods_network_reaches_nothing_off_the_bridge(served: Served) -> None:
    routes = get(f"http://{served.pod_ip}:8080/routes").splitlines()[1:]
    destinations = {line.split()[1] for line in routes}
    assert "00000000" not in destinations  # no default route
    assert destinations == {"0000F40A", "0080F40A", "0000600A"}  # 10.244/16, its /24, 10.96/16
    addresses = json.loads(subprocess.run(["ip", "-j", "-4", "address"], capture_output=True,
                                          text=True, check=True).stdout)  # fmt: skip
    off_bridge = [
        info["local"]
        for interface in addresses
        if interface["ifname"] not in ("lo", BRIDGE)
        for info in interface["addr_info"]
    ]
    for address in off_bridge:  # this machine's own, on another interface
        said = get(f"http://{served.pod_ip}:8080/connect/{address}/22")
        assert said == "error: [Errno 101] Network is unreachable", (address, said)
    ruleset = subprocess.run(
        ["nft", "list", "table", "inet", "branchyard_test_node"], capture_output=True, text=True
    ).stdout
    assert f'iifname "{BRIDGE}" oifname != "{BRIDGE}" drop' in ruleset


@pytest.mark.k8s
@pytest.mark.integration
def test_the_images_are_there_under_their_names(served: Served) -> None:
    node = served.client.get(Node, NODE)
    assert node.status is not None
    names = {name for image in node.status.images or () for name in image.names or ()}
    assert {image.name for image in IMAGES} <= names


@pytest.mark.k8s
@pytest.mark.integration
def test_a_second_real_node_is_refused_in_one_line(k8s_real: Cluster, tmp_path: Path) -> None:
    with pytest.raises(ClusterError) as refused:
        k8s_real_node.start(tmp_path / "other")
    assert str(refused.value) == (
        f"a real node already runs on this machine, for the cluster in "
        f"{k8s_real.directory.resolve()}: stop it first"
    )


@pytest.mark.k8s
@pytest.mark.integration
@pytest.mark.timeout(300)
def test_a_stop_leaves_nothing_behind_and_the_node_starts_again(
    k8s_real: Cluster, served: Served
) -> None:
    sysctls = {name: k8s_real_node.sysctl_file(name).read_text() for name in k8s_real_node.SYSCTLS}
    saved = json.loads((k8s_real.directory / "node" / "sysctls.json").read_text())
    assert k8s_real_node.stop(k8s_real.directory) == [
        "containerd",
        "kubelet",
        "kube-proxy",
        "coredns",
        "socat",
    ]
    assert k8s_real_node.left_behind(k8s_real.directory) == []
    assert {name: value.strip() for name, value in sysctls.items()} != saved  # changed
    for name, value in saved.items():
        assert k8s_real_node.sysctl_file(name).read_text().strip() == value
    assert not Path(f"/sys/class/net/{BRIDGE}").exists()
    assert not k8s_real_node.MARKER.exists()
    k8s_real_node.start(k8s_real.directory)
    assert ready_ip(served.client, "web", served.namespace).startswith("10.244.128.")


def test_a_build_where_the_node_cannot_be_built_exits_4_in_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(k8s_cluster, "build", lambda: Path("/cache/bin"))
    monkeypatch.setattr(os, "getuid", lambda: 1000)
    assert k8s_cluster.main(["build"]) == 4
    out, err = capsys.readouterr()
    assert out == "/cache/bin\n"  # the control plane is built all the same
    assert err == "k8s-test-cluster: the real node needs root (network, mounts, cgroups)\n"
