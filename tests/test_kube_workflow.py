"""The seed workflow on Kubernetes, end to end: the real daemon (``up --runtime
kubernetes``), real git repos pushed to, the real CLI, and the test control plane's API
server, controllers and kwok node (commands marked ``sim-ready`` pass their probe); and a
private repo's login, which reaches only its fetch, through a Secret."""

from __future__ import annotations

import base64
import json
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from lightkube import ApiError, Client, KubeConfig
from lightkube.resources.apps_v1 import Deployment, ReplicaSet
from lightkube.resources.core_v1 import ConfigMap, Namespace, Secret, Service
from lightkube.resources.networking_v1 import Ingress

from branchyard.runtime.kube import render
from branchyard.runtime.kube.names import object_name, service_labels
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
from tests.githttp import GitHttpServer
from tests.test_kube_scripts import fetch_for_real, mount_login

pytestmark = [pytest.mark.k8s, pytest.mark.integration, pytest.mark.timeout(300)]

GOOD = "web: python -m http.server $PORT  # sim-ready\n"
BAD = "web: python -m http.server $PORT\n"  # never ready: fails at its progress deadline
OTHER = "other-app-181558"  # other_app's object name


def repo_files(procfile: str = GOOD) -> dict[str, str]:
    return {"Procfile": procfile, "branchyard.yaml": "health:\n  timeout: 1\n"}


@pytest.fixture(scope="module")
def client(k8s: Cluster) -> Iterator[Client]:
    with Client(config=KubeConfig.from_file(k8s.kubeconfig)) as opened:
        yield opened


def services(client: Client, namespace: str) -> dict[str, str]:
    """Service name -> the revision it selects, or ``external`` for a fallback."""
    found: dict[str, str] = {}
    for service in client.list(Service, namespace=namespace):
        assert service.metadata is not None and service.spec is not None
        if service.spec.type == "ExternalName":
            found[service.metadata.name or ""] = "external"
        else:
            found[service.metadata.name or ""] = (service.spec.selector or {})[
                "branchyard.dev/revision"
            ]
    return found


def names_of(client: Client, kind: Any, namespace: str) -> list[str]:
    return sorted(thing.metadata.name for thing in client.list(kind, namespace=namespace))


def replicas(client: Client, namespace: str, name: str) -> int:
    spec = client.get(Deployment, name, namespace=namespace).spec
    return spec.replicas or 0 if spec else 0


def uids(client: Client, namespaces: list[str]) -> list[tuple[str, str, str, str]]:
    found = []
    for namespace in namespaces:
        for kind in (Deployment, ReplicaSet, Service, ConfigMap):
            things: list[Any] = list(client.list(kind, namespace=namespace))
            for thing in things:
                found.append((namespace, kind.__name__, thing.metadata.name, thing.metadata.uid))
    return sorted(found)


def settled(
    daemon: Daemon, client: Client, prefix: str, namespace: str, count: int
) -> dict[str, str]:
    """Once ``count`` services of ``namespace`` are live and each Service selects its
    live revision: object name -> ordinal; else nothing."""
    rows = daemon.ps_json("-n", namespace)
    if len(rows) != count or any(not row["state"].startswith("live") for row in rows):
        return {}
    found = services(client, prefix + namespace)
    live = {object_name(row["service"]): str(row["live"]["ordinal"]) for row in rows}
    return live if all(found.get(name) == ordinal for name, ordinal in live.items()) else {}


def gone(client: Client, namespace: str) -> bool:
    try:
        found = client.get(Namespace, namespace)
    except ApiError as exc:
        return exc.status.code == 404
    return bool(found.status and found.status.phase == "Terminating")


