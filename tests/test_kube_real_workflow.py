"""The seed workflow served on the test cluster's real node (tests/k8s_real_node.py): the
real daemon (``up --runtime kubernetes``, its git server on the node's gateway, pods on the
node through its selector and toleration) and CLI, the demo's own three services
(``branchyard.demo``), real pods fetching, installing and serving. Requests go from the
host to web's Service ClusterIP (kube-proxy), web reaches its peers by cluster DNS, and
10 deploys under load drop no request."""

from __future__ import annotations

import html
import http.client
import json
import re
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import pytest
from lightkube import ApiError, Client, KubeConfig
from lightkube.resources.core_v1 import Namespace, Pod, Service

from branchyard.demo import create_demo
from tests.conftest import (
    Cluster,
    Daemon,
    ServiceRepo,
    free_port,
    git,
    start_daemon,
    stop_cleanly,
    wait_for,
)
from tests.k8s_real_node import GATEWAY, daemon_flags

pytestmark = [pytest.mark.k8s, pytest.mark.integration, pytest.mark.timeout(300)]

CRASH = "import sys\nprint('crashing', flush=True)\nsys.exit(3)\n"
LOAD_RATE = 60  # requests a second, from the host to the ClusterIP
DEPLOYS = 10
UNROUTED_AND_MORE = 8  # seconds the load goes on after the last deploy: its old pod's end


@dataclass
class Flow:
    """The module's daemon, its client on the cluster, the demo's repos."""

    daemon: Daemon
    client: Client
    prefix: str
    repos: dict[str, ServiceRepo]
    tmp: Path

    def namespace(self, name: str) -> str:
        return self.prefix + name

    def cluster_ip(self, service: str, namespace: str) -> str:
        found = self.client.get(Service, service, namespace=self.namespace(namespace))
        assert found.spec is not None and found.spec.type == "ClusterIP", found.spec
        assert found.spec.clusterIP
        return found.spec.clusterIP

    def pods(self, service: str, namespace: str) -> list[Pod]:
        return [
            pod
            for pod in self.client.list(Pod, namespace=self.namespace(namespace))
            if pod.metadata is not None
            and (pod.metadata.labels or {}).get("branchyard.dev/service") == service
            and pod.metadata.deletionTimestamp is None
        ]


@pytest.fixture(scope="module")
def flow(k8s_real: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Flow]:
    tmp = tmp_path_factory.mktemp("realflow")
    prefix = f"r{uuid.uuid4().hex[:6]}-"
    repos = {
        demo.name: ServiceRepo(demo.name, demo.origin, demo.clone)
        for demo in create_demo(tmp / "demo")
    }
    daemon = start_daemon(
        tmp / "home", "--poll-interval", "1", "--drain-grace", "0",
        "--runtime", "kubernetes", "--kubeconfig", str(k8s_real.kubeconfig),
        "--namespace-prefix", prefix, "--build-timeout", "90",
        "--git-listen", f"{GATEWAY}:{free_port()}", *daemon_flags(),
    )  # fmt: skip
    try:
        with Client(config=KubeConfig.from_file(k8s_real.kubeconfig)) as client:
            for repo in repos.values():
                daemon.cli("repo", "add", str(repo.origin))
            yield Flow(daemon, client, prefix, repos, tmp)
    finally:
        stop_cleanly(daemon)


def get(address: str, path: str = "/", timeout: float = 5) -> tuple[int, str]:
    connection = http.client.HTTPConnection(address, 80, timeout=timeout)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        return response.status, response.read().decode()
    finally:
        connection.close()


def peers(page: str) -> dict[str, Any]:
    """What web's page shows each peer answered: variable -> its JSON, or the error text."""
    shown: dict[str, Any] = {}
    for variable, text in re.findall(r"<h2>(\w+)</h2>\n<pre>(.*?)</pre>", page, re.S):
        text = html.unescape(text)
        try:
            shown[variable] = json.loads(text)
        except ValueError:
            shown[variable] = text
    return shown


def env_of(address: str) -> dict[str, str]:
    status, body = get(address, "/env")
    assert status == 200, (status, body[:200])
    found: dict[str, str] = json.loads(body)
    return found


def live(flow: Flow, namespace: str, count: int) -> bool:
    rows = flow.daemon.ps_json("-n", namespace)
    return len(rows) == count and all(row["state"].startswith("live") for row in rows)


