"""Part 6, node: the daemon on the test cluster's real node, side by side with the local
runtime in the same run.

The part starts the test cluster with its real node (``scripts/k8s-test-cluster start
--real-node``: containerd and runc, kubelet, kube-proxy and CoreDNS on the bridge
``branchyard0``; docs/kubernetes.md "The test node") and stops it at the end. The daemon
runs ``up --runtime kubernetes`` with the node's own images and its pods placed there
(``--node-selector``, ``--toleration``), serving its local repos to pods from the bridge's
gateway (``--git-listen``). Pods reach no registry: a Flask service installs from wheels
``pip download`` fetched on this machine, served as a simple index on the gateway
(``PIP_INDEX_URL``), as an air-gapped cluster would.

- **Push to served**: for a stdlib service and a Flask one, each push of a commit is timed
  at the daemon's events (``push``, ``applied Deployment``, ``live``, the Service's
  selector moved) and at the host, which polls the Service's ClusterIP (through
  kube-proxy) until the new commit answers. The pod's own phases (fetch, install, start to
  Ready) come from its status, whose times have a resolution of one second. Yardstick, same
  run, same repos: the local runtime, its router polled the same way.
  Twice on Kubernetes: ``up`` as it is by default, and with ``--install-cache``.
- **Rollback**: ``branchyard rollback`` to the commit before, until the ClusterIP serves it.
- **Deploys under load**: ``--node-deploys`` pushes of the stdlib service while the host
  sends ``--node-rate`` requests per second to its ClusterIP, each on a new connection: the
  requests that failed, and the latency's median and p99.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from lightkube import Client, KubeConfig
from lightkube.models.core_v1 import HostPathVolumeSource, ObjectReference, PersistentVolumeSpec
from lightkube.models.meta_v1 import ObjectMeta
from lightkube.resources.core_v1 import PersistentVolume, Pod, Service

from bench.common import BenchError, Daemon, ServiceRepo, Summary, free_port, wait_until
from bench.results import Section, ms, spread
from branchyard.runtime.kube import names
from branchyard.runtime.processes import Ports
from tests import k8s_real_node

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "k8s-test-cluster"
KUBE, CACHED, LOCAL = "Kubernetes", "Kubernetes, install cache", "local"
RUNTIMES = (KUBE, CACHED, LOCAL)
CACHE_SIZE = "1Gi"
SERVED_TIMEOUT = 300.0
FLASK_APP = """import os

from flask import Flask

app = Flask(__name__)


@app.get("/")
def index():
    with open("version.txt") as f:
        return f.read()


app.run(host=os.environ["HOST"], port=int(os.environ["PORT"]))
"""
REPOS = {
    "stdlib": {"Procfile": "web: python -m http.server --bind $HOST $PORT\n"},
    "flask": {
        "Procfile": "web: python app.py\n",
        "requirements.txt": "flask\n",
        "app.py": FLASK_APP,
    },
}
PATHS = {"stdlib": "/version.txt", "flask": "/"}
PHASES = ("pod made → fetched", "fetched → installed", "installed → Ready")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("node")
    group.add_argument(
        "--node-pushes", type=int, default=5, help="node: pushes timed per service (default 5)"
    )
    group.add_argument(
        "--node-deploys", type=int, default=10, help="node: deploys under load (default 10)"
    )
    group.add_argument(
        "--node-rate", type=float, default=50.0, help="node: requests per second (default 50)"
    )


# -- the cluster, the index -----------------------------------------------------------


@contextlib.contextmanager
def _cluster(directory: Path) -> Iterator[Path]:
    done = subprocess.run(
        [SCRIPT, "start", "--real-node", directory], capture_output=True, text=True
    )
    if done.returncode != 0:
        raise BenchError(f"the test cluster did not start: {done.stderr.strip()}")
    try:
        yield Path(done.stdout.splitlines()[0])  # then a line about the node
    finally:
        subprocess.run([SCRIPT, "stop", directory], capture_output=True, check=False)


def _normalized(project: str) -> str:
    return "-".join(project.lower().replace("_", "-").replace(".", "-").split("-"))


def simple_index(wheels: Path, root: Path) -> None:
    """A PEP 503 simple index of the wheels in ``wheels``, under ``root/simple``."""
    projects: dict[str, list[str]] = {}
    for wheel in sorted(wheels.glob("*.whl")):
        projects.setdefault(_normalized(wheel.name.split("-")[0]), []).append(wheel.name)
    for project, files in projects.items():
        folder = root / "simple" / project
        folder.mkdir(parents=True, exist_ok=True)
        links = "".join(f'<a href="/wheels/{name}">{name}</a>\n' for name in files)
        (folder / "index.html").write_text(
            f"<!DOCTYPE html>\n<html><body>\n{links}</body></html>\n"
        )
    (root / "wheels").symlink_to(wheels.resolve())


@contextlib.contextmanager
def _index(workdir: Path, address: str) -> Iterator[str]:
    """Flask's wheels from PyPI, served on ``address``: the index URL."""
    wheels = workdir / "wheels"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "-q",
            "--only-binary=:all:",
            "-d",
            wheels,
            "flask",
        ],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        raise BenchError(f"pip download flask failed: {done.stderr.strip()[-300:]}")
    root = workdir / "index"
    simple_index(wheels, root)
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "http.server", "--bind", address, str(port), "--directory", root],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        yield f"http://{address}:{port}/simple/"
    finally:
        server.terminate()
        server.wait()


