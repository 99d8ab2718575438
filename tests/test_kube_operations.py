"""Living with revisions on Kubernetes, as users see it: the real daemon (``up --runtime
kubernetes``) and CLI against the test control plane. Logs read through the API (kwok serves
the files a test writes, tests/k8s_node.py), the reason a revision fails (kwok's marks:
``sim-crash``, ``sim-pull-fail``), a live revision that starts crashing, retention, ``gc``,
``restart``, and the install cache's claim and keys."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import pytest
from lightkube import ApiError, Client
from lightkube.models.core_v1 import (
    HostPathVolumeSource,
    ObjectReference,
    PersistentVolumeSpec,
)
from lightkube.models.meta_v1 import ObjectMeta
from lightkube.resources.apps_v1 import Deployment
from lightkube.resources.core_v1 import (
    ConfigMap,
    Namespace,
    PersistentVolume,
    PersistentVolumeClaim,
    Pod,
    Secret,
)
from lightkube.types import PatchType

from tests import k8s_node
from tests.conftest import (
    Cluster,
    Daemon,
    ServiceRepo,
    free_port,
    start_daemon,
    stop_cleanly,
    wait_for,
)
from tests.test_kube_workflow import client as client  # the fixture
from tests.test_kube_workflow import gone, names_of, replicas, services, uids

pytestmark = [pytest.mark.k8s, pytest.mark.integration, pytest.mark.timeout(300)]

GOOD = "web: python -m http.server $PORT  # sim-ready\n"
BAD = "web: python -m http.server $PORT\n"  # never ready
CRASH = "web: python -m http.server $PORT  # sim-crash\n"
GHOST = {"branchyard.dev/service": "ghost"}
NO_POD = "app v%d in main has no pod: it is scaled to 0, and its log went with its pod"


def repo_files(procfile: str = GOOD, manifest: str = "") -> dict[str, str]:
    return {"Procfile": procfile, "branchyard.yaml": "health:\n  timeout: 1\n" + manifest}


@pytest.fixture
def prefix() -> str:
    return f"o{uuid.uuid4().hex[:6]}-"


def kube_daemon(
    k8s: Cluster, home: Path, prefix: str, build_timeout: int = 1, git: int = 0, *more: str
) -> Daemon:
    """A daemon on the test cluster; ``git``: its git server's port (the pods' template
    holds it: a daemon started again keeps it, or every revision rolls)."""
    return start_daemon(
        home,
        *("--poll-interval", "1", "--drain-grace", "0", "--runtime", "kubernetes"),
        *("--kubeconfig", str(k8s.kubeconfig), "--namespace-prefix", prefix),
        *("--build-timeout", str(build_timeout), "--git-listen", f"127.0.0.1:{git or free_port()}"),
        *more,
    )


@dataclass(frozen=True)
class Running:
    """A daemon on the test cluster, v1 of its repo ``app`` live in ``where``."""

    daemon: Daemon
    app: ServiceRepo
    where: str


@pytest.fixture
def running(
    k8s: Cluster, prefix: str, tmp_path: Path, make_repo: Callable[..., ServiceRepo]
) -> Iterator[Running]:
    daemon = kube_daemon(k8s, tmp_path / "home", prefix)
    try:
        app = make_repo("app", repo_files())
        daemon.cli("repo", "add", str(app.origin))
        wait_for(lambda: live(daemon, "main", "app") == 1, 60, "v1 live")
        yield Running(daemon, app, f"{prefix}main")
    finally:
        stop_cleanly(daemon)


def pod_of(client: Client, namespace: str, service: str, ordinal: int) -> str:
    """The name of the one web pod of a revision (fails unless there is exactly one)."""
    labels: dict[str, Any] = {
        "branchyard.dev/service": service,
        "branchyard.dev/revision": str(ordinal),
    }
    pods = [
        p.metadata.name or ""
        for p in client.list(Pod, namespace=namespace, labels=labels)
        if p.metadata is not None and p.metadata.deletionTimestamp is None
    ]
    assert len(pods) == 1, pods
    return pods[0]


def is_live(daemon: Daemon, ordinal: int) -> bool:
    return live(daemon, "main", "app") == ordinal


def live(daemon: Daemon, namespace: str, service: str) -> int:
    row = daemon.row(namespace, service)
    return int(row["live"]["ordinal"]) if row["state"] == "live" and row["live"] else 0


def test_logs_read_a_revisions_pod_follow_it_and_say_when_there_is_no_pod(
    k8s: Cluster,
    client: Client,
    prefix: str,
    tmp_path: Path,
    make_repo: Callable[..., ServiceRepo],
) -> None:
    where = f"{prefix}main"
    daemon = kube_daemon(k8s, tmp_path / "home", prefix, build_timeout=120)
    try:
        app = make_repo("app", repo_files())
        daemon.cli("repo", "add", str(app.origin))
        wait_for(lambda: live(daemon, "main", "app") == 1, 60, "v1 live")
        first = pod_of(client, where, "app", 1)
        web, fetch, install = (tmp_path / f"{n}.log" for n in ("web", "fetch", "install"))
        k8s_node.write_log(web, ["serving on 8080", "GET / 200"])
        k8s_node.write_log(fetch, ["fetched 3f2c1ab"])
        k8s_node.write_log(install, ["installed 0 packages", "build done"])
        files = {"web": web, "fetch": fetch, "install": install}
        k8s_node.give_container_logs(client, where, first, files)
        assert daemon.cli("logs", "app").stdout == "serving on 8080\nGET / 200\n"
        built = daemon.cli("logs", "--build", "app").stdout
        assert built == "fetched 3f2c1ab\ninstalled 0 packages\nbuild done\n"
        assert daemon.cli("logs", "--tail", "1", "app").stdout == "GET / 200\n"

        followed = daemon.follow("logs", "-f", "app")
        try:
            assert followed.stdout is not None
            assert [followed.stdout.readline() for _ in range(2)] == [
                "serving on 8080\n",
                "GET / 200\n",
            ]
            k8s_node.write_log(web, ["GET /later 200"], append=True)
            assert followed.stdout.readline() == "GET /later 200\n"
        finally:
            followed.terminate()
            followed.wait()

        # v2 never gets ready: it starts while v1 serves; each revision's pod is its own
        app.commit(repo_files(BAD), "never ready")
        app.push()
        wait_for(lambda: daemon.row("main", "app")["state"] == "live (v2 starting)", 60, "v2")
        second = wait_for(lambda: pod_of(client, where, "app", 2), 60, "v2's pod")
        other = tmp_path / "other.log"
        k8s_node.write_log(other, ["v2 says hello"])
        k8s_node.give_logs(client, where, second, other, ["web"])
        assert daemon.cli("logs", "--revision", "2", "app").stdout == "v2 says hello\n"
        assert daemon.cli("logs", "--revision", "v1", "app").stdout.startswith("serving on 8080")
        assert daemon.cli("logs", "app").stdout.startswith("serving on 8080")  # the live one's

        # v3 replaces both: v1 is scaled to 0, and its log went with its pod
        app.commit(repo_files(GOOD), "good again")
        app.push()
        wait_for(lambda: live(daemon, "main", "app") == 3, 60, "v3 live")
        wait_for(lambda: services(client, where)["app"] == "3", 60, "v3 selected")
        gone = daemon.cli("logs", "--revision", "1", "app", check=False)
        assert (gone.returncode, gone.stdout) == (1, "")
        assert gone.stderr == f"error: {NO_POD % 1}\n"
        for flags in (["-f"], ["--build"]):
            said = daemon.cli("logs", *flags, "--revision", "1", "app", check=False)
            assert (said.returncode, said.stderr) == (gone.returncode, gone.stderr)
    finally:
        stop_cleanly(daemon)


@dataclass(frozen=True)
class Failure:
    files: dict[str, str]
    reason: str
    shown: tuple[str, ...] = ()  # the last lines kept, of the build log if ``build``
    build: bool = False


WRITTEN = {
    "fetch": ["fetched"],
    "install": ["installing", "ERROR: no matching distribution for nope"],
    "web": ["starting", "Traceback (most recent call last):", "RuntimeError: boom"],
}
FAILURES = {
    "crash": Failure(
        repo_files(CRASH), "CrashLoopBackOff: exited with code 1 (", tuple(WRITTEN["web"])
    ),
    "pull": Failure(  # no log: its containers never ran (ps points at the build's)
        repo_files(GOOD, "image: registry.test/web:sim-pull-fail\n"),
        'ImagePullBackOff: Back-off pulling image "registry.test/web:sim-pull-fail"',
        build=True,
    ),
    "build": Failure(
        repo_files(GOOD, "build:\n  - echo sim-crash\n"),
        "init container install failed (exit code 1)",
        tuple(WRITTEN["fetch"] + WRITTEN["install"]),
        build=True,
    ),
}


@pytest.mark.parametrize("failure", FAILURES.values(), ids=FAILURES.keys())
def test_a_failed_revision_says_why_and_keeps_its_last_lines_once_its_pod_is_gone(
    k8s: Cluster,
    client: Client,
    prefix: str,
    tmp_path: Path,
    make_repo: Callable[..., ServiceRepo],
    failure: Failure,
) -> None:
    where = f"{prefix}main"
    logs = {name: tmp_path / f"{name}.log" for name in WRITTEN}
    for name, lines in WRITTEN.items():
        k8s_node.write_log(logs[name], lines)
    shown = list(failure.shown)
    port = free_port()
    daemon = kube_daemon(k8s, tmp_path / "home", prefix, git=port)
    try:
        app = make_repo("app", repo_files())
        daemon.cli("repo", "add", str(app.origin))
        wait_for(lambda: live(daemon, "main", "app") == 1, 60, "v1 live")
        given = logs if shown else {}
        with k8s_node.namespace_logs(client, where, given, pod_of(client, where, "app", 1)):
            app.commit(failure.files, "broken")
            app.push()
            row = wait_for(lambda: (r := daemon.row("main", "app"))["reason"] and r, 60, "failed")
        reason = failure.reason
        assert (row["state"], row["latest"]["state"]) == ("live (v2 failed)", "failed")
        assert row["reason"].startswith(reason), row["reason"]
        assert services(client, where)["app"] == "1"
        table = daemon.cli("ps").stdout
        assert f"live (v2 failed): {reason}" in table
        command = "branchyard logs app --revision 2" + (" --build" if failure.build else "")
        assert f"main:app v2 failed; see: {command}\n" in table
        events = daemon.cli("events").stdout
        assert f"app-v2 in {where} failed: {reason}" in events
        assert f"failed     main:app                 v2: {reason}" in events
        assert row["last_lines"] == shown
        said = f"; last output: {' | '.join(shown[-3:])}" if shown else ""
        assert row["reason"].endswith(said)
        wait_for(lambda: not pods(client, where, 2), 60, "v2 without a pod")
        flags = ["--build"] if failure.build else []
        if shown:
            read = daemon.cli("logs", "--revision", "2", *flags, "app").stdout
            assert read.splitlines() == shown
            tail = daemon.cli("logs", "-f", "--tail", "1", "--revision", "2", *flags, "app")
            assert tail.stdout.splitlines() == shown[-1:]  # and ends: nothing more will come
        else:
            none = daemon.cli("logs", "--revision", "2", *flags, "app", check=False)
            assert (none.returncode, none.stderr) == (1, f"error: {NO_POD % 2}\n")

        stop_cleanly(daemon)  # a new daemon finds them on the Deployment
        daemon = kube_daemon(k8s, tmp_path / "home", prefix, git=port)
        again = wait_for(lambda: daemon.row("main", "app"), 60, "ps")
        assert again["last_lines"] == shown
    finally:
        stop_cleanly(daemon)


FAR = 3600  # --build-timeout: a progress deadline an hour away, beyond the test's time
CRASH_LOOPS = {
    "web": Failure(repo_files(CRASH), "CrashLoopBackOff: exited with code 1 ("),
    "install": Failure(
        repo_files(GOOD, "build:\n  - echo sim-crash\n"),
        "init container install failed (exit code 1)",
    ),
}


def stalled(deployment: Deployment) -> bool:
    conditions = (deployment.status.conditions if deployment.status else None) or ()
    return any(c.reason == "ProgressDeadlineExceeded" for c in conditions)


@pytest.mark.parametrize("failure", CRASH_LOOPS.values(), ids=CRASH_LOOPS.keys())
def test_a_crash_looping_revision_fails_at_its_pods_crash_loop_not_at_its_deadline(
    k8s: Cluster,
    client: Client,
    prefix: str,
    tmp_path: Path,
    make_repo: Callable[..., ServiceRepo],
    failure: Failure,
) -> None:
    """As locally, where a first start that exits fails at once: the pod's second exit in
    a row (CrashLoopBackOff) fails the start, while its Deployment's progress deadline,
    an hour away, has not passed."""
    where = f"{prefix}main"
    daemon = kube_daemon(k8s, tmp_path / "home", prefix, build_timeout=FAR)
    try:
        app = make_repo("app", repo_files())
        daemon.cli("repo", "add", str(app.origin))
        wait_for(lambda: live(daemon, "main", "app") == 1, 60, "v1 live")
        listing = client.list(Deployment, namespace=where)
        assert [d.metadata.name for d in listing if d.metadata] == ["app-v1"]
        before = listing.resourceVersion
        app.commit(failure.files, "crashes")
        app.push()
        # every version of v2's Deployment, in the API server's order, until the daemon
        # gave up on it and scaled it to 0: its deadline is never reached on the way
        versions = []
        named: dict[str, Any] = {"metadata.name": "app-v2"}
        for _, deployment in client.watch(
            Deployment, namespace=where, resource_version=before, fields=named
        ):
            versions.append(deployment)
            assert deployment.spec is not None
            if deployment.spec.replicas == 0:
                break
        assert versions[0].spec is not None
        assert versions[0].spec.progressDeadlineSeconds == FAR + 1  # the health timeout's 1
        assert not any(stalled(d) for d in versions)
        row = wait_for(lambda: (r := daemon.row("main", "app"))["reason"] and r, 60, "failed")
        assert (row["state"], row["latest"]["state"]) == ("live (v2 failed)", "failed")
        assert row["reason"].startswith(failure.reason), row["reason"]
        assert services(client, where)["app"] == "1"
        assert f"app-v2 in {where} failed: {failure.reason}" in daemon.cli("events").stdout
        assert not stalled(client.get(Deployment, "app-v2", namespace=where))
    finally:
        stop_cleanly(daemon)


def pods(client: Client, namespace: str, ordinal: int) -> list[str]:
    labels: dict[str, Any] = {"branchyard.dev/revision": str(ordinal)}
    return [
        p.metadata.name or ""
        for p in client.list(Pod, namespace=namespace, labels=labels)
        if p.metadata
    ]


def test_a_live_revision_whose_pod_starts_crashing_shows_as_restarting(
    client: Client, running: Running
) -> None:
    daemon, where = running.daemon, running.where
    # its kubelet (the test, for kwok) says the web container crashed; kwok goes on
    crashed = {
        "conditions": [{"type": "Ready", "status": "False", "reason": "ContainersNotReady"}],
        "containerStatuses": [
            {
                "name": "web",
                "image": "python:3.11-slim",
                "imageID": "python:3.11-slim",
                "ready": False,
                "restartCount": 1,
                "state": {"waiting": {"reason": "CrashLoopBackOff", "message": "back-off 1s"}},
                "lastState": {"terminated": {"exitCode": 1, "reason": "Error"}},
            }
        ],
    }
    pod = pod_of(client, where, "app", 1)
    client.patch(Pod.Status, pod, {"status": crashed}, namespace=where, patch_type=PatchType.MERGE)
    row = wait_for(
        lambda: (r := daemon.row("main", "app"))["state"].startswith("restarting") and r,
        60,
        "restarting",
    )
    assert row["state"] == "restarting (exit 1)"
    assert "main:app  v1" in daemon.cli("ps").stdout
    assert "restarting (exit 1)" in daemon.cli("ps").stdout
    restarts = wait_for(lambda: daemon.row("main", "app")["restarts"] >= 2, 60, "restarts")
    assert restarts


def test_gc_deletes_what_the_store_no_longer_knows_and_nothing_else(
    k8s: Cluster,
    client: Client,
    prefix: str,
    tmp_path: Path,
    make_repo: Callable[..., ServiceRepo],
) -> None:
    where, bugfix = f"{prefix}main", f"{prefix}bugfix"
    other = f"p{uuid.uuid4().hex[:6]}-"  # another daemon's prefix
    daemon = kube_daemon(k8s, tmp_path / "home", prefix)
    try:
        repos = {name: make_repo(name, repo_files()) for name in ("app", "web")}
        for repo in repos.values():
            daemon.cli("repo", "add", str(repo.origin))
        repos["app"].checkout("bugfix")
        repos["app"].push()

        def settled() -> dict[str, str]:
            """The Services once app serves in bugfix (v1, or v2 when web came after the
            push: its peers changed) and web falls back there; else nothing."""
            wanted = {"app": str(live(daemon, "bugfix", "app")), "web": "external"}
            return wanted if services(client, bugfix) == wanted else {}

        served = wait_for(settled, 60, "bugfix")
        ours = {"app.kubernetes.io/managed-by": "branchyard"}
        ghost = {**ours, "branchyard.dev/namespace": "ghost"}
        made: list[Any] = [
            ConfigMap(metadata=ObjectMeta(name="ghost-env", namespace=where, labels=ours | GHOST)),
            ConfigMap(metadata=ObjectMeta(name="theirs", namespace=where, labels=GHOST)),
            Namespace(metadata=ObjectMeta(name=f"{prefix}ghost", labels=ghost)),
            Namespace(metadata=ObjectMeta(name=f"{other}ghost", labels=ghost)),
            Namespace(metadata=ObjectMeta(name=f"{prefix}plain")),
        ]
        for thing in made:
            client.create(thing)
        said = daemon.cli("gc").stdout
        assert said == "freed 0.0 MB of builds, deleted 2 Kubernetes objects\n"
        assert not exists(client, ConfigMap, "ghost-env", where)
        assert gone(client, f"{prefix}ghost")
        assert exists(client, ConfigMap, "theirs", where)  # without branchyard's label
        # a known service's env stays; one no kept Deployment of it uses, retention takes
        # (gc prunes every service first), as it does after a deploy
        app = f"app-v{live(daemon, 'main', 'app')}"
        assert all(exists(client, ConfigMap, name, where) for name in env_of(client, where, app))
        for kept in made[3:]:
            assert exists(client, Namespace, kept.metadata.name)
        assert services(client, bugfix) == served
        assert daemon.row("bugfix", "app")["state"] == "live"
    finally:
        stop_cleanly(daemon)
        for name in (f"{other}ghost", f"{prefix}plain"):
            if exists(client, Namespace, name):  # made, unless the test failed before
                client.delete(Namespace, name)


KEPT = [f"app-v{n}" for n in range(4, 10)]


def env_of(client: Client, namespace: str, name: str) -> set[str]:
    """The ConfigMaps and Secrets a Deployment's web container takes its env from."""
    spec = client.get(Deployment, name, namespace=namespace).spec
    assert spec is not None and spec.template.spec is not None
    found = set()
    for source in spec.template.spec.containers[0].envFrom or ():
        for ref in (source.configMapRef, source.secretRef):
            if ref is not None and ref.name:
                found.add(ref.name)
    return found


