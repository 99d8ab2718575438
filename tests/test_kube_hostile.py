"""A hostile service pushed on a branch, run on the test cluster's real node by the real
daemon (``up --runtime kubernetes``), tries what the local probe tries
(tests/test_sandbox_probe.py) and what a pod could try besides: writing the system, its
checkout and its environment; a service-account token; the API server and the kubelet
without credentials; another namespace's Secret; the daemon's API and router; raising
its privileges; the outside world. Each fails, as docs/security.md says. What succeeds
is what the docs say only a NetworkPolicy stops (a peer call to another namespace's
Service) and the git server pods fetch from. Its report, in its log too, holds no secret
of another service's."""

from __future__ import annotations

import contextlib
import json
import subprocess
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from lightkube import ApiError, Client, KubeConfig
from lightkube.resources.core_v1 import Namespace, Service

from branchyard.runtime.kube import names
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
from tests.k8s_real_node import BRIDGE, GATEWAY, KUBELET_PORT, daemon_flags

pytestmark = [pytest.mark.k8s, pytest.mark.integration, pytest.mark.timeout(300)]

DB_PASSWORD = "vaults-own-db-password-on-k8s"
OUTSIDE = "192.0.2.1"  # a documentation address: no route to it from a pod

VAULT = """\
import os
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

class Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_GET(self):
        body = b"vault in main"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

ThreadingHTTPServer((os.environ["HOST"], int(os.environ["PORT"])), Handler).serve_forever()
"""

PROBE = """\
import errno, glob, json, os, socket, ssl, urllib.error, urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

TARGETS = json.load(open("targets.json"))
UNVERIFIED = ssl._create_unverified_context()  # no CA in the pod: no service account


def failure(error):
    return errno.errorcode.get(error.errno, str(error)) if error.errno else type(error).__name__


def read(path):
    try:
        with open(path, "rb") as file:
            return file.read().decode("latin-1")
    except OSError as error:
        return failure(error)


def write(path):
    try:
        with open(path, "a") as file:
            file.write("x")
        return "written"
    except OSError as error:
        return failure(error)


def connect(host, port):
    try:
        socket.create_connection((host, port), timeout=3).close()
        return "connected"
    except OSError as error:
        return failure(error)


def get(url):
    try:
        with urllib.request.urlopen(url, timeout=5, context=UNVERIFIED) as answer:
            return [answer.status, answer.read(300).decode()]
    except urllib.error.HTTPError as error:
        body = error.read().decode()
        try:
            return [error.code, json.loads(body)["message"]]
        except ValueError:
            return [error.code, body.strip()]
    except OSError as error:
        return [None, str(error)]


def setuid():
    try:
        os.setuid(0)
        return "root"
    except OSError as error:
        return failure(error)


def status():
    lines = (line.split(":", 1) for line in read("/proc/self/status").splitlines())
    keep = ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb", "NoNewPrivs", "Seccomp")
    return {key: value.strip() for key, value in lines if key in keep}


def probe():
    return {
        "ids": [os.getuid(), os.getgid()],
        "setuid": setuid(),
        "status": status(),
        "writes": {path: write(path) for path in TARGETS["writes"]},
        "service_account": os.path.exists("/var/run/secrets/kubernetes.io/serviceaccount"),
        "env": sorted(os.environ),
        "environs": [read(path) for path in sorted(glob.glob("/proc/[0-9]*/environ"))],
        "shm_size": os.statvfs("/dev/shm").f_blocks * os.statvfs("/dev/shm").f_frsize,
        "pids": len([pid for pid in os.listdir("/proc") if pid.isdigit()]),
        "cgroup": {path: read("/sys/fs/cgroup/" + path).strip() for path in TARGETS["cgroup"]},
        "get": {name: get(url) for name, url in TARGETS["get"].items()},
        "connect": {f"{host}:{port}": connect(host, port) for host, port in TARGETS["connect"]},
    }


REPORT = json.dumps(probe(), sort_keys=True)
print(REPORT, flush=True)


class Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_GET(self):
        body = REPORT.encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


ThreadingHTTPServer((os.environ["HOST"], int(os.environ["PORT"])), Handler).serve_forever()
"""