# -- a push, timed ----------------------------------------------------------------------


@dataclass(frozen=True)
class Push:
    """One push: seconds from ``git push`` starting to each mark, and the pod's phases."""

    noticed: float
    applied: float
    live: float
    routed: float
    served: float
    phases: dict[str, float] = field(default_factory=dict)


def _answer(address: str, port: int, path: str, host: str = "localhost") -> str | None:
    connection = http.client.HTTPConnection(address, port, timeout=2)
    try:
        connection.request("GET", path, headers={"Host": host, "Connection": "close"})
        response = connection.getresponse()
        body = response.read().decode(errors="replace")
        return body if response.status == 200 else None
    except (OSError, http.client.HTTPException):
        return None
    finally:
        connection.close()


def _event(daemon: Daemon, since: float, kind: str, service: str, starts: str = "") -> float | None:
    for at, found, _, named, message in daemon.events(since):
        if found == kind and named == service and message.startswith(starts):
            return at
    return None


def _stamp(text: object) -> float:
    return datetime.fromisoformat(str(text).replace("Z", "+00:00")).timestamp()


def _pod_phases(client: Client, namespace: str, service: str, ordinal: int) -> dict[str, float]:
    """The pod's fetch, install and start-to-Ready, in whole seconds (its status's)."""
    labels: dict[str, Any] = {
        names.SERVICE: names.object_name(service),
        names.REVISION: str(ordinal),
    }
    pods = [p for p in client.list(Pod, namespace=namespace, labels=labels) if p.status]
    if not pods or pods[0].status is None or pods[0].metadata is None:
        return {}
    status, made = pods[0].status, _stamp(pods[0].metadata.creationTimestamp)
    ended = {
        s.name: _stamp(s.state.terminated.finishedAt)
        for s in status.initContainerStatuses or ()
        if s.state is not None and s.state.terminated is not None
    }
    ready = next(
        (c for c in status.conditions or () if c.type == "Ready" and c.status == "True"), None
    )
    if "fetch" not in ended or "install" not in ended or ready is None:
        return {}
    marks = (ended["fetch"] - made, ended["install"] - ended["fetch"])
    return dict(
        zip(PHASES, (*marks, _stamp(ready.lastTransitionTime) - ended["install"]), strict=True)
    )


class Target:
    """Where a runtime's service answers: a ClusterIP through kube-proxy, or the router."""

    def __init__(self, address: str, port: int, path: str, host: str = "localhost") -> None:
        self.address, self.port, self.path, self.host = address, port, path, host

    def answer(self) -> str | None:
        return _answer(self.address, self.port, self.path, self.host)


def _served(daemon: Daemon, service: str, target: Target, answer: str) -> float:
    """When ``target`` first answers ``answer``; a BenchError as soon as the service's
    newest revision failed."""
    deadline = time.monotonic() + SERVED_TIMEOUT
    asked = 0.0
    while time.monotonic() < deadline:
        if target.answer() == answer:
            return time.time()
        if time.monotonic() - asked > 1:
            asked = time.monotonic()
            row = next(r for r in daemon.services() if r["service"] == service)
            if row["latest"] and row["latest"]["state"] == "failed":
                raise BenchError(f"{service} failed: {row['reason']}")
        time.sleep(0.02)
    raise BenchError(f"{service} did not serve {answer!r} within {SERVED_TIMEOUT:g} s")