def exists(client: Client, kind: Any, name: str, namespace: str | None = None) -> bool:
    try:
        client.get(kind, name, namespace=namespace)
    except ApiError as exc:
        if exc.status.code == 404:
            return False
        raise
    return True


def test_retention_deletes_dropped_deployments_and_the_env_only_they_used(
    client: Client, running: Running
) -> None:
    daemon, where = running.daemon, running.where
    edits = [["--secret", "TOKEN=a"], ["--secret", "TOKEN=b"]]
    edits += [[f"GREETING={n}"] for n in range(6)]  # v2 .. v9; 5 served are kept, and v9
    for ordinal, edit in enumerate(edits, start=2):
        daemon.cli("env", "set", *edit[:-1], "app", edit[-1])
        wait_for(partial(is_live, daemon, ordinal), 60, f"v{ordinal} live")
    wait_for(lambda: names_of(client, Deployment, where) == KEPT, 60, "v1-v3 deleted")
    assert [replicas(client, where, name) for name in KEPT] == [0, 0, 0, 0, 0, 1]
    used = {name for d in KEPT for name in env_of(client, where, d)}
    maps = {n for n in names_of(client, ConfigMap, where) if n.startswith("app-")}
    assert maps == {n for n in used if n.startswith("app-env-")}  # v1's went with v1
    secrets = names_of(client, Secret, where)
    assert len(secrets) == 1 and set(secrets) <= used  # TOKEN=a's went with v2