def serving(address: str, sha: str) -> bool:
    try:
        return env_of(address).get("BRANCHYARD_REVISION") == sha
    except (OSError, AssertionError, ValueError):
        return False


def branch(repo: ServiceRepo, name: str = "bugfix") -> str:
    repo.checkout(name)
    sha = repo.commit({"BRANCH": name}, f"{repo.name} on {name}")
    repo.push()
    return sha


def test_web_in_bugfix_is_served_through_its_cluster_ip_and_reaches_its_peers_by_dns(
    flow: Flow,
) -> None:
    wait_for(lambda: live(flow, "main", 3), 180, "the baseline live on real pods")
    app, other, web = (flow.repos[name] for name in ("app", "other_app", "web"))
    app_sha = branch(app)
    started = time.monotonic()
    web_sha = branch(web)
    wait_for(lambda: live(flow, "bugfix", 2), 120, "app and web live in bugfix")
    address = flow.cluster_ip("web", "bugfix")
    wait_for(lambda: serving(address, web_sha), 30, "web's ClusterIP serving bugfix")
    print(f"web pushed to served through its ClusterIP: {time.monotonic() - started:.1f} s")

    assert env_of(address)["APP_URL"] == "http://app"  # its Service's name, by cluster DNS
    status, page = get(address)
    assert status == 200 and "<h1>hello from web</h1>" in page
    shown = peers(page)
    assert shown["APP_URL"] == {
        "service": "app", "namespace": "bugfix", "revision": app_sha[:7], "branch": "bugfix"
    }  # fmt: skip
    # other_app is not branched: its name in bugfix is the ExternalName to main's
    assert shown["OTHER_APP_URL"]["namespace"] == "main", shown
    fallback = flow.client.get(Service, "other-app-181558", namespace=flow.namespace("bugfix"))
    assert fallback.spec is not None and fallback.spec.type == "ExternalName"

    # once other_app is branched, web reaches it in bugfix: the same pod, no restart
    (before,) = flow.pods("web", "bugfix")
    other_sha = branch(other)
    wait_for(lambda: live(flow, "bugfix", 3), 120, "other_app live in bugfix")

    def other_in_bugfix() -> bool:
        answer = peers(get(address)[1])["OTHER_APP_URL"]
        return isinstance(answer, dict) and answer["revision"] == other_sha[:7]

    wait_for(other_in_bugfix, 30, "web reaching other_app in bugfix")
    (after,) = flow.pods("web", "bugfix")
    assert before.metadata is not None and after.metadata is not None
    assert after.metadata.uid == before.metadata.uid
    assert after.status is not None and after.status.containerStatuses is not None
    assert [s.restartCount for s in after.status.containerStatuses] == [0]
    assert flow.daemon.ps_q("bugfix") == ["bugfix:app", "bugfix:other_app", "bugfix:web"]


def test_an_edit_rolls_out_a_new_pod_that_serves_the_new_env(flow: Flow) -> None:
    address = flow.cluster_ip("web", "bugfix")
    (before,) = flow.pods("web", "bugfix")
    editor = flow.tmp / "editor.py"
    editor.write_text("import sys\nopen(sys.argv[1], 'w').write('env:\\n  GREETING: hi\\n')\n")
    flow.daemon.cli("-n", "bugfix", "edit", "web", env={"EDITOR": f"python3 {editor}"})
    wait_for(lambda: "<h1>hi from web</h1>" in get(address)[1], 120, "the edit served")
    uids = {pod.metadata.uid for pod in flow.pods("web", "bugfix") if pod.metadata}
    assert before.metadata is not None and before.metadata.uid not in uids


@dataclass
class Load:
    """Requests at a steady rate from the host to one address, each on a new connection
    (so kube-proxy picks an endpoint for each): their outcome, latency and revision."""

    address: str
    rate: int
    answers: list[tuple[float, float, str]] = field(default_factory=list)
    """(sent at, seconds taken, the revision that answered)"""
    failures: list[tuple[float, str]] = field(default_factory=list)
    stopping: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def run(self, threads: int = 12) -> list[threading.Thread]:
        workers = [threading.Thread(target=self._work, args=(i, threads)) for i in range(threads)]
        for worker in workers:
            worker.start()
        return workers

    def _work(self, index: int, threads: int) -> None:
        interval = threads / self.rate
        next_at = time.monotonic() + index * interval / threads
        while not self.stopping.is_set():
            time.sleep(max(0.0, next_at - time.monotonic()))
            next_at += interval
            sent = time.monotonic()
            try:
                status, body = get(self.address, "/env", timeout=10)
                revision = json.loads(body)["BRANCHYARD_REVISION"] if status == 200 else ""
            except (OSError, ValueError, KeyError, http.client.HTTPException) as error:
                with self.lock:
                    self.failures.append((sent, repr(error)))
                continue
            with self.lock:
                if status == 200:
                    self.answers.append((sent, time.monotonic() - sent, revision))
                else:
                    self.failures.append((sent, f"HTTP {status}"))

    def first_served(self, sha: str, since: float) -> float | None:
        with self.lock:
            return next((at for at, _, rev in self.answers if rev == sha and at >= since), None)


