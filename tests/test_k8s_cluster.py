"""The test control plane behaves as a cluster: real API server, controllers and scheduler,
with kwok's node passing a readiness probe only where the test marked the container good
("sim-ready" in its image or command, tests/k8s/kwok.yaml), failing containers as a kubelet
reports them where the test marked them so, serving pod logs the test writes, and the
Gateway API's CRDs when a test asks for them."""

from __future__ import annotations

import subprocess
import uuid
from collections.abc import Generator, Iterator, Sequence
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from lightkube import ApiError, Client, KubeConfig
from lightkube.generic_resource import create_namespaced_resource
from lightkube.models.apps_v1 import DeploymentSpec
from lightkube.models.core_v1 import (
    Container,
    ContainerStatus,
    HTTPGetAction,
    PodSpec,
    PodStatus,
    PodTemplateSpec,
    Probe,
    ServicePort,
    ServiceSpec,
)
from lightkube.models.meta_v1 import LabelSelector, ObjectMeta
from lightkube.resources.apps_v1 import Deployment
from lightkube.resources.core_v1 import Namespace, Pod, Service
from lightkube.resources.discovery_v1 import EndpointSlice

from tests import k8s_cluster, k8s_crds, k8s_node
from tests.conftest import Cluster, cannot_run, wait_for
from tests.k8s_cluster import NODE, ClusterError

pytestmark = [pytest.mark.k8s, pytest.mark.timeout(300)]  # the first test starts the cluster

GOOD_COMMAND = ["python", "-m", "http.server", "8080"]


@pytest.fixture(scope="module")
def client(k8s: Cluster) -> Iterator[Client]:
    with Client(config=KubeConfig.from_file(k8s.kubeconfig)) as opened:
        yield opened


@pytest.fixture
def namespace(client: Client) -> str:
    name = f"t-{uuid.uuid4().hex[:8]}"
    client.create(Namespace(metadata=ObjectMeta(name=name)))
    return name


def web(
    client: Client,
    namespace: str,
    image: str,
    command: list[str],
    init_containers: Sequence[Container] = (),
) -> None:
    """A Deployment ``web`` of one pod probed on /healthz, and a Service ``web`` for it."""
    labels = {"app": "web"}
    container = Container(
        name="web",
        image=image,
        command=command,
        readinessProbe=Probe(httpGet=HTTPGetAction(path="/healthz", port=8080)),
    )
    client.create(
        Deployment(
            metadata=ObjectMeta(name="web", namespace=namespace),
            spec=DeploymentSpec(
                replicas=1,
                progressDeadlineSeconds=2,
                selector=LabelSelector(matchLabels=labels),
                template=PodTemplateSpec(
                    metadata=ObjectMeta(labels=labels),
                    spec=PodSpec(containers=[container], initContainers=list(init_containers)),
                ),
            ),
        )
    )
    client.create(
        Service(
            metadata=ObjectMeta(name="web", namespace=namespace),
            spec=ServiceSpec(selector=labels, ports=[ServicePort(port=80, targetPort=8080)]),
        )
    )


def condition(client: Client, namespace: str, kind: str) -> tuple[str, str] | None:
    """The status and reason of the Deployment ``web``'s condition ``kind``."""
    status = client.get(Deployment, "web", namespace=namespace).status
    for found in (status.conditions if status else None) or ():
        if found.type == kind:
            return found.status or "", found.reason or ""
    return None


def pod_states(client: Client, namespace: str) -> list[tuple[str, str, str, bool]]:
    """(name, node, phase, ready) of the pods in ``namespace``."""
    states = []
    for pod in client.list(Pod, namespace=namespace):
        conditions = (pod.status.conditions if pod.status else None) or ()
        ready = any(c.type == "Ready" and c.status == "True" for c in conditions)
        phase = (pod.status.phase if pod.status else None) or ""
        node = (pod.spec.nodeName if pod.spec else None) or ""
        name = (pod.metadata.name if pod.metadata else None) or ""
        states.append((name, node, phase, ready))
    return states