@dataclass(frozen=True)
class Kube:
    """The cluster a daemon deploys to, and its Namespaces' prefix."""

    client: Client
    prefix: str


def _push(
    daemon: Daemon, repo: ServiceRepo, number: int, target: Target, kube: Kube | None
) -> Push:
    marker = f"{repo.name} {number}"
    repo.commit({"version.txt": marker}, f"change {number}")
    pushed = time.time()
    repo.push("main")
    served = _served(daemon, repo.name, target, marker)

    def at(kind: str, starts: str = "", service: str = repo.name) -> float:
        found = wait_until(lambda: _event(daemon, pushed, kind, service, starts), 30, kind)
        return found - pushed

    live = at("live")
    noticed = at("push", f"{repo.name}:", "")
    if kube is None:
        return Push(noticed, live, live, live, served - pushed)
    row = next(
        r for r in daemon.services() if (r["namespace"], r["service"]) == ("main", repo.name)
    )
    ordinal = int(row["live"]["ordinal"])
    where = f"{kube.prefix}main"
    return Push(
        noticed,
        at("kubernetes", f"applied Deployment {names.revision_name(repo.name, ordinal)}"),
        live,
        at("kubernetes", f"Service {names.object_name(repo.name)} in {where} sends to v{ordinal}"),
        served - pushed,
        _pod_phases(kube.client, where, repo.name, ordinal),
    )


# -- under load ---------------------------------------------------------------------------


@dataclass
class Load:
    """Requests sent at a steady rate, each on a new connection, until stopped."""

    target: Target
    rate: float
    latencies: list[float] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)

    def _one(self) -> None:
        began = time.monotonic()
        try:
            if self.target.answer() is None:
                raise OSError("no 200 answer")
        except OSError as exc:
            self.failures.append(str(exc))
            return
        self.latencies.append(time.monotonic() - began)

    def run(self) -> None:
        period, due = 1 / self.rate, time.monotonic()
        workers: list[threading.Thread] = []
        while not self._stop.is_set():
            worker = threading.Thread(target=self._one)
            worker.start()
            workers.append(worker)
            due += period
            time.sleep(max(0.0, due - time.monotonic()))
        for worker in workers:
            worker.join()

    @contextlib.contextmanager
    def running(self) -> Iterator[Load]:
        thread = threading.Thread(target=self.run)
        thread.start()
        try:
            yield self
        finally:
            self._stop.set()
            thread.join()


# -- the run ------------------------------------------------------------------------------


@dataclass
class Measured:
    pushes: dict[tuple[str, str], list[Push]] = field(default_factory=dict)  # (runtime, repo)
    rollback: dict[str, float] = field(default_factory=dict)  # runtime -> seconds to served
    load: dict[str, tuple[Load, float]] = field(default_factory=dict)  # runtime -> (load, s)


def _repos(root: Path) -> dict[str, ServiceRepo]:
    return {
        name: ServiceRepo.create(root, name, {**files, "version.txt": f"{name} start"})
        for name, files in REPOS.items()
    }


def _exercise(
    runtime: str,
    daemon: Daemon,
    repos: dict[str, ServiceRepo],
    target_of: Callable[[str], Target],
    kube: Kube | None,
    args: argparse.Namespace,
    measured: Measured,
) -> None:
    for repo in repos.values():
        daemon.add_repo(str(repo.origin))
    targets = {name: target_of(name) for name in repos}
    for name, repo in repos.items():
        _served(daemon, name, targets[name], f"{name} start")
        measured.pushes[(runtime, name)] = [
            _push(daemon, repo, number, targets[name], kube) for number in range(args.node_pushes)
        ]
    stdlib = targets["stdlib"]
    before = f"stdlib {args.node_pushes - 2}"
    began = time.monotonic()
    daemon.cli("rollback", "stdlib")
    wait_until(lambda: stdlib.answer() == before, SERVED_TIMEOUT, "the rollback served", 0.02)
    measured.rollback[runtime] = time.monotonic() - began
    daemon.cli("unpin", "stdlib")  # a rollback pins: pushes would be staged, not deployed
    _served(daemon, "stdlib", stdlib, f"stdlib {args.node_pushes - 1}")
    load = Load(stdlib, args.node_rate)
    began = time.monotonic()
    with load.running():
        for number in range(args.node_deploys):
            _push(daemon, repos["stdlib"], 100 + number, stdlib, kube)
    measured.load[runtime] = (load, time.monotonic() - began)


