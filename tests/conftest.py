"""Shared fixtures: real git repos, a real daemon on free ports, the real CLI.

Integration tests never fake git, processes or sockets. Every daemon gets a
temp home and a unique marker in its environment, which it hands to its boxes
(``--pass-env``), so a test can find its services' processes. Every daemon a test
starts goes through one check, :func:`stop_cleanly`: exit code 0, no traceback in
its log, and nothing left of it, found by what it made (see ``leftovers``). A daemon
killed on purpose (:meth:`Daemon.kill`) is answered for by the next daemon on its
home, which must stop cleanly; the fixture :func:`every_daemon_checked` fails a
test that leaves a daemon unchecked.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import pytest

from bench.common import processes_with as processes_with  # for the tests, too
from bench.services import Wheels, serve_wheels
from branchyard.runtime.processes import Ports
from tests import k8s_cluster, k8s_crds, k8s_real_node
from tests.leftovers import NOTHING_MADE, Made, home_cgroups, left_behind

T = TypeVar("T")

GIT_IDENTITY = {
    "GIT_AUTHOR_NAME": "Tess Ter",
    "GIT_AUTHOR_EMAIL": "tess@example.com",
    "GIT_COMMITTER_NAME": "Tess Ter",
    "GIT_COMMITTER_EMAIL": "tess@example.com",
}
os.environ.update(GIT_IDENTITY)

SERVICE = """\
import json, os, urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

STARTED = os.urandom(8).hex()  # this process; its pid is 2 or so in its box

class Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_GET(self):
        if self.path.startswith("/call/"):
            url = os.environ[self.path.removeprefix("/call/")]
            with urllib.request.urlopen(url, timeout=5) as answer:
                body = answer.read()
        else:
            env = {k: v for k, v in os.environ.items()
                   if k.startswith("BRANCHYARD_") or k.endswith("_URL")
                   or k in ("PORT", "GREETING", "VERSION")}
            body = json.dumps({"started": STARTED, "env": env}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

print("listening on", os.environ["PORT"], flush=True)
ThreadingHTTPServer(("127.0.0.1", int(os.environ["PORT"])), Handler).serve_forever()
"""


def git(*args: str, cwd: Path | None = None) -> str:
    done = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=True)
    return done.stdout.strip()


def wait_for(check: Callable[[], T], timeout: float = 30.0, what: str = "condition") -> T:
    """Poll ``check`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        try:
            result = check()
        except (AssertionError, OSError, ValueError) as exc:
            last = exc
        else:
            if result:
                return result
            last = result
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}; last: {last!r}")


PORTS = Ports()


def free_port() -> int:
    """A free loopback port for a daemon to listen on later, outside the kernel's ephemeral
    range: a ``bind(0)`` port is one the kernel may hand to any outgoing connection
    between this pick and the daemon's own bind. Never one handed out before in this run."""
    return PORTS.take()


@dataclass
class ServiceRepo:
    """A bare 'origin' repo and a working clone to commit and push from."""

    name: str
    origin: Path
    clone: Path

    def write(self, files: dict[str, str]) -> None:
        for relative, text in files.items():
            path = self.clone / relative
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)

    def commit(self, files: dict[str, str], message: str = "change") -> str:
        self.write(files)
        git("add", "-A", cwd=self.clone)
        git("commit", "-q", "--allow-empty", "-m", message, cwd=self.clone)
        return git("rev-parse", "HEAD", cwd=self.clone)

    def push(self, branch: str | None = None) -> None:
        git("push", "-q", "origin", branch or self.branch(), cwd=self.clone)

    def branch(self) -> str:
        return git("rev-parse", "--abbrev-ref", "HEAD", cwd=self.clone)

    def checkout(self, branch: str, new: bool = True) -> None:
        git("checkout", "-q", *(["-b"] if new else []), branch, cwd=self.clone)


@pytest.fixture
def make_repo(tmp_path: Path) -> Callable[..., ServiceRepo]:
    def make(name: str, files: dict[str, str] | None = None) -> ServiceRepo:
        origin = tmp_path / "origin" / f"{name}.git"
        clone = tmp_path / "work" / name
        git("init", "-q", "--bare", "-b", "main", str(origin))
        git("init", "-q", "-b", "main", str(clone))
        git("remote", "add", "origin", str(origin), cwd=clone)
        repo = ServiceRepo(name, origin, clone)
        repo.commit(files if files is not None else stdlib_service(), "first")
        repo.push("main")
        return repo

    return make


def stdlib_service(**extra: str) -> dict[str, str]:
    return {"Procfile": "web: python app.py\n", "app.py": SERVICE, **extra}


@dataclass
class Daemon:
    home: Path
    process: subprocess.Popen[bytes]
    marker: str
    info: dict[str, Any] = field(default_factory=dict)
    checked: bool = False  # went through stop_cleanly

    @property
    def router_port(self) -> int:
        return int(self.info["router"].rsplit(":", 1)[1])

    def cli(
        self, *args: str, env: dict[str, str] | None = None, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(
            [sys.executable, "-m", "branchyard", "--home", str(self.home), *args],
            capture_output=True,
            text=True,
            env={**os.environ, **(env or {})},
            timeout=60,
        )
        if check and done.returncode != 0:
            raise AssertionError(f"branchyard {' '.join(args)} failed: {done.stderr}")
        return done

    def follow(self, *args: str) -> subprocess.Popen[str]:
        """A CLI command that goes on (``logs -f``), its output a pipe to read lines from."""
        command = [sys.executable, "-m", "branchyard", "--home", str(self.home), *args]
        return subprocess.Popen(command, stdout=subprocess.PIPE, text=True)

    def ps_q(self, namespace: str = "main") -> list[str]:
        return self.cli("-n", namespace, "ps", "-q").stdout.split()

    def ps_json(self, *args: str) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = json.loads(self.cli("ps", "--format", "json", *args).stdout)
        return rows

    def row(self, namespace: str, service: str) -> dict[str, Any]:
        for row in self.ps_json("-A"):
            if (row["namespace"], row["service"]) == (namespace, service):
                return row
        raise AssertionError(f"{namespace}:{service} not in ps")

    def get(self, host: str, path: str = "/", port: int | None = None) -> tuple[int, bytes]:
        connection = http.client.HTTPConnection("127.0.0.1", port or self.router_port, timeout=10)
        try:
            connection.request("GET", path, headers={"Host": host})
            response = connection.getresponse()
            return response.status, response.read()
        finally:
            connection.close()

    def answer(self, service: str, namespace: str = "main", path: str = "/") -> dict[str, Any]:
        """The JSON a service answers through the router (raises unless 200)."""
        status, body = self.get(f"{service.replace('_', '-')}.{namespace}.localhost", path)
        assert status == 200, (status, body[:200])
        result: dict[str, Any] = json.loads(body)
        return result

    def host_pid(self, service: str, namespace: str = "main") -> int:
        """The pid here of the process answering for a service (in its box it has another)."""
        port = self.answer(service, namespace)["env"]["PORT"]
        for pid in processes_with(self.marker):
            try:
                argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
                environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            except OSError:
                continue
            if argv[0].endswith(b"python") and f"PORT={port}".encode() in environ:
                return pid
        raise AssertionError(f"no process answers for {service} in {namespace}")

    def serves(self, service: str, namespace: str, sha: str) -> bool:
        try:
            return bool(self.answer(service, namespace)["env"]["BRANCHYARD_REVISION"] == sha)
        except (AssertionError, OSError, ValueError, KeyError):
            return False

    def page(self, path: str, method: str = "GET", session: bool = True) -> tuple[int, str]:
        """A dashboard page as a browser gets it, logged in unless not ``session``
        (then ``path`` is under the session's ``/d/KEY``, where the login sent it):
        (status, body); a redirect's body is its Location."""
        api = int(self.info["api"].rsplit(":", 1)[1])
        token = (self.home / "token").read_text().strip()
        connection = http.client.HTTPConnection("127.0.0.1", api, timeout=10)
        try:
            headers = {}
            if session:
                auth = {"Authorization": f"Bearer {token}"}
                connection.request("POST", "/api/dashboard/login-code", headers=auth)
                code = json.loads(connection.getresponse().read())["code"]
                connection.request("GET", f"/login?code={code}")
                login = connection.getresponse()
                login.read()
                headers["Cookie"] = login.getheader("set-cookie", "").split(";", 1)[0]
                path = login.getheader("location", "").rstrip("/") + path
            connection.request(method, path, headers=headers)
            response = connection.getresponse()
            body = response.read().decode()
            return response.status, response.getheader("location") or body
        finally:
            connection.close()

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            self.process.wait(timeout=60)
        return self.process.returncode

    def kill(self) -> None:
        """Kill it with SIGKILL, on purpose: the next daemon on its home answers for what
        it left (that one's :func:`stop_cleanly` finds it)."""
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()

    @property
    def log(self) -> str:
        """What it printed (its log, beside its home)."""
        return (self.home.parent / f"{self.home.name}-daemon.log").read_text(errors="replace")


def start_daemon(home: Path, *extra: str, wrap: Sequence[str] = ()) -> Daemon:
    """A daemon on ``home``; ``wrap`` is a command that execs it (``unshare --mount``)."""
    marker = f"BRANCHYARD_TEST_MARK_{uuid.uuid4().hex}"
    log = (home.parent / f"{home.name}-daemon.log").open("wb")
    process = subprocess.Popen(
        [
            *wrap,
            sys.executable,
            "-m",
            "branchyard",
            "--home",
            str(home),
            "up",
            "--router-port",
            "0",
            "--pass-env",  # boxes get none of the daemon's environment unless passed
            "BY_TEST",
            *extra,
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, "BY_TEST": marker},
    )
    daemon = Daemon(home, process, marker)
    STARTED.append(daemon)

    def ready() -> bool:
        assert process.poll() is None, "daemon exited early"
        daemon.info = json.loads((home / "daemon.json").read_text())
        return bool(daemon.info["pid"] == process.pid)  # not one a killed daemon left

    wait_for(ready, 20, "daemon.json")
    return daemon


def stop_cleanly(running: Daemon) -> None:
    """Stop a daemon, and check that it stopped cleanly: exit code 0, no traceback in its
    log, and nothing left of it or of an earlier daemon of its home (``leftovers``): no
    process it ran, no bwrap with its home's mark, no running process group of its
    store's table, no cgroup of its home, no mount under it, no network namespace its
    boxes had."""
    running_now = running.process.poll() is None
    made = Made.by(running.process.pid, running.home) if running_now else NOTHING_MADE
    try:
        code = running.stop()
        log = running.log
        assert code == 0, log[-3000:]
        assert "Traceback" not in log, log[max(0, log.index("Traceback") - 300) :][:6000]
        nothing_left(running.home, made)
    finally:
        made.close()
    running.checked = True


def nothing_left(home: Path, made: Made = NOTHING_MADE) -> None:
    """Wait until nothing is left of ``home``'s daemons (and of what one ``made``); fail
    naming what stayed."""
    deadline = time.monotonic() + 15
    while left := left_behind(home, made):
        if time.monotonic() > deadline:
            raise AssertionError(f"left behind by the daemons of {home}: {left}")
        time.sleep(0.05)


STARTED: list[Daemon] = []  # every daemon the tests started, in order


@pytest.fixture(autouse=True)
def every_daemon_checked() -> Iterator[None]:
    """Every daemon a test starts goes through :func:`stop_cleanly`, or was killed on
    purpose and a later daemon of its home did. After the test, the cgroups a killed
    daemon left are removed either way (so that one failure does not spill into the
    next tests). A daemon a module's fixture started is that fixture's to check."""
    first = len(STARTED)
    yield
    started = STARTED[first:]
    unchecked = []
    for index, daemon in enumerate(started):
        if daemon.process.poll() is None:
            daemon.stop()
        answered = daemon.process.returncode == -signal.SIGKILL and any(
            later.checked and later.home == daemon.home for later in started[index + 1 :]
        )
        if not (daemon.checked or answered):
            unchecked.append(f"{daemon.home} (exit {daemon.process.returncode})")
    for home in {daemon.home for daemon in started}:
        for parent in home_cgroups(home):
            for cgroup in [*(d for d in parent.iterdir() if d.is_dir()), parent]:
                wait_for(partial(_removed, cgroup), 15, f"{cgroup} emptied")
    assert not unchecked, f"daemons not stopped through stop_cleanly: {unchecked}"


def _removed(cgroup: Path) -> bool:
    try:
        cgroup.rmdir()
    except OSError:
        return False
    return True


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Daemon]:
    with daemon_with(tmp_path / "home") as running:
        yield running


@pytest.fixture
def wheels(tmp_path: Path) -> Wheels:
    """Wheels served by URL on loopback: an install's box shows none of this machine's files."""
    return serve_wheels(tmp_path / "wheels")


@pytest.fixture
def wheel_daemon(tmp_path: Path, wheels: Wheels) -> Iterator[Daemon]:
    """The ``daemon`` fixture's daemon, whose boxes reach the wheels' port (and nothing else
    of this machine: ``up --expose-host-port``)."""
    with daemon_with(tmp_path / "home", *wheels.flags) as running:
        yield running


@contextlib.contextmanager
def daemon_with(home: Path, *flags: str) -> Iterator[Daemon]:
    """A daemon on ``home`` polling every second, with ``flags``; stopped cleanly after."""
    running = start_daemon(home, "--poll-interval", "1", *flags)
    try:
        yield running
    finally:
        stop_cleanly(running)


@dataclass(frozen=True)
class Cluster:
    """A running test control plane (scripts/k8s-test-cluster): its folder and kubeconfig."""

    directory: Path
    kubeconfig: Path


def cannot_run(reason: str) -> NoReturn:
    """A test that cannot run here: skipped, but failed in CI (``CI=true``), where every
    test must run."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason} (CI=true: it must run)")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def k8s_binaries() -> Path:
    """The test control plane's binaries (scripts/setup builds them). Skipped (failed in CI)
    only where Go, which builds them, is missing."""
    if k8s_cluster.go() is None:
        cannot_run("go is not on the PATH: it builds the test Kubernetes control plane")
    binaries = k8s_cluster.built()
    if binaries is None:
        pytest.fail("the test control plane is not built: run scripts/k8s-test-cluster build")
    return binaries


@pytest.fixture(scope="session")
def k8s(k8s_binaries: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """One test control plane for the session's tests marked ``k8s``, stopped at the end
    with no process left."""
    script = Path(__file__).resolve().parent.parent / "scripts" / "k8s-test-cluster"
    directory = tmp_path_factory.mktemp("k8s") / "cluster"
    done = subprocess.run([script, "start", directory], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    try:
        yield Cluster(directory, Path(done.stdout.strip()))
    finally:
        stopped = subprocess.run([script, "stop", directory], capture_output=True, text=True)
        assert stopped.returncode == 0, stopped.stderr
        assert not k8s_cluster.running(directory)


@pytest.fixture(scope="session")
def k8s_real(k8s: Cluster) -> Iterator[Cluster]:
    """The session's test cluster with its real node (tests/k8s_real_node.py), started the
    first time a test asks for it and stopped before the cluster, nothing left behind.
    Skipped (failed in CI) where the node cannot run: not root, not Debian's packages."""
    reason = k8s_real_node.problem()
    if reason is not None:
        cannot_run(reason)
    k8s_real_node.start(k8s.directory)
    try:
        yield k8s
    finally:
        k8s_real_node.stop(k8s.directory)
        assert not k8s_real_node.left_behind(k8s.directory)


@pytest.fixture
def gateway_api(k8s: Cluster) -> Iterator[None]:
    """The Gateway API's CRDs (standard channel) in the test control plane for one test,
    removed at its end, with every object of theirs (the runtime runs with and without
    them)."""
    k8s_crds.install_gateway_api(k8s.kubeconfig)
    try:
        yield
    finally:
        k8s_crds.remove_gateway_api(k8s.kubeconfig)
