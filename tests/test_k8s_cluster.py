"""The test control plane behaves as a cluster: real API server, controllers and scheduler,
with kwok's node passing a readiness probe only where the test marked the container good
("sim-ready" in its image or command, tests/k8s/kwok.yaml)."""

from __future__ import annotations

import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from lightkube import ApiError, Client, KubeConfig
from lightkube.models.apps_v1 import DeploymentSpec
from lightkube.models.core_v1 import (
    Container,
    HTTPGetAction,
    PodSpec,
    PodTemplateSpec,
    Probe,
    ServicePort,
    ServiceSpec,
)
from lightkube.models.meta_v1 import LabelSelector, ObjectMeta
from lightkube.resources.apps_v1 import Deployment
from lightkube.resources.core_v1 import Namespace, Pod, Service
from lightkube.resources.discovery_v1 import EndpointSlice

from tests import k8s_cluster
from tests.conftest import Cluster, wait_for
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


def web(client: Client, namespace: str, image: str, command: list[str]) -> None:
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
                    metadata=ObjectMeta(labels=labels), spec=PodSpec(containers=[container])
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
