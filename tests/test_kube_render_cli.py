"""``branchyard k8s render``: the real daemon renders the Kubernetes objects of a
service's newest revision, and the CLI prints them, as ``helm template`` does."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from branchyard.runtime.kube import names
from tests.conftest import Daemon, ServiceRepo, daemon_with, stdlib_service, wait_for
from tests.githttp import GitHttpServer

pytestmark = pytest.mark.integration

LOOPBACK = "a loopback address, which in a pod is the pod itself"


def documents(text: str) -> dict[str, dict[str, Any]]:
    """``KIND/NAME`` -> object, in the order printed."""
    return {f"{d['kind']}/{d['metadata']['name']}": d for d in yaml.safe_load_all(text)}


def test_render_prints_the_objects_of_the_newest_revision_of_a_branch(
    daemon: Daemon, make_repo: Callable[..., ServiceRepo]
) -> None:
    app = make_repo("app")
    with GitHttpServer(app.origin.parent) as server:
        url = f"{server.url}/app.git"
        daemon.cli("repo", "add", url)
        app.checkout("bugfix")
        sha = app.commit({"x.txt": "1"}, "on the branch")
        app.push()
        wait_for(lambda: daemon.serves("app", "bugfix", sha), 60, "app in bugfix")
        daemon.cli("-n", "bugfix", "env", "set", "--secret", "app", "API_TOKEN=t0ken-value")
        wait_for(lambda: (daemon.row("bugfix", "app")["live"] or {}).get("ordinal") == 2, 60, "v2")

        done = daemon.cli("k8s", "render", "-n", "bugfix", "app")
    assert done.stderr == (  # the test's git server is on loopback, as pods would see it
        f"warning: pods fetch app from {url}, {LOOPBACK}: register the repo by a URL pods reach\n"
    )
    objects = documents(done.stdout)
    assert [name.split("/")[0] for name in objects] == [
        "Namespace", "ConfigMap", "Secret", "Deployment", "Service"
    ]  # fmt: skip
    assert objects["Namespace/bugfix"]["metadata"]["labels"]["branchyard.dev/namespace"] == "bugfix"
    deployment = objects["Deployment/app-v2"]
    assert deployment["metadata"]["namespace"] == "bugfix"
    assert deployment["metadata"]["labels"]["branchyard.dev/commit"] == sha
    fetch = deployment["spec"]["template"]["spec"]["initContainers"][0]
    assert fetch["command"][-2:] == [url, sha]
    config = next(o for name, o in objects.items() if name.startswith("ConfigMap/app-env-"))
    assert config["data"]["BRANCHYARD_REVISION"] == sha
    assert "API_TOKEN" not in config["data"]
    secret = next(o for name, o in objects.items() if name.startswith("Secret/app-secret-"))
    assert secret["stringData"] == {"API_TOKEN": "(redacted)"}
    assert "t0ken-value" not in done.stdout
    assert objects["Service/app"]["spec"]["selector"]["branchyard.dev/revision"] == "2"


def test_render_of_a_local_repo_without_a_git_server_or_an_unknown_service_fails(
    daemon: Daemon, make_repo: Callable[..., ServiceRepo]
) -> None:
    app = make_repo("app")
    daemon.cli("repo", "add", str(app.origin))
    wait_for(lambda: daemon.row("main", "app")["latest"] is not None, 60, "a revision of app")

    local = daemon.cli("k8s", "render", "app", check=False)
    assert (local.returncode, local.stdout) == (1, "")
    assert local.stderr == (
        f"error: app is a repo on this machine ({app.origin}): pods fetch it from the daemon's "
        "git server, and none is set (branchyard up --git-listen)\n"
    )
    unknown = daemon.cli("k8s", "render", "-n", "bugfix", "app", check=False)
    assert (unknown.returncode, unknown.stdout) == (1, "")
    assert unknown.stderr.startswith("error: no ") and unknown.stderr.count("\n") == 1


def live(daemon: Daemon) -> int:
    return int((daemon.row("main", "app")["live"] or {}).get("ordinal", 0))


def test_render_from_a_local_daemon_shows_peer_urls_as_pods_reach_them_and_warns_of_loopback(
    tmp_path: Path, make_repo: Callable[..., ServiceRepo]
) -> None:
    """A local daemon gives its services loopback peer URLs and serves its git on
    loopback: the render shows the peer URLs the Kubernetes runtime gives (a peer's
    Service name), keeps what a person set, and says on stderr, one line each, what
    else in it no pod reaches."""
    with daemon_with(tmp_path / "home", "--git-listen", "127.0.0.1:0") as daemon:
        app, other = make_repo("app"), make_repo("other_app")
        for repo in (app, other):
            daemon.cli("repo", "add", str(repo.origin))
        wait_for(lambda: "OTHER_APP_URL" in daemon.answer("app", "main")["env"], 60, "its peer")
        ordinal = live(daemon) + 1
        daemon.cli(
            "env", "set", "app", "CACHE_URL=http://localhost:6379", "DOCS_URL=http://[::1]/café"
        )
        wait_for(lambda: live(daemon) == ordinal, 60, f"v{ordinal}")
        runs = daemon.answer("app", "main")["env"]
        done = daemon.cli("k8s", "render", "app")
        git = daemon.info["git"]
    assert runs["OTHER_APP_URL"].startswith("http://127.0.0.1:")  # what the local one gives
    objects = documents(done.stdout)
    config = next(o for name, o in objects.items() if name.startswith("ConfigMap/app-env-"))
    peer = names.object_name("other_app")  # other-app-181558: its Service's name
    assert config["data"]["OTHER_APP_URL"] == f"http://{peer}"
    assert config["data"]["CACHE_URL"] == "http://localhost:6379"  # set by a person: kept
    fetch = objects[f"Deployment/app-v{ordinal}"]["spec"]["template"]["spec"]["initContainers"][0]
    assert fetch["command"][-2] == f"{git}/app"
    assert done.stderr.splitlines() == [
        f"warning: pods fetch app from {git}/app, {LOOPBACK}: serve the daemon's git server "
        "where pods reach it (up --git-listen, --git-url)",
        f"warning: CACHE_URL is http://localhost:6379, {LOOPBACK}",
        f"warning: DOCS_URL is http://[::1]/caf\\xe9, {LOOPBACK}",  # a header is ASCII
    ]


def test_render_with_an_install_cache_shows_its_claim_and_the_key_of_the_revisions_environment(
    tmp_path: Path, make_repo: Callable[..., ServiceRepo]
) -> None:
    """``up --install-cache``: the Namespace's claim, the install mounting its service's
    part, and the key, the same for a commit of code alone, another for its requirements."""
    flags = ("--git-listen", "127.0.0.1:0", "--install-cache", "2Gi")
    more = ("--install-cache-class", "fast", "--install-cache-access", "ReadWriteMany")
    with daemon_with(tmp_path / "home", *flags, *more) as daemon:
        app = make_repo("app", stdlib_service(**{"requirements.txt": "# nothing yet\n"}))
        daemon.cli("repo", "add", str(app.origin))
        keys = []
        for ordinal, change in enumerate(
            [{}, {"x.txt": "code alone"}, {"requirements.txt": "# nothing, still\n"}], start=1
        ):
            if change:
                app.commit(change)
                app.push()
            wait_for(lambda: live(daemon) == ordinal, 60, f"v{ordinal}")  # noqa: B023
            objects = documents(daemon.cli("k8s", "render", "app").stdout)
            pod = objects[f"Deployment/app-v{ordinal}"]["spec"]["template"]["spec"]
            fetch, install = pod["initContainers"]
            keys.append({e["name"]: e.get("value") for e in install["env"]}["INSTALL_KEY"])
    assert list(objects)[:2] == ["Namespace/main", "PersistentVolumeClaim/branchyard-install-cache"]
    claim = objects["PersistentVolumeClaim/branchyard-install-cache"]
    assert claim["spec"] == {
        "accessModes": ["ReadWriteMany"],
        "resources": {"requests": {"storage": "2Gi"}},
        "storageClassName": "fast",
    }
    assert [m for m in install["volumeMounts"] if m["name"] == "cache"] == [
        {"mountPath": "/cache", "name": "cache", "subPath": "app"}
    ]
    for other in (fetch, *pod["containers"]):
        assert "cache" not in {m["name"] for m in other["volumeMounts"]}
    assert keys[0] == keys[1] != keys[2]