def test_the_seed_workflow_runs_on_kubernetes(
    k8s: Cluster, client: Client, tmp_path: Path, make_repo: Callable[..., ServiceRepo]
) -> None:
    prefix = f"w{uuid.uuid4().hex[:6]}-"
    main, bugfix = f"{prefix}main", f"{prefix}bugfix"
    arguments = [
        "--poll-interval", "1", "--drain-grace", "0", "--runtime", "kubernetes",
        "--kubeconfig", str(k8s.kubeconfig), "--namespace-prefix", prefix,
        "--build-timeout", "1", "--git-listen", f"127.0.0.1:{free_port()}",
        "--domain", "preview.example.com",
    ]  # fmt: skip
    # The same git URL for both daemons: the fetch command is part of the pods' template.
    daemon = start_daemon(tmp_path / "home", *arguments)
    try:
        repos = {name: make_repo(name, repo_files()) for name in ("app", "other_app", "web")}
        for repo in repos.values():
            daemon.cli("repo", "add", str(repo.origin))
        baseline = wait_for(lambda: settled(daemon, client, prefix, "main", 3), 60, "the baseline")
        assert sorted(baseline) == ["app", OTHER, "web"]
        assert set(names_of(client, Deployment, main)) >= {f"{s}-v{o}" for s, o in baseline.items()}

        # 2. a branch of app: its Namespace, its Deployment, Service and Ingress, fallbacks
        # for the rest
        app = repos["app"]
        app.checkout("bugfix")
        app.commit({"change.txt": "1"}, "app on bugfix")
        app.push()
        wait_for(lambda: settled(daemon, client, prefix, "bugfix", 1), 60, "bugfix")
        assert daemon.ps_q("bugfix") == ["bugfix:app"]
        assert services(client, bugfix) == {"app": "1", OTHER: "external", "web": "external"}
        fallback = client.get(Service, "web", namespace=bugfix).spec
        assert fallback is not None and fallback.externalName == f"web.{main}.svc.cluster.local"
        (entry,) = client.list(Ingress, namespace=bugfix)  # a fallback has none
        assert entry.spec is not None and entry.spec.rules is not None
        assert [rule.host for rule in entry.spec.rules] == ["app.bugfix.preview.example.com"]

        # 3. the same branch in other_app: its Service is a normal one now
        other = repos["other_app"]
        other.checkout("bugfix")
        other.commit({"change.txt": "1"}, "other_app on bugfix")
        other.push()
        both = wait_for(
            lambda: settled(daemon, client, prefix, "bugfix", 2), 60, "other_app in bugfix"
        )
        assert both[OTHER] != "external" and services(client, bugfix)["web"] == "external"

        # 4. an edit: a new ConfigMap and Deployment, switched to once Available
        edited = int(both["app"]) + 1
        editor = tmp_path / "editor.py"
        editor.write_text("import sys\nopen(sys.argv[1], 'w').write('env:\\n  GREETING: hi\\n')\n")
        daemon.cli("-n", "bugfix", "edit", "app", env={"EDITOR": f"python3 {editor}"})
        wait_for(lambda: services(client, bugfix)["app"] == str(edited), 60, "the edit live")
        assert replicas(client, bugfix, f"app-v{edited}") == 1
        maps = [n for n in names_of(client, ConfigMap, bugfix) if n.startswith("app-env-")]
        assert len(maps) == edited

        # 5. a commit marked bad fails with a reason; the edit keeps the Service
        app.commit(repo_files(BAD), "not ready")
        app.push()
        row = wait_for(lambda: (r := daemon.row("bugfix", "app"))["reason"] and r, 60, "failed")
        assert "not ready: health check GET / did not pass within 2 s" in row["reason"]
        assert services(client, bugfix)["app"] == str(edited)
        assert replicas(client, bugfix, f"app-v{edited + 1}") == 0

        # 6. rollback: the revision before the edit scaled back up and selected
        daemon.cli("-n", "bugfix", "rollback", "app")
        wait_for(lambda: services(client, bugfix)["app"] == str(edited - 1), 60, "rolled back")
        assert replicas(client, bugfix, f"app-v{edited - 1}") == 1

        # 8. kill -9 and a new daemon: the same objects, nothing new. (main's revisions are
        # read here, not at its first settling: a peer's arrival may still have been
        # rolling out then, as its `live` row does not show a deploy not yet planned)
        main_live = wait_for(lambda: settled(daemon, client, prefix, "main", 3), 60, "main")
        before = uids(client, [main, bugfix])
        daemon.kill()
        daemon = start_daemon(tmp_path / "home", *arguments)
        wait_for(lambda: settled(daemon, client, prefix, "bugfix", 2), 60, "adopted")
        assert uids(client, [main, bugfix]) == before

        # 7. the branch deleted everywhere: the Namespace goes
        for repo in (app, other):
            git("checkout", "-q", "main", cwd=repo.clone)
            git("push", "-q", "origin", "--delete", "bugfix", cwd=repo.clone)
        wait_for(lambda: gone(client, bugfix), 60, "the Namespace gone")
        assert settled(daemon, client, prefix, "main", 3) == main_live
    finally:
        stop_cleanly(daemon)


