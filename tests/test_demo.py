"""The demo: real git repositories in a temp directory, and the sample services run for real."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest

from branchyard.demo import SERVICE_NAMES, DemoRepo, create_demo, workflow_text
from tests.conftest import free_port


def git(*args: str) -> str:
    return subprocess.run(["git", *args], check=True, capture_output=True, text=True).stdout.strip()


def get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as response:
        body: bytes = response.read()
        return body.decode("utf-8")


class Services:
    """Starts demo services as child processes and kills them all at the end."""

    def __init__(self) -> None:
        self.children: list[subprocess.Popen[str]] = []

    def start(self, repo: DemoRepo, env: Mapping[str, str], host: str = "127.0.0.1") -> str:
        """Run the repo's app.py on a free port with `env` and `HOST` (as the local runtime
        gives it: loopback); return its base URL once it listens."""
        port = free_port()
        child = subprocess.Popen(
            [sys.executable, "app.py"],
            cwd=repo.clone,
            env={"PATH": os.environ.get("PATH", ""), "HOST": host, "PORT": str(port), **env},
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.children.append(child)
        assert child.stdout is not None
        first_line = child.stdout.readline()
        assert first_line == f"listening on {port}\n", child.stderr and child.stderr.read()
        return f"http://{host}:{port}"

    def kill_all(self) -> None:
        for child in self.children:
            child.kill()
        for child in self.children:
            child.communicate(timeout=5)


@pytest.fixture
def demo(tmp_path: Path) -> list[DemoRepo]:
    return create_demo(tmp_path / "demo")


@pytest.fixture
def services() -> Iterator[Services]:
    started = Services()
    try:
        yield started
    finally:
        started.kill_all()


def namespace_env(repo: DemoRepo, **extra: str) -> dict[str, str]:
    return {
        "BRANCHYARD_NAMESPACE": "bugfix",
        "BRANCHYARD_SERVICE": repo.name,
        "BRANCHYARD_REVISION": git("-C", str(repo.clone), "rev-parse", "HEAD"),
        "BRANCHYARD_BRANCH": "bugfix",
        **extra,
    }


def test_demo_creates_three_bare_repos_whose_main_holds_a_procfile(
    demo: list[DemoRepo], tmp_path: Path
) -> None:
    root = (tmp_path / "demo").resolve()
    assert [repo.name for repo in demo] == ["app", "other_app", "web"] == list(SERVICE_NAMES)
    for repo in demo:
        assert repo.origin == root / ".origin" / f"{repo.name}.git"
        assert repo.clone == root / repo.name
        origin = str(repo.origin)
        assert git("--git-dir", origin, "rev-parse", "--is-bare-repository") == "true"
        assert git("--git-dir", origin, "symbolic-ref", "HEAD") == "refs/heads/main"
        assert git("--git-dir", origin, "show", "main:Procfile") == "web: python app.py"
        assert "app.py" in git("--git-dir", origin, "ls-tree", "--name-only", "main").split()


def test_demo_clones_are_on_main_pushed_to_their_bare_repo(demo: list[DemoRepo]) -> None:
    for repo in demo:
        clone = str(repo.clone)
        assert git("-C", clone, "branch", "--show-current") == "main"
        assert git("-C", clone, "remote", "get-url", "origin") == str(repo.origin)
        assert git("-C", clone, "status", "--porcelain") == ""
        head = git("-C", clone, "rev-parse", "HEAD")
        assert git("--git-dir", str(repo.origin), "rev-parse", "main") == head
        identity = git("-C", clone, "log", "-1", "--format=%an|%cn")
        assert identity == "branchyard demo|branchyard demo"


def test_demo_refuses_an_existing_directory_and_changes_nothing(
    demo: list[DemoRepo], tmp_path: Path
) -> None:
    heads = {repo.name: git("-C", str(repo.clone), "rev-parse", "HEAD") for repo in demo}
    with pytest.raises(FileExistsError, match="already exists"):
        create_demo(tmp_path / "demo")
    for repo in demo:
        assert git("-C", str(repo.clone), "rev-parse", "HEAD") == heads[repo.name]
        assert git("--git-dir", str(repo.origin), "rev-parse", "main") == heads[repo.name]


def test_demo_refuses_when_only_one_clone_exists_and_writes_nothing(tmp_path: Path) -> None:
    (tmp_path / "web").mkdir()
    (tmp_path / "web" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="web"):
        create_demo(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["web"]
    assert (tmp_path / "web" / "notes.txt").read_text() == "mine"


def test_app_and_other_app_answer_who_they_are(demo: list[DemoRepo], services: Services) -> None:
    for repo in demo[:2]:
        env = namespace_env(repo)
        url = services.start(repo, env)
        assert json.loads(get(url + "/")) == {
            "service": repo.name,
            "namespace": "bugfix",
            "revision": env["BRANCHYARD_REVISION"][:7],
            "branch": "bugfix",
        }


def test_every_demo_service_binds_the_host_branchyard_gives(
    demo: list[DemoRepo], services: Services
) -> None:
    # 127.0.0.2 is loopback too, but not 127.0.0.1: a service that binds HOST answers
    # there and only there, as one in a pod answers on HOST=0.0.0.0, at the pod's IP
    for repo in demo:
        url = services.start(repo, namespace_env(repo), host="127.0.0.2")
        assert get(url + "/")
        port = int(url.rsplit(":", 1)[1])
        with pytest.raises(OSError):
            get(f"http://127.0.0.1:{port}/")


def test_web_page_shows_both_peers_answers_and_env_lists_its_wiring(
    demo: list[DemoRepo], services: Services
) -> None:
    app, other_app, web = demo
    app_url = services.start(app, namespace_env(app))
    other_app_url = services.start(other_app, namespace_env(other_app))
    web_env = namespace_env(web, APP_URL=app_url, OTHER_APP_URL=other_app_url + "/")
    web_url = services.start(web, {**web_env, "GREETING": "hi there"})

    page = get(web_url + "/")
    assert get(app_url + "/") in page
    assert get(other_app_url + "/") in page
    assert '"service": "app"' in page and '"service": "other_app"' in page
    assert "hi there from web" in page
    assert web_env["BRANCHYARD_REVISION"][:7] in page

    assert json.loads(get(web_url + "/env")) == {
        "APP_URL": app_url,
        "OTHER_APP_URL": other_app_url + "/",
        "GREETING": "hi there",
        "BRANCHYARD_NAMESPACE": "bugfix",
        "BRANCHYARD_SERVICE": "web",
        "BRANCHYARD_REVISION": web_env["BRANCHYARD_REVISION"],
        "BRANCHYARD_BRANCH": "bugfix",
    }


def test_web_page_reports_a_missing_or_unreachable_peer_instead_of_failing(
    demo: list[DemoRepo], services: Services
) -> None:
    web = demo[2]
    dead_url = f"http://127.0.0.1:{free_port()}"
    web_url = services.start(web, namespace_env(web, APP_URL=dead_url))

    page = get(web_url + "/")
    assert f"unreachable at {dead_url}" in page
    assert "OTHER_APP_URL is not set" in page
    assert "hello from web" in page


def test_workflow_text_uses_the_demo_directory_and_the_router_port(tmp_path: Path) -> None:
    text = workflow_text(tmp_path / "my demo", "http://127.0.0.1:7081")
    lines = text.splitlines()
    assert lines[0] == f"cd '{(tmp_path / 'my demo').resolve()}'"
    assert "git -C app checkout -b bugfix && git -C app push origin bugfix" in lines
    assert "branchyard -n bugfix ps -q" in lines
    assert "branchyard -n bugfix edit web" in lines
    assert "curl http://web.bugfix.localhost:7081/" in lines
    assert "curl http://web.main.localhost:7081/" in lines


def test_workflow_text_leaves_out_a_default_port() -> None:
    text = workflow_text(Path("/srv/demo"), "http://127.0.0.1")
    assert "curl http://web.bugfix.localhost/" in text.splitlines()


def test_demo_removes_what_it_created_when_git_cannot_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "keep.txt").write_text("mine")
    monkeypatch.setenv("PATH", str(tmp_path / "no-such-bin"))
    with pytest.raises(FileNotFoundError):
        create_demo(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt"]
    with pytest.raises(FileNotFoundError):
        create_demo(tmp_path / "new" / "demo")
    assert not (tmp_path / "new" / "demo").exists()