def test_ten_deploys_under_load_through_the_cluster_ip_drop_no_request(flow: Flow) -> None:
    address = flow.cluster_ip("web", "bugfix")
    web = flow.repos["web"]
    load = Load(address, LOAD_RATE)
    workers = load.run()
    served_after = []
    try:
        for number in range(DEPLOYS):
            sha = web.commit({"DEPLOY": str(number)}, f"deploy {number}")
            pushed = time.monotonic()
            web.push()
            at = wait_for(partial(load.first_served, sha, pushed), 120, f"deploy {number}")
            assert at is not None
            served_after.append(at - pushed)
        time.sleep(UNROUTED_AND_MORE)
    finally:
        load.stopping.set()
        for worker in workers:
            worker.join()
    latencies = sorted(taken for _, taken, _ in load.answers)
    total = len(latencies) + len(load.failures)
    p99 = latencies[int(len(latencies) * 0.99) - 1] if latencies else float("nan")
    seconds = load.answers[-1][0] - load.answers[0][0] if load.answers else 0
    print(
        f"{DEPLOYS} deploys under load: {total} requests ({total / seconds:.0f}/s),"
        f" {len(load.failures)} failed, p99 {p99 * 1000:.0f} ms;"
        f" push to served {min(served_after):.1f} to {max(served_after):.1f} s"
    )
    assert load.failures == []
    assert total / seconds >= 50


def test_a_crashing_commit_fails_with_its_exit_code_and_the_old_pod_keeps_serving(
    flow: Flow,
) -> None:
    address = flow.cluster_ip("web", "bugfix")
    served = env_of(address)["BRANCHYARD_REVISION"]
    web = flow.repos["web"]
    web.commit({"app.py": CRASH}, "exits 3 at start")
    web.push()

    def failed() -> dict[str, Any]:
        row = flow.daemon.row("bugfix", "web")
        return row if row["reason"] else {}

    row = wait_for(failed, 120, "the crashing commit failed")
    assert "CrashLoopBackOff: exited with code 3" in row["reason"]
    assert env_of(address)["BRANCHYARD_REVISION"] == served


def test_logs_follow_a_real_pods_output(flow: Flow) -> None:
    following = flow.daemon.follow("-n", "bugfix", "logs", "-f", "web")
    try:
        assert following.stdout is not None
        line = following.stdout.readline()
        assert "listening on 8080" in line, line
        assert following.poll() is None  # it goes on
    finally:
        following.terminate()
        following.wait(timeout=10)


def test_a_rollback_serves_the_revision_before(flow: Flow) -> None:
    address = flow.cluster_ip("web", "bugfix")
    served = env_of(address)["BRANCHYARD_REVISION"]
    before = git("rev-parse", f"{served}~1", cwd=flow.repos["web"].clone)
    flow.daemon.cli("-n", "bugfix", "rollback", "web")
    wait_for(lambda: serving(address, before), 120, "the rollback served")


def test_a_deleted_branch_deletes_its_namespace(flow: Flow) -> None:
    for repo in flow.repos.values():
        git("checkout", "-q", "main", cwd=repo.clone)
        git("push", "-q", "origin", "--delete", "bugfix", cwd=repo.clone)

    def gone() -> bool:
        try:
            found = flow.client.get(Namespace, flow.namespace("bugfix"))
        except ApiError as exc:
            return exc.status.code == 404
        return bool(found.status and found.status.phase == "Terminating")

    wait_for(gone, 60, "bugfix's Namespace gone")
    rows = flow.daemon.ps_json("-A")
    assert sorted(row["namespace"] for row in rows) == ["main", "main", "main"]