WRITES = (
    "/x",
    "/etc/x",
    "/usr/lib/x",
    "/var/x",
    "/root/x",
    "/workspace/x",
    "/workspace/src/x",
    "/workspace/src/app.py",
    "/workspace/venv/x",
    "/workspace/venv/bin/python",
    "/tmp/x",
    "/home/service/x",
    "/etc/hosts",
    "/etc/resolv.conf",
    "/etc/hostname",
    "/dev/termination-log",
    "/dev/shm/x",
)
CGROUP = (
    "memory/memory.limit_in_bytes",
    "cpu/cpu.cfs_quota_us",
    "cpu/cpu.cfs_period_us",
    "pids/pids.max",
)


@dataclass(frozen=True)
class Hostile:
    """The daemon, its namespaces' names in the cluster, and what the probe reported."""

    daemon: Daemon
    client: Client
    main: str
    evil: str
    report: dict[str, Any]
    git_port: int


def repo(root: Path, name: str, files: dict[str, str]) -> ServiceRepo:
    origin, clone = root / "origin" / f"{name}.git", root / "work" / name
    git("init", "-q", "--bare", "-b", "main", str(origin))
    git("init", "-q", "-b", "main", str(clone))
    git("remote", "add", "origin", str(origin), cwd=clone)
    made = ServiceRepo(name, origin, clone)
    made.commit(files, "first")
    made.push("main")
    return made


def other_addresses() -> list[str]:
    """This machine's IPv4 addresses on its interfaces but loopback and the bridge."""
    done = subprocess.run(["ip", "-j", "-4", "address"], capture_output=True, text=True)
    return [
        info["local"]
        for interface in json.loads(done.stdout)
        if interface["ifname"] not in ("lo", BRIDGE)
        for info in interface["addr_info"]
    ]


def live(daemon: Daemon, namespace: str, service: str) -> bool:
    rows = daemon.ps_json("-n", namespace)
    return any(r["service"] == service and r["state"].startswith("live") for r in rows)


def cluster_get(client: Client, namespace: str, service: str) -> str:
    found = client.get(Service, service, namespace=namespace)
    assert found.spec is not None
    with urllib.request.urlopen(f"http://{found.spec.clusterIP}/", timeout=10) as answer:
        return str(answer.read().decode())


@pytest.fixture(scope="module")
def hostile(k8s_real: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hostile]:
    root = tmp_path_factory.mktemp("hostile")
    prefix = f"h{uuid.uuid4().hex[:6]}-"
    main, evil = f"{prefix}main", f"{prefix}evil"
    git_port = free_port()
    daemon = start_daemon(
        root / "home",
        "--poll-interval", "1", "--drain-grace", "0", "--runtime", "kubernetes",
        "--kubeconfig", str(k8s_real.kubeconfig), "--namespace-prefix", prefix,
        "--git-listen", f"{GATEWAY}:{git_port}", *daemon_flags(),
    )  # fmt: skip
    client = Client(config=KubeConfig.from_file(k8s_real.kubeconfig))
    try:
        vault = repo(root, "vault", {"Procfile": "web: python app.py\n", "app.py": VAULT})
        daemon.cli("repo", "add", str(vault.origin))
        daemon.cli("env", "set", "vault", "--secret", f"DB_PASSWORD={DB_PASSWORD}")
        wait_for(lambda: (daemon.row("main", "vault")["live"] or {}).get("ordinal") == 2, 120)
        api, router = int(daemon.info["api"].rsplit(":", 1)[1]), daemon.router_port
        secret = f"vault-secret-{names.content_hash({'DB_PASSWORD': DB_PASSWORD})}"
        apiserver = "https://kubernetes.default.svc"
        targets = {
            "writes": WRITES,
            "cgroup": CGROUP,
            "get": {
                "version": f"{apiserver}/version",
                "secrets": f"{apiserver}/api/v1/secrets",
                "main_secrets": f"{apiserver}/api/v1/namespaces/{main}/secrets",
                "vault_secret": f"{apiserver}/api/v1/namespaces/{main}/secrets/{secret}",
                "own_pods": f"{apiserver}/api/v1/namespaces/{evil}/pods",
                "kubelet": f"https://{GATEWAY}:{KUBELET_PORT}/pods",
                "git": f"http://{GATEWAY}:{git_port}/vault/info/refs?service=git-upload-pack",
                "peer": f"http://vault.{main}.svc.cluster.local/",
            },
            "connect": [
                (GATEWAY, api),
                (GATEWAY, router),
                ("127.0.0.1", api),
                ("127.0.0.1", router),
                (OUTSIDE, 80),
                *((address, 22) for address in other_addresses()),
            ],
        }
        probe = repo(root, "probe", {"Procfile": "web: python app.py\n", "app.py": VAULT})
        daemon.cli("repo", "add", str(probe.origin))
        wait_for(lambda: live(daemon, "main", "probe"), 120, "probe live in main")
        probe.checkout("evil")
        probe.commit({"app.py": PROBE, "targets.json": json.dumps(targets)}, "probe")
        probe.push("evil")
        wait_for(lambda: live(daemon, "evil", "probe"), 120, "probe live in evil")
        text = wait_for(lambda: cluster_get(client, evil, "probe"), 30, "the probe's report")
        yield Hostile(daemon, client, main, evil, json.loads(text), git_port)
    finally:
        stop_cleanly(daemon)
        for made in (main, evil):  # its pods leave the real node to the session's next tests
            with contextlib.suppress(ApiError):
                client.delete(Namespace, made)
        client.close()


