"""What the test control plane's node (kwok, tests/k8s/kwok.yaml) lets a test decide: how a
container fares, by a mark in its image, command or args, and what its log holds, as a file
the test writes and the API server reads through the node's kubelet API
(docs/kubernetes.md)."""

from __future__ import annotations

import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

from lightkube import ApiError, Client
from lightkube.generic_resource import create_namespaced_resource
from lightkube.models.meta_v1 import ObjectMeta

READY = "sim-ready"  # its readinessProbe passes
CRASH = "sim-crash"  # it exits 1 each time it starts: CrashLoopBackOff
PULL_FAIL = "sim-pull-fail"  # its image cannot be pulled: ErrImagePull, ImagePullBackOff

# kwok's Logs: which file holds the log of a pod's containers.
Logs = create_namespaced_resource("kwok.x-k8s.io", "v1alpha1", "Logs", "logs")
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
    spec = {"logs": [{"containers": list(containers), "logsFile": str(path)}]}
    client.create(Logs(metadata=ObjectMeta(name=pod, namespace=namespace), spec=spec))
    deadline = time.monotonic() + LOGS_SEEN
    container = containers[0] if containers else None
    while True:
        try:
            for _ in client.log(pod, namespace=namespace, container=container):
                pass
            return
        except ApiError:
            if time.monotonic() > deadline:
                raise
        time.sleep(0.1)
