"""What the test control plane's node (kwok, tests/k8s/kwok.yaml) lets a test decide: how a
container fares, by a mark in its image, command or args, and what its log holds, as a file
the test writes and the API server reads through the node's kubelet API
(docs/kubernetes.md)."""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from lightkube import ApiError, Client
from lightkube.generic_resource import create_global_resource, create_namespaced_resource
from lightkube.models.meta_v1 import ObjectMeta

READY = "sim-ready"  # its readinessProbe passes
CRASH = "sim-crash"  # it exits 1 each time it starts: CrashLoopBackOff
PULL_FAIL = "sim-pull-fail"  # its image cannot be pulled: ErrImagePull, ImagePullBackOff

# kwok's Logs: which file holds the log of a pod's containers.
Logs = create_namespaced_resource("kwok.x-k8s.io", "v1alpha1", "Logs", "logs")
# kwok's ClusterLogs: the same, for the pods a selector picks (those to come too).
ClusterLogs = create_global_resource("kwok.x-k8s.io", "v1alpha1", "ClusterLogs", "clusterlogs")
LOGS_SEEN = 60.0  # seconds for kwok to see a new Logs object


def log_line(text: str, stream: str = "stdout") -> str:
    """One line of a container log file in the CRI format a kubelet reads (and kwok too):
    ``TIME STREAM F TEXT``, F for a full line."""
    now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    return f"{now} {stream} F {text}\n"


def write_log(path: Path, lines: Sequence[str], *, append: bool = False) -> None:
    """Write (or append) ``lines`` to a container log file, in the CRI format."""
    with path.open("a" if append else "w") as log:
        log.write("".join(log_line(line) for line in lines))


def give_logs(
    client: Client, namespace: str, pod: str, path: Path, containers: Sequence[str] = ()
) -> None:
    """Make ``path`` the log of the pod's containers (all of them unless named), and wait
    until the API server serves it."""
    entry = {"containers": list(containers), "logsFile": str(path)}
    _give(client, namespace, pod, [entry], containers[0] if containers else None)


def give_container_logs(
    client: Client, namespace: str, pod: str, files: Mapping[str, Path]
) -> None:
    """Make each file the log of its container (``{"web": path, ...}``), and wait until
    the API server serves them."""
    entries = [{"containers": [name], "logsFile": str(path)} for name, path in files.items()]
    _give(client, namespace, pod, entries, next(iter(files)))


@contextmanager
def namespace_logs(
    client: Client, namespace: str, files: Mapping[str, Path], pod: str
) -> Iterator[None]:
    """Make each file the log of its container in every pod of ``namespace``, those made
    later included, until the end of the ``with``; wait until the API server serves them
    for ``pod``, one there now (so that a pod made later has them from its start). No
    files: nothing is given."""
    if not files:
        yield
        return
    entries = [{"containers": [name], "logsFile": str(path)} for name, path in files.items()]
    selector = {"matchNamespaces": [namespace]}
    client.create(
        ClusterLogs(
            metadata=ObjectMeta(name=namespace), spec={"selector": selector, "logs": entries}
        )
    )
    try:
        _served(client, namespace, pod, next(iter(files)))
        yield
    finally:
        client.delete(ClusterLogs, namespace)


def _give(
    client: Client, namespace: str, pod: str, entries: list[dict[str, Any]], container: str | None
) -> None:
    client.create(Logs(metadata=ObjectMeta(name=pod, namespace=namespace), spec={"logs": entries}))
    _served(client, namespace, pod, container)


def _served(client: Client, namespace: str, pod: str, container: str | None) -> None:
    deadline = time.monotonic() + LOGS_SEEN
    while True:
        try:
            for _ in client.log(pod, namespace=namespace, container=container):
                pass
            return
        except ApiError:
            if time.monotonic() > deadline:
                raise
        time.sleep(0.1)