def test_it_runs_as_nobody_with_no_capability_and_cannot_gain_one(hostile: Hostile) -> None:
    assert hostile.report["ids"] == [65534, 65534]
    assert hostile.report["setuid"] == "EPERM"
    none = "0000000000000000"
    assert hostile.report["status"] == {
        "CapInh": none,
        "CapPrm": none,
        "CapEff": none,
        "CapBnd": none,
        "CapAmb": none,
        "NoNewPrivs": "1",
        "Seccomp": "2",  # filtered: the RuntimeDefault profile
    }


def test_it_writes_only_its_tmp_its_home_its_shm_and_its_termination_log(
    hostile: Hostile,
) -> None:
    assert hostile.report["writes"] == {
        "/x": "EROFS",
        "/etc/x": "EROFS",
        "/usr/lib/x": "EROFS",
        "/var/x": "EROFS",
        "/root/x": "EACCES",
        "/workspace/x": "EROFS",
        "/workspace/src/x": "EROFS",  # its checkout
        "/workspace/src/app.py": "EROFS",
        "/workspace/venv/x": "EROFS",  # its environment
        "/workspace/venv/bin/python": "EACCES",  # a link to the image's, root's
        "/tmp/x": "written",  # an emptyDir of 256Mi
        "/home/service/x": "written",  # HOME: an emptyDir of 256Mi
        "/etc/hosts": "EACCES",  # the kubelet's files of the pod, root's
        "/etc/resolv.conf": "EACCES",
        "/etc/hostname": "EACCES",
        "/dev/termination-log": "written",
        "/dev/shm/x": "written",  # the pod's own tmpfs (below), its pages its memory's
    }
    assert hostile.report["shm_size"] == 64 * 1024**2


def test_it_has_no_service_account_token_and_the_api_server_gives_it_nothing(
    hostile: Hostile,
) -> None:
    assert hostile.report["service_account"] is False
    got = hostile.report["get"]
    assert got["version"][0] == 200  # what the API server tells anyone (public info)
    anonymous = 'is forbidden: User "system:anonymous" cannot'
    assert got["secrets"] == [
        403,
        f'secrets {anonymous} list resource "secrets" in API group "" at the cluster scope',
    ]
    assert got["main_secrets"] == [
        403,
        f'secrets {anonymous} list resource "secrets" in API group "" in the namespace '
        f'"{hostile.main}"',
    ]
    secret = f"vault-secret-{names.content_hash({'DB_PASSWORD': DB_PASSWORD})}"
    assert got["vault_secret"] == [
        403,
        f'secrets "{secret}" {anonymous} get resource "secrets" in API group "" in the '
        f'namespace "{hostile.main}"',
    ]
    assert got["own_pods"] == [
        403,
        f'pods {anonymous} list resource "pods" in API group "" in the namespace "{hostile.evil}"',
    ]
    assert got["kubelet"] == [401, "Unauthorized"]  # the node's kubelet, on the gateway


