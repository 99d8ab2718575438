"""``branchyard k8s render``: the real daemon renders the Kubernetes objects of a
service's newest revision, and the CLI prints them, as ``helm template`` does."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import yaml

from tests.conftest import Daemon, ServiceRepo, wait_for
from tests.githttp import GitHttpServer

pytestmark = pytest.mark.integration


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