def test_restart_gives_new_pods_and_the_old_one_stays_until_the_new_one_is_ready(
    client: Client, running: Running
) -> None:
    daemon, where = running.daemon, running.where
    old = pod_of(client, where, "app", 1)
    listing = client.list(Pod, namespace=where)
    assert [p.metadata.name for p in listing if p.metadata] == [old]
    before = listing.resourceVersion
    daemon.cli("restart", "app")
    ready: set[str] = set()
    # every change to the pods since, in the API server's order: the old pod is deleted
    # only once a new one is Ready
    for change, pod in client.watch(Pod, namespace=where, resource_version=before):
        assert pod.metadata is not None and pod.status is not None
        name = pod.metadata.name or ""
        if name == old and (change == "DELETED" or pod.metadata.deletionTimestamp):
            assert ready, "the old pod went before a new one was Ready"
            break
        conditions = pod.status.conditions or ()
        if name != old and any(c.type == "Ready" and c.status == "True" for c in conditions):
            ready.add(name)
    assert pod_of(client, where, "app", 1) in ready
    assert services(client, where)["app"] == "1"
    assert live(daemon, "main", "app") == 1


def volume_for_the_cache(client: Client, namespace: str) -> str:
    """A volume bound ahead to ``namespace``'s install cache claim (the test cluster has no
    StorageClass, and kwok's node mounts nothing); its name."""
    name = f"{namespace}-install-cache"
    claim = ObjectReference(namespace=namespace, name="branchyard-install-cache")
    spec = PersistentVolumeSpec(
        capacity={"storage": "1Gi"},
        accessModes=["ReadWriteOnce"],
        hostPath=HostPathVolumeSource(path=f"/nonexistent/{name}"),
        claimRef=claim,
        persistentVolumeReclaimPolicy="Retain",
        storageClassName="",
    )
    client.create(PersistentVolume(metadata=ObjectMeta(name=name), spec=spec))
    return name