def test_a_private_repos_login_reaches_only_its_fetch_through_a_secret(
    k8s: Cluster, client: Client, tmp_path: Path, make_repo: Callable[..., ServiceRepo]
) -> None:
    prefix = f"p{uuid.uuid4().hex[:6]}-"
    main = f"{prefix}main"
    token = f"t0ken-{uuid.uuid4().hex}"
    shown = [token, base64.b64encode(token.encode()).decode()]
    app = make_repo("app", repo_files())
    with GitHttpServer(app.origin.parent, credentials=("deployer", token)) as server:
        bare = f"{server.url}/app.git"
        daemon = start_daemon(
            tmp_path / "home", "--poll-interval", "1", "--runtime", "kubernetes",
            "--kubeconfig", str(k8s.kubeconfig), "--namespace-prefix", prefix,
            "--build-timeout", "1",
        )  # fmt: skip
        try:
            daemon.cli("repo", "add", bare.replace("http://", f"http://deployer:{token}@"))
            wait_for(lambda: settled(daemon, client, prefix, "main", 1), 60, "app live")
            login = client.get(Secret, "app-git", namespace=main)
            deployment = client.get(Deployment, "app-v1", namespace=main)
            review = daemon.cli("k8s", "render", "app")
            events = daemon.cli("events").stdout
        finally:
            stop_cleanly(daemon)
        assert login.metadata is not None and login.data is not None
        assert login.metadata.labels is not None
        assert login.metadata.labels.items() >= service_labels("app").items()
        assert login.type == "kubernetes.io/basic-auth"
        data = {k: base64.b64decode(v).decode() for k, v in login.data.items()}
        assert data == {"username": "deployer", "password": token}

        # the pod's spec, as the API server holds it, shows no token
        assert deployment.spec is not None and deployment.spec.template.spec is not None
        pod: Any = deployment.spec.template.spec
        assert not [part for part in shown if part in json.dumps(pod.to_dict())]
        fetch, install = pod.initContainers
        assert fetch.command[-2] == bare
        assert ("login", render.LOGIN, True) in [
            (m.name, m.mountPath, m.readOnly) for m in fetch.volumeMounts
        ]
        for container in (install, *pod.containers):
            assert "login" not in {m.name for m in container.volumeMounts}

        # that fetch, run here with the Secret's data where the pod mounts it, fetches
        workspace = tmp_path / "workspace"
        workspace.mkdir()
        mounted = mount_login(tmp_path / "login", data["username"], data["password"])
        ran = fetch_for_real(fetch.command, workspace, mounted)
        assert ran.returncode == 0, ran.stderr
        assert (workspace / "src" / "Procfile").read_text() == GOOD
        assert server.shown_in_argv == []

    # nor do k8s render, the events and the daemon's log
    for what, text in {
        "k8s render": review.stdout + review.stderr, "events": events, "log": daemon.log
    }.items():  # fmt: skip
        assert not [part for part in shown if part in text], what
    rendered = {
        f"{d['kind']}/{d['metadata']['name']}": d for d in yaml.safe_load_all(review.stdout)
    }
    assert rendered["Secret/app-git"]["stringData"] == {
        "username": "(redacted)", "password": "(redacted)"
    }  # fmt: skip
    fetched = rendered["Deployment/app-v1"]["spec"]["template"]["spec"]["initContainers"][0]
    assert fetched["command"] == fetch.command