def endpoints(client: Client, namespace: str) -> list[tuple[str, bool]]:
    """(pod, ready) of each endpoint the Service ``web``'s EndpointSlices list."""
    listed = []
    slices = client.list(
        EndpointSlice, namespace=namespace, labels={"kubernetes.io/service-name": "web"}
    )
    for endpoint_slice in slices:
        for endpoint in endpoint_slice.endpoints or ():
            pod = endpoint.targetRef.name if endpoint.targetRef else ""
            ready = bool(endpoint.conditions and endpoint.conditions.ready)
            listed.append((pod or "", ready))
    return listed


@pytest.mark.parametrize(
    ("image", "command"),
    [
        ("python:3.11-slim", ["sh", "-c", "exec python -m http.server 8080  # sim-ready"]),
        ("registry.test/web:sim-ready", GOOD_COMMAND),
    ],
    ids=["marked-in-its-command", "marked-in-its-image"],
)
def test_a_deployment_marked_good_becomes_available_and_its_service_lists_its_pod(
    client: Client, namespace: str, image: str, command: list[str]
) -> None:
    web(client, namespace, image, command)
    available = ("True", "MinimumReplicasAvailable")
    wait_for(lambda: condition(client, namespace, "Available") == available, 60, "Available")
    [(pod, node, phase, ready)] = pod_states(client, namespace)
    assert (node, phase, ready) == (NODE, "Running", True)
    wait_for(lambda: endpoints(client, namespace) == [(pod, True)], 60, "the pod as an endpoint")


def test_a_deployment_whose_probe_never_passes_is_never_available(
    client: Client, namespace: str
) -> None:
    web(client, namespace, "python:3.11-slim", GOOD_COMMAND)
    stalled = ("False", "ProgressDeadlineExceeded")
    wait_for(lambda: condition(client, namespace, "Progressing") == stalled, 60, "the deadline")
    assert condition(client, namespace, "Available") == ("False", "MinimumReplicasUnavailable")
    [(pod, node, phase, ready)] = pod_states(client, namespace)
    assert (node, phase, ready) == (NODE, "Running", False)
    wait_for(lambda: endpoints(client, namespace) == [(pod, False)], 60, "the pod, not ready")


def test_a_deleted_namespace_goes_with_what_it_held(client: Client, namespace: str) -> None:
    web(client, namespace, "registry.test/web:sim-ready", GOOD_COMMAND)
    wait_for(lambda: pod_states(client, namespace), 60, "the pod")
    client.delete(Namespace, namespace)

    def gone() -> bool:
        try:
            client.get(Namespace, namespace)
        except ApiError as error:
            return error.status.code == 404
        return False

    wait_for(gone, 120, "the namespace gone")  # its controller emptied it first


def test_the_control_plane_listens_on_loopback_only(k8s: Cluster) -> None:
    inodes: dict[str, str] = {}
    for pid_file in (k8s.directory / "pids").glob("*.pid"):
        fds = Path(f"/proc/{pid_file.read_text().strip()}/fd")
        for fd in fds.iterdir():
            target = fd.readlink().name
            if target.startswith("socket:["):
                inodes[target.removeprefix("socket:[").removesuffix("]")] = pid_file.stem
    listening = set()
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            local, state, inode = fields[1], fields[3], fields[9]
            if state == "0A" and inode in inodes:  # LISTEN
                listening.add((inodes[inode], local.split(":")[0]))
    loopback = {"0100007F", "00000000000000000000000001000000"}  # 127.0.0.1, ::1
    assert {name for name, _ in listening} == {
        "etcd",
        "kube-apiserver",
        "kube-controller-manager",
        "kube-scheduler",
        "kwok",  # the node's kubelet API
    }
    assert {address for _, address in listening} <= loopback, listening