def template_of(client: Client, namespace: str, name: str) -> dict[str, Any]:
    """The pod template of a Deployment as the API server holds it, without the restart's
    annotation."""
    found = client.get(Deployment, name, namespace=namespace)
    assert found.spec is not None
    template = found.spec.template.to_dict()
    template["metadata"].pop("annotations", None)
    return template


def install_of(template: dict[str, Any]) -> tuple[str, list[dict[str, Any]]]:
    """The INSTALL_KEY of a template's install and its mounts of the cache."""
    (install,) = [c for c in template["spec"]["initContainers"] if c["name"] == "install"]
    key = {e["name"]: e.get("value") for e in install["env"]}["INSTALL_KEY"]
    return key, [m for m in install["volumeMounts"] if m["name"] == "cache"]


def test_an_install_cache_is_a_claim_per_namespace_and_keys_a_revisions_pods_by_its_environment(
    k8s: Cluster,
    client: Client,
    prefix: str,
    tmp_path: Path,
    make_repo: Callable[..., ServiceRepo],
) -> None:
    main, bugfix = f"{prefix}main", f"{prefix}bugfix"
    volumes = [volume_for_the_cache(client, where) for where in (main, bugfix)]
    port = free_port()  # the next daemon's too: the pods' template holds it
    daemon = kube_daemon(k8s, tmp_path / "home", prefix, 1, port, "--install-cache", "1Gi")
    try:
        app = make_repo("app", {**repo_files(), "requirements.txt": "tinydep\n"})
        daemon.cli("repo", "add", str(app.origin))
        wait_for(lambda: live(daemon, "main", "app") == 1, 60, "v1 live in main")
        app.checkout("bugfix")
        app.commit({"change.txt": "1"}, "app on bugfix")
        app.push()
        wait_for(lambda: live(daemon, "bugfix", "app") == 1, 60, "v1 live in bugfix")

        for where, volume in zip((main, bugfix), volumes, strict=True):
            claim = client.get(PersistentVolumeClaim, "branchyard-install-cache", namespace=where)
            assert claim.metadata is not None and claim.spec is not None
            assert claim.metadata.labels == {"app.kubernetes.io/managed-by": "branchyard"}
            assert claim.spec.accessModes == ["ReadWriteOnce"]
            assert claim.spec.resources is not None
            assert claim.spec.resources.requests == {"storage": "1Gi"}
            assert claim.spec.volumeName == volume  # bound: the pods could be scheduled
        in_main, mounts = install_of(template_of(client, main, "app-v1"))
        assert mounts == [{"mountPath": "/cache", "name": "cache", "subPath": "app"}]
        first = template_of(client, bugfix, "app-v1")
        key, _ = install_of(first)
        assert key != in_main  # a branch's environments are its own
        for container in first["spec"]["containers"] + first["spec"]["initContainers"][:1]:
            assert not [m for m in container["volumeMounts"] if m["name"] == "cache"]

        # a commit of code alone: the same environment; of its requirements: another
        app.commit({"change.txt": "2"}, "code alone")
        app.push()
        wait_for(lambda: live(daemon, "bugfix", "app") == 2, 60, "v2 live in bugfix")
        second = template_of(client, bugfix, "app-v2")
        assert install_of(second)[0] == key
        app.commit({"requirements.txt": "tinydep\nother\n"}, "a dependency more")
        app.push()
        wait_for(lambda: live(daemon, "bugfix", "app") == 3, 60, "v3 live in bugfix")
        assert install_of(template_of(client, bugfix, "app-v3"))[0] != key

        # a restart, the next daemon and a rollback apply a revision again: its pods'
        # template stays, and the next daemon replaces no pod (no new ReplicaSet)
        third = template_of(client, bugfix, "app-v3")
        daemon.cli("-n", "bugfix", "restart", "app")
        assert template_of(client, bugfix, "app-v3") == third
        before = uids(client, [main, bugfix])
        applied = f"applied Deployment app-v3 in {bugfix}"
        count = daemon.cli("-n", "bugfix", "events").stdout.count(applied)
        stop_cleanly(daemon)
        daemon = kube_daemon(k8s, tmp_path / "home", prefix, 1, port, "--install-cache", "1Gi")
        events = partial(daemon.cli, "-n", "bugfix", "events")
        wait_for(lambda: events().stdout.count(applied) > count, 60, "v3 applied again")
        assert uids(client, [main, bugfix]) == before
        assert template_of(client, bugfix, "app-v3") == third
        assert "is on v2" in daemon.cli("-n", "bugfix", "rollback", "app").stdout
        wait_for(lambda: services(client, bugfix)["app"] == "2", 60, "rolled back to v2")
        assert replicas(client, bugfix, "app-v2") == 1
        assert template_of(client, bugfix, "app-v2") == second
    finally:
        stop_cleanly(daemon)
        for volume in volumes:
            client.delete(PersistentVolume, volume)