def test_it_sees_only_its_own_processes_and_no_secret_of_another_service(
    hostile: Hostile,
) -> None:
    assert hostile.report["pids"] == 3  # the run script, its shell, python
    assert len(hostile.report["environs"]) == 3
    assert DB_PASSWORD not in json.dumps(hostile.report)
    assert hostile.report["env"] == sorted(
        [
            "BRANCHYARD_BRANCH", "BRANCHYARD_NAMESPACE", "BRANCHYARD_REVISION",
            "BRANCHYARD_SERVICE", "HOME", "HOST", "HOSTNAME", "LC_CTYPE", "PATH", "PORT", "PWD",
            "PYTHONUNBUFFERED", "VAULT_URL", "VIRTUAL_ENV",
            # the kubelet's for the Service kubernetes, enableServiceLinks or not
            "KUBERNETES_PORT", "KUBERNETES_PORT_443_TCP", "KUBERNETES_PORT_443_TCP_ADDR",
            "KUBERNETES_PORT_443_TCP_PORT", "KUBERNETES_PORT_443_TCP_PROTO",
            "KUBERNETES_SERVICE_HOST", "KUBERNETES_SERVICE_PORT",
            "KUBERNETES_SERVICE_PORT_HTTPS",
        ]
    )  # fmt: skip


def test_its_log_its_events_and_k8s_render_hold_no_secret(hostile: Hostile) -> None:
    logs = hostile.daemon.cli("-n", "evil", "logs", "probe").stdout
    assert json.loads(logs.splitlines()[-1]) == hostile.report  # the probe printed it
    events = hostile.daemon.cli("events").stdout
    assert "probe" in events and "vault" in events
    render = hostile.daemon.cli("k8s", "render", "vault").stdout
    assert "DB_PASSWORD: (redacted)" in render
    for shown in (logs, events, render, hostile.daemon.log):
        assert DB_PASSWORD not in shown


def test_its_memory_and_cpu_are_bounded_by_its_cgroup(hostile: Hostile) -> None:
    assert hostile.report["cgroup"] == {
        "memory/memory.limit_in_bytes": str(512 * 1024**2),
        "cpu/cpu.cfs_quota_us": "100000",  # one core
        "cpu/cpu.cfs_period_us": "100000",
        "pids/pids.max": "max",  # the kubelet's podPidsLimit, not the pod's: none here
    }


def test_it_reaches_neither_the_daemons_api_nor_its_router_nor_anything_off_the_bridge(
    hostile: Hostile,
) -> None:
    api, router = int(hostile.daemon.info["api"].rsplit(":", 1)[1]), hostile.daemon.router_port
    reached = dict(hostile.report["connect"])
    named = [f"{GATEWAY}:{api}", f"{GATEWAY}:{router}", f"127.0.0.1:{api}"]
    named += [f"127.0.0.1:{router}", f"{OUTSIDE}:80"]
    assert {key: reached.pop(key) for key in named} == {
        f"{GATEWAY}:{api}": "ECONNREFUSED",  # the daemon listens on the host's loopback
        f"{GATEWAY}:{router}": "ECONNREFUSED",
        f"127.0.0.1:{api}": "ECONNREFUSED",  # the pod's own loopback
        f"127.0.0.1:{router}": "ECONNREFUSED",
        f"{OUTSIDE}:80": "ENETUNREACH",
    }
    assert reached  # this machine's other addresses
    assert set(reached.values()) == {"ENETUNREACH"}


def test_what_only_a_network_policy_would_stop_succeeds_another_namespaces_service(
    hostile: Hostile,
) -> None:
    got = hostile.report["get"]
    assert got["peer"] == [200, "vault in main"]  # by cluster DNS, across Namespaces
    assert got["git"][0] == 200  # the daemon's git server, as the pods' fetch reads it
    assert "HEAD" in got["git"][1]
