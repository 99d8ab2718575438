"""The daemon serves its registered local repos read-only over git's smart HTTP
(``up --git-listen``), as pods on Kubernetes fetch them: real git, a real daemon."""

from __future__ import annotations

import hashlib
import http.client
import os
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import yaml

from branchyard.gitserve import Address, address_of
from tests.conftest import (
    Daemon,
    ServiceRepo,
    git,
    start_daemon,
    stop_cleanly,
    wait_for,
)


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Daemon]:
    """A daemon whose git server listens on a free loopback port."""
    running = start_daemon(tmp_path / "home", "--poll-interval", "1", "--git-listen", "0")
    try:
        yield running
    finally:
        stop_cleanly(running)


@pytest.fixture
def web(served: Daemon, make_repo: Callable[..., ServiceRepo]) -> ServiceRepo:
    """A local repo ``web``, registered with the daemon that serves it."""
    repo = _plain_repo(make_repo, "web")
    served.cli("repo", "add", str(repo.origin))
    return repo


def _git_fails(*args: str, cwd: Path | None = None) -> str:
    done = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True)
    assert done.returncode != 0, done.stdout
    return done.stderr


def _plain_repo(make_repo: Callable[..., ServiceRepo], name: str) -> ServiceRepo:
    """A repo with nothing to deploy: what is served is its git, not a service."""
    return make_repo(name, {"README": f"{name}\n"})


def _get(daemon: Daemon, path: str, method: str = "GET") -> int:
    """The status of a request sent with ``path`` exactly as written."""
    host, port = daemon.info["git"].removeprefix("http://").rsplit(":", 1)
    connection = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        connection.request(method, path, body=b"" if method == "POST" else None)
        response = connection.getresponse()
        response.read()
        return response.status
    finally:
        connection.close()


@pytest.mark.integration
def test_a_registered_local_repo_clones_over_http_with_its_commits(
    served: Daemon, web: ServiceRepo, tmp_path: Path
) -> None:
    web.commit({"README": "second\n"}, "second")
    web.push()
    url = served.info["git"]
    assert f"git     {url}" in served.cli("info").stdout
    for name in ("web", "web.git"):
        git("clone", "-q", f"{url}/{name}", str(tmp_path / name))
        assert git("log", "--format=%H %s", cwd=tmp_path / name) == git(
            "log", "--format=%H %s", cwd=web.clone
        )
        assert (tmp_path / name / "README").read_text() == "second\n"
    listed = git("ls-remote", f"{url}/web")
    assert f"{git('rev-parse', 'HEAD', cwd=web.clone)}\trefs/heads/main" in listed


@pytest.mark.integration
def test_a_pods_fetch_script_as_k8s_render_prints_it_checks_out_a_local_repos_commit(
    served: Daemon, make_repo: Callable[..., ServiceRepo], tmp_path: Path
) -> None:
    app = make_repo("app")
    served.cli("repo", "add", str(app.origin))
    wait_for(lambda: served.row("main", "app")["latest"] is not None, 60, "a revision of app")
    rendered = yaml.safe_load_all(served.cli("k8s", "render", "app").stdout)
    deployment = next(o for o in rendered if o["kind"] == "Deployment")
    fetch = deployment["spec"]["template"]["spec"]["initContainers"][0]
    sha = git("rev-parse", "HEAD", cwd=app.clone)
    assert fetch["command"][-2:] == [f"{served.info['git']}/app", sha]
    # The init container's own script, run here: only its emptyDir is elsewhere.
    script = fetch["command"][2].replace("/workspace/", f"{tmp_path}/workspace/")
    subprocess.run(["sh", "-c", script, *fetch["command"][3:]], check=True)
    checkout = tmp_path / "workspace" / "src"
    assert (checkout / "Procfile").read_text() == (app.clone / "Procfile").read_text()