def test_a_start_that_fails_stops_what_it_started(
    k8s_binaries: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    commands, launch = k8s_cluster.commands, k8s_cluster.launch
    launched: dict[str, subprocess.Popen[bytes]] = {}

    def with_a_bad_flag(
        binaries: Path, directory: Path, ports: k8s_cluster.Ports
    ) -> dict[str, list[str]]:
        lines = commands(binaries, directory, ports)
        lines["kube-apiserver"].append("--no-such-flag")
        return lines

    def recorded(directory: Path, name: str, command: list[str]) -> subprocess.Popen[bytes]:
        launched[name] = launch(directory, name, command)
        return launched[name]

    monkeypatch.setattr(k8s_cluster, "commands", with_a_bad_flag)
    monkeypatch.setattr(k8s_cluster, "launch", recorded)
    with pytest.raises(
        ClusterError, match=r"kube-apiserver exited .* unknown flag: --no-such-flag"
    ):
        k8s_cluster.start(tmp_path / "cluster")
    assert list(launched) == ["etcd", "kube-apiserver"]
    assert [process.poll() is None for process in launched.values()] == [False, False]


def test_a_process_whose_first_thread_ended_still_lives_while_another_runs() -> None:
    # As a Go program's exit looks for a moment: its first thread a zombie, the others
    # still running. A stop that waited for the first thread alone went on too soon.
    code = (
        "import ctypes, sys, threading, time\n"
        "threading.Thread(target=lambda: (time.sleep(60), print())).start()\n"
        "print('split', flush=True)\n"
        "ctypes.CDLL(None).pthread_exit(None)\n"
    )
    process = subprocess.Popen(["python3", "-c", code], stdout=subprocess.PIPE)
    try:
        assert process.stdout is not None and process.stdout.readline() == b"split\n"
        leader = Path(f"/proc/{process.pid}/stat")
        wait_for(lambda: leader.read_text().rsplit(")", 1)[1].split()[0] == "Z", 10)
        assert process.poll() is None
        assert k8s_cluster.lives(process.pid)
    finally:
        process.kill()
        process.wait()
    assert not k8s_cluster.lives(process.pid)


def test_init_containers_that_succeed_complete_and_their_pod_becomes_ready(
    client: Client, namespace: str
) -> None:
    fetch = Container(name="fetch", image="python:3.11-slim", command=["git", "clone"])
    web(client, namespace, "registry.test/web:sim-ready", GOOD_COMMAND, [fetch])
    available = ("True", "MinimumReplicasAvailable")
    wait_for(lambda: condition(client, namespace, "Available") == available, 60, "Available")
    [pod] = client.list(Pod, namespace=namespace)
    assert pod.status is not None
    [init] = pod.status.initContainerStatuses or []
    assert init.state is not None and init.state.terminated is not None
    assert (init.name, init.state.terminated.exitCode, init.state.terminated.reason) == (
        "fetch",
        0,
        "Completed",
    )
    assert pod_conditions(pod)["Initialized"] == ("True", "", "")


def bare_pod(
    client: Client,
    namespace: str,
    containers: Sequence[Container],
    init_containers: Sequence[Container] = (),
) -> str:
    """A Pod ``p`` (restartPolicy Always, as a Deployment's); its name."""
    spec = PodSpec(containers=list(containers), initContainers=list(init_containers))
    client.create(Pod(metadata=ObjectMeta(name="p", namespace=namespace), spec=spec))
    return "p"


def pod_status(client: Client, namespace: str, name: str) -> PodStatus:
    status = client.get(Pod, name, namespace=namespace).status
    assert status is not None
    return status


def pod_conditions(pod: Pod) -> dict[str, tuple[str, str, str]]:
    """(status, reason, message) of each of the pod's conditions, by type."""
    conditions = (pod.status.conditions if pod.status else None) or ()
    return {c.type: (c.status, c.reason or "", c.message or "") for c in conditions}


def waiting(status: ContainerStatus) -> tuple[str, str]:
    """(reason, message) of a waiting container."""
    assert status.state is not None and status.state.waiting is not None, status
    return status.state.waiting.reason or "", status.state.waiting.message or ""


def crashed(status: ContainerStatus) -> tuple[int, str]:
    """(exit code, reason) of the container's last run."""
    last = status.lastState.terminated if status.lastState else None
    assert last is not None, status
    return last.exitCode, last.reason or ""


def restarts(client: Client, namespace: str, name: str, init: bool = False) -> int:
    status = pod_status(client, namespace, name)
    [container] = (status.initContainerStatuses if init else status.containerStatuses) or []
    return container.restartCount


def test_a_container_that_keeps_crashing_is_in_crash_loop_back_off_its_restarts_counted(
    client: Client, namespace: str
) -> None:
    crash = Container(name="web", image="python:3.11-slim", command=["sh", "-c", "sim-crash"])
    name = bare_pod(client, namespace, [crash])
    wait_for(lambda: restarts(client, namespace, name) >= 2, 60, "a restart")
    pod = client.get(Pod, name, namespace=namespace)
    assert pod.status is not None and pod.metadata is not None
    [web_status] = pod.status.containerStatuses or []
    reason, message = waiting(web_status)
    assert reason == "CrashLoopBackOff"
    expected = f"restarting failed container=web pod=p_{namespace}({pod.metadata.uid})"
    assert message.startswith("back-off ") and message.endswith(expected), message
    assert crashed(web_status) == (1, "Error")
    assert (web_status.ready, web_status.started) == (False, False)
    assert pod.status.phase == "Running"  # restartPolicy Always: it is restarted
    unready = ("False", "ContainersNotReady", "containers with unready status: [web]")
    assert pod_conditions(pod)["Ready"] == unready


def test_an_image_that_cannot_be_pulled_is_in_image_pull_back_off(
    client: Client, namespace: str
) -> None:
    image = "registry.test/web:sim-pull-fail"
    name = bare_pod(client, namespace, [Container(name="web", image=image)])

    def reason() -> str:
        [web_status] = pod_status(client, namespace, name).containerStatuses or []
        return waiting(web_status)[0]

    wait_for(lambda: reason() == "ImagePullBackOff", 60, "ImagePullBackOff")
    pod = client.get(Pod, name, namespace=namespace)
    assert pod.status is not None
    [web_status] = pod.status.containerStatuses or []
    _, message = waiting(web_status)
    assert message.startswith(f'Back-off pulling image "{image}": ErrImagePull: '), message
    assert (web_status.restartCount, web_status.imageID, web_status.started) == (0, "", False)
    assert pod.status.phase == "Pending"
    unready = ("False", "ContainersNotReady", "containers with unready status: [web]")
    assert pod_conditions(pod)["Ready"] == unready


def test_an_init_container_that_fails_keeps_its_pod_initializing(
    client: Client, namespace: str
) -> None:
    fetch = Container(name="fetch", image="python:3.11-slim", args=["sim-crash"])
    app = Container(name="web", image="registry.test/web:sim-ready")
    name = bare_pod(client, namespace, [app], init_containers=[fetch])
    wait_for(lambda: restarts(client, namespace, name, init=True) >= 2, 60, "a restart")
    pod = client.get(Pod, name, namespace=namespace)
    assert pod.status is not None
    [init] = pod.status.initContainerStatuses or []
    assert waiting(init)[0] == "CrashLoopBackOff"  # kubectl: Init:CrashLoopBackOff
    assert crashed(init) == (1, "Error")
    [web_status] = pod.status.containerStatuses or []
    assert waiting(web_status) == ("PodInitializing", "")
    assert pod.status.phase == "Pending"
    incomplete = ("False", "ContainersNotInitialized", "containers with incomplete status: [fetch]")
    assert pod_conditions(pod)["Initialized"] == incomplete


def test_a_pods_log_is_the_file_the_test_writes_and_following_it_sees_a_line_added_later(
    client: Client, namespace: str, tmp_path: Path
) -> None:
    name = bare_pod(client, namespace, [Container(name="web", image="python:3.11-slim")])
    wait_for(lambda: pod_status(client, namespace, name).phase == "Running", 60, "Running")
    log = tmp_path / "web.log"
    k8s_node.write_log(log, ["serving on 8080", "GET / 200"])
    k8s_node.give_logs(client, namespace, name, log)
    read = list(client.log(name, namespace=namespace, container="web"))
    assert read == ["serving on 8080\n", "GET / 200\n"]
    followed = client.log(name, namespace=namespace, container="web", follow=True)
    assert isinstance(followed, Generator)  # closed at the end, ending the stream
    try:
        assert [next(followed), next(followed)] == read
        k8s_node.write_log(log, ["GET /later 200"], append=True)
        assert next(followed) == "GET /later 200\n"
    finally:
        followed.close()


HTTPRoute = create_namespaced_resource("gateway.networking.k8s.io", "v1", "HTTPRoute", "httproutes")


def route_spec(backend: dict[str, Any]) -> dict[str, Any]:
    """An HTTPRoute's spec: host web.example.test to a canary split of web-v1 and ``backend``."""
    stable = {"name": "web-v1", "port": 80, "weight": 90}
    return {
        "parentRefs": [{"name": "gateway"}],
        "hostnames": ["web.example.test"],
        "rules": [{"backendRefs": [stable, backend]}],
    }


CANARY = {"name": "web-v2", "port": 80, "weight": 10}
BAD_BACKENDS = [
    {"name": "web-v2", "port": 80, "wieght": 10},  # a misspelt field
    {"name": "web-v2", "port": 80, "weight": -1},
    {"name": "web-v2", "port": 80, "weight": "10"},
]


def route(namespace: str, backend: dict[str, Any]) -> Any:
    """The HTTPRoute ``web`` of ``route_spec(backend)``, as lightkube sends it."""
    return HTTPRoute(metadata=ObjectMeta(name="web", namespace=namespace), spec=route_spec(backend))


def route_document(spec: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": "HTTPRoute",
        "metadata": {"name": "web", "namespace": "t"},
        "spec": spec,
    }


def test_with_the_gateway_api_a_weighted_httproute_is_accepted_and_a_wrong_one_rejected(
    client: Client, namespace: str, gateway_api: None
) -> None:
    client.apply(route(namespace, CANARY), field_manager="branchyard")
    stored = client.get(HTTPRoute, "web", namespace=namespace)
    [rule] = stored["spec"]["rules"]
    weights = [(ref["name"], ref["weight"]) for ref in rule["backendRefs"]]
    assert weights == [("web-v1", 90), ("web-v2", 10)]
    for bad in BAD_BACKENDS:
        with pytest.raises(ApiError):
            client.apply(route(namespace, bad), field_manager="branchyard")
    assert client.get(HTTPRoute, "web", namespace=namespace)["spec"] == stored["spec"]


def test_an_httproute_validates_offline_against_its_crd_schema() -> None:
    schema = k8s_crds.gateway_api_schema("HTTPRoute")
    jsonschema.validate(route_document(route_spec(CANARY)), schema)


@pytest.mark.parametrize(
    "backend", BAD_BACKENDS, ids=["a-misspelt-field", "a-negative-weight", "a-string-weight"]
)
def test_a_wrong_httproute_fails_offline_against_its_crd_schema(backend: dict[str, Any]) -> None:
    schema = k8s_crds.gateway_api_schema("HTTPRoute")
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(route_document(route_spec(backend)), schema)


def test_once_the_gateway_api_is_removed_the_api_serves_no_httproutes(k8s: Cluster) -> None:
    group = "gateway.networking.k8s.io/v1"
    assert k8s_crds.served(k8s.kubeconfig, group) == []
    k8s_crds.install_gateway_api(k8s.kubeconfig)
    try:
        assert {"gatewayclasses", "gateways", "httproutes"} <= set(
            k8s_crds.served(k8s.kubeconfig, group)
        )
    finally:
        k8s_crds.remove_gateway_api(k8s.kubeconfig)
    assert k8s_crds.served(k8s.kubeconfig, group) == []


@pytest.mark.parametrize(
    ("ci", "outcome"),
    [("true", pytest.fail.Exception), (None, pytest.skip.Exception), ("1", pytest.skip.Exception)],
)
def test_a_test_that_cannot_run_is_skipped_but_fails_in_ci(
    monkeypatch: pytest.MonkeyPatch, ci: str | None, outcome: type[BaseException]
) -> None:
    if ci is None:
        monkeypatch.delenv("CI", raising=False)
    else:
        monkeypatch.setenv("CI", ci)
    with pytest.raises(outcome, match=r"^go is not on the PATH"):
        cannot_run("go is not on the PATH")