def _cluster_ip(kube: Kube, service: str) -> str:
    def found() -> str | None:
        with contextlib.suppress(Exception):
            where = f"{kube.prefix}main"
            spec = kube.client.get(Service, names.object_name(service), namespace=where).spec
            return spec.clusterIP if spec is not None else None
        return None

    return wait_until(found, SERVED_TIMEOUT, f"{service}'s Service", 0.2)


def _cache_volume(kube: Kube, folder: Path) -> None:
    """A volume for the install cache claim of ``main``, bound ahead (the test node has no
    provisioner): a folder of this machine, open to all as a local-path provisioner's."""
    folder.mkdir(parents=True)
    folder.chmod(0o777)
    where = f"{kube.prefix}main"
    spec = PersistentVolumeSpec(
        capacity={"storage": CACHE_SIZE},
        accessModes=["ReadWriteOnce"],
        hostPath=HostPathVolumeSource(path=str(folder)),
        claimRef=ObjectReference(namespace=where, name="branchyard-install-cache"),
        persistentVolumeReclaimPolicy="Retain",
        storageClassName="",
    )
    kube.client.create(PersistentVolume(metadata=ObjectMeta(name=f"{where}-cache"), spec=spec))


def _on_kubernetes(
    runtime: str,
    workdir: Path,
    kubeconfig: Path,
    kube: Kube,
    args: argparse.Namespace,
    measured: Measured,
    *flags: str,
) -> None:
    gateway = k8s_real_node.GATEWAY
    daemon = Daemon.start(
        workdir / f"home-{kube.prefix}",
        *("--runtime", "kubernetes", "--kubeconfig", str(kubeconfig)),
        *("--namespace-prefix", kube.prefix, "--drain-grace", "0"),
        *("--git-listen", f"{gateway}:{Ports().take()}"),
        *k8s_real_node.daemon_flags(),
        *flags,
    )
    with daemon:
        repos = _repos(workdir / f"repos-{kube.prefix}")

        def through_kube_proxy(name: str) -> Target:
            return Target(_cluster_ip(kube, name), 80, PATHS[name])

        _exercise(runtime, daemon, repos, through_kube_proxy, kube, args, measured)


def run(args: argparse.Namespace, workdir: Path, command: str) -> Section:
    section = Section("node", "6. Kubernetes on a real node, beside the local runtime", command)
    started = time.monotonic()
    workdir.mkdir(parents=True, exist_ok=True)
    measured = Measured()
    gateway = k8s_real_node.GATEWAY
    with _cluster(workdir / "cluster") as kubeconfig, _index(workdir, gateway) as index:
        client = Client(config=KubeConfig.from_file(kubeconfig))
        # the daemon hands them to every install container
        os.environ.update(PIP_INDEX_URL=index, PIP_TRUSTED_HOST=gateway)
        try:
            _on_kubernetes(KUBE, workdir, kubeconfig, Kube(client, "n-"), args, measured)
            cached = Kube(client, "c-")
            _cache_volume(cached, workdir / "cache-volume")
            flags = ("--install-cache", CACHE_SIZE)
            _on_kubernetes(CACHED, workdir, kubeconfig, cached, args, measured, *flags)
        finally:
            del os.environ["PIP_INDEX_URL"], os.environ["PIP_TRUSTED_HOST"]
    # as up is by default: the old process finishes what it serves (with --drain-grace 0,
    # a request in flight at the switch is cut)
    with Daemon.start(workdir / "home-local") as local:
        repos = _repos(workdir / "repos-local")

        def through_the_router(name: str) -> Target:
            return Target("127.0.0.1", local.router_port, PATHS[name], f"{name}.main.localhost")

        _exercise(LOCAL, local, repos, through_the_router, None, args, measured)
    _write(section, measured, args)
    section.seconds = time.monotonic() - started
    return section