@pytest.mark.integration
@pytest.mark.parametrize("protocol", ["0", "2"])
def test_a_commit_fetches_by_sha_at_depth_1_whether_a_branch_points_at_it_or_not(
    served: Daemon, web: ServiceRepo, tmp_path: Path, protocol: str
) -> None:
    older = web.commit({"README": "older\n"}, "older")
    web.commit({"README": "head\n"}, "head")
    web.push()
    dropped = web.commit({"README": "dropped\n"}, "dropped")
    web.push()
    git("reset", "-q", "--hard", "HEAD~1", cwd=web.clone)
    git("push", "-q", "--force", "origin", "main", cwd=web.clone)  # a rollback's commit
    for sha, text in ((older, "older\n"), (dropped, "dropped\n")):
        pod = tmp_path / f"pod-{sha[:7]}"
        git("init", "-q", str(pod))
        url = f"{served.info['git']}/web"
        git("-c", f"protocol.version={protocol}", "fetch", "-q", "--depth", "1", url, sha, cwd=pod)
        git("checkout", "-q", "FETCH_HEAD", cwd=pod)
        assert (pod / "README").read_text() == text
        assert git("rev-list", "--count", "HEAD", cwd=pod) == "1"
    assert "allowanysha1inwant" not in git("config", "--list", cwd=web.origin).lower()


@pytest.mark.integration
def test_a_push_is_refused_and_changes_nothing(served: Daemon, web: ServiceRepo) -> None:
    before = git("for-each-ref", cwd=web.origin)
    web.commit({"README": "pushed\n"}, "pushed")
    url = f"{served.info['git']}/web"
    for refspec in ("main", "main:refs/heads/other"):
        stderr = _git_fails("push", url, refspec, cwd=web.clone)
        assert "read-only" in stderr and "403" in stderr, stderr
    assert _get(served, "/web/git-receive-pack", "POST") == 403
    assert git("for-each-ref", cwd=web.origin) == before


@pytest.mark.integration
def test_anything_but_a_registered_local_repo_is_not_found(
    served: Daemon, web: ServiceRepo
) -> None:
    # A remote repo is fetched from its URL: its mirror is not served (here its URL is
    # this very server).
    served.cli("repo", "add", f"{served.info['git']}/web.git", "--name", "remote")
    wait_for(lambda: any((served.home / "mirrors").iterdir()), 30, "the remote's mirror")
    upload = "info/refs?service=git-upload-pack"
    origin = str(web.origin).lstrip("/")
    for path in (
        f"/nope/{upload}",
        f"/remote/{upload}",
        f"/../{upload}",
        f"/web/../{upload}",
        f"/%2e%2e/{upload}",
        f"/{origin}/{upload}",
        f"//{origin}/{upload}",
        f"/{origin.replace('/', '%2F')}/{upload}",
        f"/web%2F..%2F..%2Fweb/{upload}",
        "/web/info/refs",  # the dumb protocol
        "/web/HEAD",
        "/web/objects/info/packs",
    ):
        assert _get(served, path) == 404, path
    assert _get(served, "/nope/git-upload-pack", "POST") == 404
    assert _get(served, f"/web/{upload}") == 200


def _big_repo(make_repo: Callable[..., ServiceRepo], megabytes: int) -> tuple[ServiceRepo, str]:
    """A repo with an incompressible file of ``megabytes`` and 40 branches (so a clone's
    request lists enough wants for git to gzip it); the file's sha256."""
    big = _plain_repo(make_repo, "big")
    data = os.urandom(megabytes * 1024 * 1024)
    (big.clone / "blob.bin").write_bytes(data)
    big.commit({}, "a big file")
    for number in range(40):
        git("branch", f"branch-{number:02}", cwd=big.clone)
    git("push", "-q", "origin", "--all", cwd=big.clone)
    return big, hashlib.sha256(data).hexdigest()


@pytest.mark.integration
def test_a_big_repo_with_many_branches_clones_whole(
    served: Daemon, make_repo: Callable[..., ServiceRepo], tmp_path: Path
) -> None:
    big, digest = _big_repo(make_repo, 24)
    served.cli("repo", "add", str(big.origin))
    git("clone", "-q", "--no-single-branch", f"{served.info['git']}/big", str(tmp_path / "copy"))
    assert hashlib.sha256((tmp_path / "copy" / "blob.bin").read_bytes()).hexdigest() == digest
    assert len(git("branch", "-r", cwd=tmp_path / "copy").splitlines()) == 42  # + main, HEAD


