"""A repo URL that carries credentials (``https://user:TOKEN@host/app.git``): it is
fetched with them, and they are shown nowhere: not by ``repo add``, ``repo ls``,
``events`` or ``k8s render``, not in the daemon's log, and not in the command line
of any git process (``ps``) while the daemon lists and fetches. ``k8s render`` shows the
URL pods fetch without them, and the Secret that gives them to the fetch, redacted."""

from __future__ import annotations

import uuid
from collections.abc import Callable

import pytest
import yaml

from tests.conftest import Daemon, ServiceRepo, wait_for
from tests.githttp import GitHttpServer

pytestmark = pytest.mark.integration


def test_a_repo_url_with_credentials_deploys_and_shows_them_nowhere(
    daemon: Daemon, make_repo: Callable[..., ServiceRepo]
) -> None:
    app = make_repo("app")
    token = f"t0ken-{uuid.uuid4().hex}"
    with GitHttpServer(app.origin.parent, credentials=("deployer", token)) as server:
        url = f"{server.url}/app.git".replace("http://", f"http://deployer:{token}@")
        added = daemon.cli("repo", "add", url)
        wait_for(lambda: daemon.answer("app"), 60, "app live")
        sha = app.commit({"x.txt": "1"}, "second")
        app.push()
        wait_for(lambda: daemon.serves("app", "main", sha), 60, "the push deployed")
        shown = {
            "repo add": added.stdout,
            "repo ls": daemon.cli("repo", "ls").stdout,
            "events": daemon.cli("events").stdout,
            "ps": daemon.cli("ps").stdout,
        }
        render = daemon.cli("k8s", "render", "app")
    assert server.unauthorized > 0  # the server asked for the credentials
    assert server.processes_seen > 0 and server.shown_in_argv == []
    log = (daemon.home.parent / f"{daemon.home.name}-daemon.log").read_text()
    for what, text in {**shown, "k8s render": render.stdout + render.stderr, "log": log}.items():
        assert token not in text, what
    masked = url.replace(token, "***")
    assert masked in shown["repo add"] and masked in shown["repo ls"], shown
    assert f"added app from {masked}" in shown["events"]
    objects = {f"{d['kind']}/{d['metadata']['name']}": d for d in yaml.safe_load_all(render.stdout)}
    pod = next(o for name, o in objects.items() if name.startswith("Deployment/"))["spec"]
    fetch = pod["template"]["spec"]["initContainers"][0]
    assert fetch["command"][-2:] == [f"{server.url}/app.git", sha]
    assert objects["Secret/app-git"]["stringData"] == {
        "username": "(redacted)", "password": "(redacted)"
    }  # fmt: skip
    assert "deployer" not in render.stdout + render.stderr
