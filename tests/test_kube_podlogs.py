"""Which log of a revision there is to read, from what the watches hold (no API server)."""

from __future__ import annotations

import asyncio
from typing import Any, cast

import pytest
from lightkube.resources.apps_v1 import Deployment
from lightkube.resources.core_v1 import Pod

from branchyard.runtime import LogName
from branchyard.runtime.kube import names
from branchyard.runtime.kube.connection import Connection
from branchyard.runtime.kube.namespaces import Namespaces
from branchyard.runtime.kube.options import KubeOptions
from branchyard.runtime.kube.podlogs import PodLogs, kept_output
from branchyard.runtime.kube.watch import Watch

LABELS = {names.SERVICE: "app", names.REVISION: "2", names.PROCESS: names.WEB}
WEB, BUILD = LogName("main", "app", 2), LogName("main", "app", 2, build=True)


def logs(kept: dict[str, str] | None, pod: bool) -> PodLogs:
    """The logs of app v2 in main: its web Deployment with the annotations ``kept`` (None:
    it did not fail), and its pod if ``pod`` (one on its way out, after a failure)."""
    connection = cast(Connection, None)  # nothing here calls the API server
    watch = Watch(connection)
    meta: dict[str, Any] = {"name": "app-v2", "namespace": "main", "labels": LABELS}
    deployment = Deployment.from_dict(
        {"metadata": {**meta, "annotations": kept}, "spec": {"selector": {}, "template": {}}}
    )
    watch.deployments[("main", "app-v2")] = cast(Deployment, deployment)
    if pod:
        made = {**meta, "name": "app-v2-x", "creationTimestamp": "2026-01-01T00:00:00Z"}
        watch.pods[("main", "app-v2-x")] = cast(Pod, Pod.from_dict({"metadata": made}))
    return PodLogs(connection, Namespaces(connection, KubeOptions(), print), watch)


@pytest.mark.parametrize(
    ("kept", "pod", "web", "build"),
    [
        (None, True, True, True),  # running, or on its way: its pod's logs
        (None, False, False, False),  # scaled to 0 when replaced: none
        (kept_output(True, ["ERROR: nope"]), True, False, True),  # a build that failed
        (kept_output(True, ["ERROR: nope"]), False, False, True),
        (kept_output(False, ["boom"]), True, True, False),  # a web process that crashed
        (kept_output(True, []), True, False, False),  # an image never pulled: no log ran
    ],
)  # fmt: skip
def test_a_failed_revision_has_the_log_it_kept_even_while_its_pod_is_still_there(
    kept: dict[str, str] | None, pod: bool, web: bool, build: bool
) -> None:
    """A failed start is scaled to 0 and its pod goes a moment later: meanwhile the pod
    serves every container's log, but the log that says why is the one kept."""
    found = logs(kept, pod)
    assert asyncio.run(found.has_log(WEB)) is web
    assert asyncio.run(found.has_log(BUILD)) is build


async def _read(logs: PodLogs, name: LogName) -> list[str]:
    return [line.decode() async for line in logs.read(name)]


@pytest.mark.parametrize(
    ("kept", "web", "build"),
    [
        (kept_output(True, ["fetched", "ERROR: nope"]), [], ["fetched\n", "ERROR: nope\n"]),
        (kept_output(False, ["boom"]), ["boom\n"], []),
        (kept_output(True, []), [], []),
    ],
)
def test_a_failed_revision_reads_the_lines_it_kept_not_its_pod_on_its_way_out(
    kept: dict[str, str], web: list[str], build: list[str]
) -> None:
    """Its pod, scaled away, may already be deleted while the watch still holds it: the
    API server would serve no log of it. Nothing here reaches the API server (there is
    none), so a read that asked the pod would fail."""
    found = logs(kept, pod=True)
    assert asyncio.run(_read(found, WEB)) == web
    assert asyncio.run(_read(found, BUILD)) == build