def _write(section: Section, measured: Measured, args: argparse.Namespace) -> None:
    section.add(
        "The daemon runs `up --runtime kubernetes` on the test cluster with its real node "
        "(scripts/k8s-test-cluster start --real-node: containerd and runc, kubelet, "
        "kube-proxy in nftables mode, CoreDNS, on the bridge branchyard0), the node's own "
        "images (`branchyard.test/python:3.11`: Debian's python3 and git; "
        "`branchyard.test/git:2`), pods placed there by `--node-selector` and `--toleration`, "
        "local repos served to them from the bridge's gateway (`--git-listen`). Two "
        "services: `stdlib` (`python -m http.server --bind $HOST $PORT`) and `flask` "
        "(`requirements.txt`: flask, installed in each pod from wheels fetched here and "
        "served as a simple index on the gateway: `PIP_INDEX_URL`). Each push changes "
        "`version.txt`; **served** is when the host, polling every 20 ms, first gets the new "
        "one from the Service's ClusterIP (kube-proxy), or on the local runtime from its "
        "router. Seconds from `git push` starting, medians (min … max) of "
        f"{args.node_pushes} pushes each. The pod's phases come from its status, whose times "
        "are whole seconds. Two daemons on the node, one after the other: one as `up` is by "
        "default, whose every pod installs again, and one with `--install-cache 1Gi` (its "
        "claim bound ahead to a folder of this machine: the test node has no provisioner), "
        "whose pods reuse the environment of unchanged dependencies, as the local runtime "
        "does.",
        "",
    )
    marks = ("noticed", "applied", "live", "routed", "served")
    rows = []
    for mark in marks:
        row = [f"`git push` → {mark}"]
        for runtime in RUNTIMES:
            for name in REPOS:
                pushes = measured.pushes[(runtime, name)]
                row.append(spread(Summary.of([getattr(p, mark) for p in pushes])))
        rows.append(row)
    for phase in PHASES:
        row = [f"pod: {phase} (s)"]
        for runtime in (KUBE, CACHED):
            for name in REPOS:
                pushes = measured.pushes[(runtime, name)]
                values = [p.phases[phase] for p in pushes if p.phases]
                row.append(f"{Summary.of(values).median:.0f} s" if values else "?")
        rows.append([*row, *("" for _ in REPOS)])
    header = [f"{runtime}: {name}" for runtime in RUNTIMES for name in REPOS]
    section.table(["span", *header], rows)
    back = measured.rollback
    section.add(
        "Rollback of `stdlib` to the commit before (`branchyard rollback`, until it is "
        f"served): {KUBE} {ms(back[KUBE])}, {CACHED} {ms(back[CACHED])}, {LOCAL} "
        f"{ms(back[LOCAL])} (ratios to local {back[KUBE] / back[LOCAL]:.1f}x and "
        f"{back[CACHED] / back[LOCAL]:.1f}x).",
        "",
    )
    rows = []
    for runtime in RUNTIMES:
        load, seconds = measured.load[runtime]
        latency = Summary.of(load.latencies) if load.latencies else None
        rows.append(
            [
                runtime,
                str(len(load.latencies) + len(load.failures)),
                f"{(len(load.latencies) + len(load.failures)) / seconds:.0f}",
                str(len(load.failures)),
                ms(latency.median) if latency else "?",
                ms(latency.p99) if latency else "?",
            ]
        )
    section.add(
        f"{args.node_deploys} deploys of `stdlib` under load: the host sends "
        f"{args.node_rate:g} requests/s, each on a new connection, to its ClusterIP "
        "(Kubernetes) or the router (local) while each commit is pushed and served. The "
        "Kubernetes daemons run with `--drain-grace 0` (the old pod gets its preStop pause and "
        "nothing more), the local one with the default grace.",
        "",
    )
    section.table(["runtime", "requests", "per second", "failed", "median", "p99"], rows)
    failed = sum(len(measured.load[runtime][0].failures) for runtime in (KUBE, CACHED))
    section.target(
        f"Kubernetes: requests failed over 2 x {args.node_deploys} deploys under load",
        str(failed),
        "0",
        failed == 0,
    )