@pytest.mark.integration
def test_the_daemon_stops_while_a_client_stalls_mid_clone_and_leaves_no_git(
    tmp_path: Path, make_repo: Callable[..., ServiceRepo]
) -> None:
    big, _ = _big_repo(make_repo, 24)
    running = start_daemon(tmp_path / "home", "--git-listen", "127.0.0.1:0")
    try:
        running.cli("repo", "add", str(big.origin))
        sha = git("rev-parse", "HEAD", cwd=big.clone)
        want = f"want {sha}\n"
        body = f"{len(want) + 4:04x}{want}00000009done\n".encode()
        client = socket.socket()
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        client.connect(("127.0.0.1", int(running.info["git"].rsplit(":", 1)[1])))
        client.sendall(
            b"POST /big/git-upload-pack HTTP/1.1\r\nHost: pod\r\n"
            b"Content-Type: application/x-git-upload-pack-request\r\n"
            b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
        )
        head = client.recv(4096).lower()
        assert head.startswith(b"http/1.1 200") and b"transfer-encoding: chunked" in head, head
        assert b"content-length" not in head  # sent as git writes it, not held whole
        # The client reads no further: git waits, blocked, for it.
        stop_cleanly(running)
        client.close()
    finally:
        running.stop()


@pytest.mark.integration
@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--git-listen", "nowhere"], "not HOST:PORT"),
        (["--git-listen", "127.0.0.1:65536"], "not HOST:PORT"),
        (["--git-listen", "::1:9418"], "brackets"),
        (["--git-listen", "0.0.0.0:0"], "--git-url"),
        (["--git-listen", "0", "--git-url", "git.example.com"], "not an http"),
        (["--git-url", "http://git.example.com"], "needs --git-listen"),
        (["--git-listen", "127.0.0.1:{busy}"], "Address already in use"),
    ],
)
def test_a_bad_git_listen_or_git_url_stops_up_in_one_line(
    tmp_path: Path, args: list[str], words: str
) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        done = subprocess.run(
            [sys.executable, "-m", "branchyard", "--home", str(tmp_path / "home")]
            + ["up", "--router-port", "0"]
            + [arg.format(busy=port) for arg in args],
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert done.returncode == 1, done.stderr
    message = [line for line in done.stderr.splitlines() if " WARNING " not in line]
    assert len(message) == 1 and message[0].startswith("error: "), done.stderr
    assert words in message[0], done.stderr
    assert not (tmp_path / "home" / "daemon.json").exists()


@pytest.mark.parametrize(
    ("listen", "url", "expected"),
    [
        ("9418", None, Address("127.0.0.1", 9418)),
        (":9418", None, Address("127.0.0.1", 9418)),
        ("0", None, Address("127.0.0.1", 0)),
        ("10.0.0.5:9418", None, Address("10.0.0.5", 9418)),
        ("[::1]:9418", None, Address("::1", 9418)),
        ("git.local:80", None, Address("git.local", 80)),
        (
            "0.0.0.0:9418",
            "http://branchyard.branchyard.svc:9418/",
            Address("0.0.0.0", 9418, "http://branchyard.branchyard.svc:9418"),
        ),
        (
            "[::]:9418",
            "https://git.example.com/repos",
            Address("::", 9418, "https://git.example.com/repos"),
        ),
    ],
)
def test_git_listen_and_git_url_read_as(listen: str, url: str | None, expected: Address) -> None:
    assert address_of(listen, url, "127.0.0.1") == expected


@pytest.mark.parametrize(
    ("listen", "url"),
    [
        ("", None),
        ("host:", None),
        ("host:port", None),
        ("host:-1", None),
        ("host:65536", None),
        ("::1:9418", None),
        ("0.0.0.0:9418", None),
        (":::9418", None),
        ("9418", "ftp://git.example.com"),
        ("9418", "http://"),
        ("9418", "http://host/a b"),
        ("9418", "http://host/?x=1"),
    ],
)
def test_git_listen_and_git_url_refused(listen: str, url: str | None) -> None:
    with pytest.raises(ValueError):
        address_of(listen, url, "127.0.0.1")


@pytest.mark.parametrize(
    ("address", "port", "expected"),
    [
        (Address("127.0.0.1", 0), 40001, "http://127.0.0.1:40001"),
        (Address("::1", 9418), 9418, "http://[::1]:9418"),
        (Address("0.0.0.0", 9418, "http://branchyard:9418"), 9418, "http://branchyard:9418"),
    ],
)
def test_pods_fetch_from(address: Address, port: int, expected: str) -> None:
    assert address.url_at(port) == expected
