"""The test control plane: a real Kubernetes API server, its controllers and scheduler on
loopback, with kwok playing the node (run as scripts/k8s-test-cluster; docs/kubernetes.md).

No container runtime runs here, so no pod really runs; everything else is real: etcd,
kube-apiserver, kube-controller-manager and kube-scheduler are built from the releases that
tests/k8s/go.mod pins, and kwok moves the pods bound to its node through the stages of
tests/k8s/kwok.yaml (Running at once; Ready only when the test marks them good).

``build`` compiles the binaries once into a cache outside the checkout, keyed by the pinned
release and a hash of the Go sources. ``start DIR`` runs one cluster with all its state, logs
and pids under DIR and writes DIR/kubeconfig; ``stop DIR`` ends every process it started.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import hashlib
import json
import os
import secrets
import shutil
import signal
import ssl
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from lightkube import ApiError, Client, KubeConfig
from lightkube.models.core_v1 import NodeSpec
from lightkube.models.meta_v1 import ObjectMeta
from lightkube.resources.core_v1 import Node, ServiceAccount

from branchyard.errors import TemporaryError
from branchyard.runtime import processes
from tests.k8s_crds import KWOK_KINDS, install, kwok_definitions
from tests.k8s_modules import (
    MODULE,
    ModuleError,
    cache_root,
    gateway_api,
    kwok_crds,
    required_version,
)

SOURCES = ("go.mod", "go.sum", "cmd/*/main.go")
ETCD, APISERVER, CONTROLLERS, SCHEDULER, KWOK = (
    "etcd",
    "kube-apiserver",
    "kube-controller-manager",
    "kube-scheduler",
    "kwok",
)
BINARIES = (ETCD, APISERVER, CONTROLLERS, SCHEDULER, KWOK)  # also the order they start in
NODE = "kwok-node-0"
SERVICE_RANGE = "10.96.0.0/16"  # Service cluster IPs: handed out, never routed
POD_RANGE = "10.244.0.0/17"  # the simulated node's pod IPs: in status only
RUNNING_CONTROLLERS = (
    "deployment-controller",
    "replicaset-controller",
    "namespace-controller",
    "endpointslice-controller",
    "serviceaccount-controller",
    "serviceaccount-token-controller",
    "garbage-collector-controller",
    "root-ca-certificate-publisher-controller",
    "clusterrole-aggregation-controller",
    "persistentvolume-binder-controller",  # an install cache's claim, bound to a test's volume
)
START_TIMEOUT = 180.0  # seconds for the whole start, on a busy 2-core machine
STOP_TIMEOUT = 20.0  # seconds each process has to end on SIGTERM before SIGKILL
STOP_ORDER = ({KWOK, SCHEDULER, CONTROLLERS}, {APISERVER}, {ETCD})


class ClusterError(Exception):
    """Why the test control plane cannot be built, started or stopped, in one line."""


class NoGo(ClusterError):
    """Go, which builds the control plane, is missing (the script exits 3: scripts/setup
    goes on, and the tests marked k8s skip)."""


def go() -> str | None:
    """The go command: on the PATH, or where Go's own archive installs it (a PATH that a
    login shell extends may lack it)."""
    found = shutil.which("go") or shutil.which("go", path="/usr/local/go/bin")
    return found


def pinned_release() -> str:
    """The k8s.io/kubernetes version that tests/k8s/go.mod requires."""
    return required_version("k8s.io/kubernetes")


def build_flags(release: str) -> list[str]:
    """go build's flags: small binaries that report the pinned release as their version
    (which Kubernetes' release scripts stamp, and a plain go build leaves as v0.0.0)."""
    major, minor = release.removeprefix("v").split(".")[:2]
    stamp = " ".join(
        f"-X k8s.io/component-base/version.{name}={value}"
        for name, value in (
            ("gitVersion", release),
            ("gitMajor", major),
            ("gitMinor", minor),
            ("gitTreeState", "clean"),
        )
    )
    return ["-trimpath", "-buildvcs=false", f"-ldflags=-s -w {stamp}"]


def build_hash(release: str) -> str:
    """A hash of what the binaries are built from: go.mod, go.sum, the main.go files and
    the build's flags."""
    return source_hash(MODULE, build_flags(release))


def source_hash(module: Path, flags: Sequence[str]) -> str:
    """A hash of a Go module's go.mod, go.sum and cmd/*/main.go, and the build's flags."""
    digest = hashlib.sha256(" ".join(flags).encode() + b"\0")
    for pattern in SOURCES:
        for path in sorted(module.glob(pattern)):
            digest.update(str(path.relative_to(module)).encode() + b"\0")
            digest.update(path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def bin_dir() -> Path:
    """Where ``build`` puts the binaries: outside the checkout, as CI clones afresh."""
    release = pinned_release()
    return cache_root() / f"{release}-{build_hash(release)}" / "bin"


def built() -> Path | None:
    """The binaries' folder when all of them are built and the CRDs are in the cache, else
    None."""
    binaries = bin_dir()
    ready = all((binaries / name).is_file() for name in BINARIES) and all(
        files.cached() for files in (kwok_crds(), gateway_api())
    )
    return binaries if ready else None


def build() -> Path:
    """Build the binaries and fetch the CRDs unless the cache has them; return the
    binaries' folder."""
    binaries = bin_dir()
    if not all((binaries / name).is_file() for name in BINARIES):
        compile_binaries(binaries)
    kwok_crds().fetch()
    gateway_api().fetch()
    return binaries


def compile_binaries(
    binaries: Path, module: Path = MODULE, flags: Sequence[str] | None = None
) -> None:
    """go build the commands of ``module`` (the control plane's by default) into
    ``binaries``, whole or not at all."""
    compiler = go()
    if compiler is None:
        raise NoGo("go is not on the PATH: it builds the test control plane")
    partial = binaries.with_name(f"bin.partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    flags = build_flags(pinned_release()) if flags is None else flags
    command = ["nice", "-n", "10", compiler, "build", *flags, "-o", f"{partial}/", "./cmd/..."]
    environment = {**os.environ, "GOFLAGS": "-mod=readonly"}
    try:
        subprocess.run(command, cwd=module, env=environment, check=True)
    except subprocess.CalledProcessError as failed:
        shutil.rmtree(partial, ignore_errors=True)
        raise ClusterError(f"go build failed (exit {failed.returncode}): see above") from None
    shutil.rmtree(binaries, ignore_errors=True)
    partial.rename(binaries)


@dataclass(frozen=True)
class Ports:
    """The loopback ports of one cluster."""

    etcd: int
    etcd_peer: int
    apiserver: int
    controllers: int
    scheduler: int
    kwok: int  # the node's kubelet API (pod logs), as kwok serves it


def free_ports() -> Ports:
    """Free loopback ports outside the kernel's ephemeral range, where outgoing connections
    take theirs, so that none is taken between this pick and the component's bind."""
    taker = processes.Ports()
    try:
        return Ports(*(taker.take() for _ in range(6)))
    except TemporaryError as error:
        raise ClusterError(str(error)) from None


def openssl(*args: str) -> None:
    done = subprocess.run(["openssl", *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise ClusterError(f"openssl {args[0]} failed: {done.stderr.strip()}")


NEW_KEY = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-days", "3650"]


def certify(authority: Path, target: Path, name: str, subject: str, *extensions: str) -> None:
    """A key and certificate ``target``/NAME.key and .crt, signed by the CA in ``authority``
    (ca.crt, ca.key), with ``extensions`` (openssl's -addext values) beside a leaf's."""
    addext = [value for extension in extensions for value in ("-addext", extension)]
    # fmt: off
    openssl("req", "-x509", *NEW_KEY, "-subj", subject,
            "-CA", f"{authority}/ca.crt", "-CAkey", f"{authority}/ca.key",
            "-addext", "basicConstraints=critical,CA:FALSE", *addext,
            "-keyout", f"{target}/{name}.key", "-out", f"{target}/{name}.crt")
    # fmt: on


def make_pki(pki: Path) -> None:
    """A CA, a serving certificate for the loopback servers (and the in-cluster name of the
    API), the API server's client certificate for the kubelet API of a real node, and the
    key pair that signs and checks service account tokens."""
    pki.mkdir(parents=True)
    names = "IP:127.0.0.1,DNS:localhost,IP:10.96.0.1,DNS:kubernetes.default.svc"
    openssl("req", "-x509", *NEW_KEY, "-subj", "/CN=branchyard-test-ca",
            "-keyout", f"{pki}/ca.key", "-out", f"{pki}/ca.crt")  # fmt: skip
    certify(pki, pki, "serving", "/CN=kube-apiserver", f"subjectAltName={names}",
            "extendedKeyUsage=serverAuth")  # fmt: skip
    certify(pki, pki, "kubelet-client", "/O=system:masters/CN=kube-apiserver-kubelet-client",
            "extendedKeyUsage=clientAuth")  # fmt: skip
    # fmt: off
    openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:prime256v1",
            "-out", f"{pki}/service-accounts.key")
    openssl("pkey", "-in", f"{pki}/service-accounts.key", "-pubout",
            "-out", f"{pki}/service-accounts.pub")
    # fmt: on


@dataclass(frozen=True)
class Identity:
    """Who a component is to the API server: a static token's user and groups."""

    name: str  # also its kubeconfig's name: DIR/NAME.kubeconfig
    user: str
    groups: tuple[str, ...] = ()


IDENTITIES = (
    Identity("admin", "branchyard-test-admin", ("system:masters",)),
    Identity(CONTROLLERS, "system:kube-controller-manager"),
    Identity(SCHEDULER, "system:kube-scheduler"),
    Identity(KWOK, "kwok", ("system:masters",)),  # it plays every node's kubelet
    Identity("kube-proxy", "system:kube-proxy"),  # the real node's (tests/k8s_real_node.py)
    Identity("coredns", "system:coredns"),  # the real node's cluster DNS: bound to view
)


def write_credentials(directory: Path, server: str) -> str:
    """The static token file and one kubeconfig per identity (DIR/kubeconfig for tests);
    return the admin's token."""
    authority = base64.b64encode((directory / "pki" / "ca.crt").read_bytes()).decode()
    rows = []
    tokens = {}
    for identity in IDENTITIES:
        tokens[identity.name] = token = secrets.token_hex(24)
        groups = [f'"{",".join(identity.groups)}"'] if identity.groups else []
        rows.append(",".join([token, identity.user, identity.user, *groups]))
        kubeconfig = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {
                    "name": "branchyard-test",
                    "cluster": {"server": server, "certificate-authority-data": authority},
                }
            ],
            "users": [{"name": identity.user, "user": {"token": token}}],
            "contexts": [
                {
                    "name": "branchyard-test",
                    "context": {"cluster": "branchyard-test", "user": identity.user},
                }
            ],
            "current-context": "branchyard-test",
        }
        name = "kubeconfig" if identity.name == "admin" else f"{identity.name}.kubeconfig"
        (directory / name).write_text(json.dumps(kubeconfig, indent=2) + "\n")
        (directory / name).chmod(0o600)
    (directory / "tokens.csv").write_text("\n".join(rows) + "\n")
    (directory / "tokens.csv").chmod(0o600)
    return tokens["admin"]


def commands(binaries: Path, directory: Path, ports: Ports) -> dict[str, list[str]]:
    """Each component's command line: all on 127.0.0.1, all state under DIR."""
    pki = directory / "pki"
    serving = [f"--tls-cert-file={pki / 'serving.crt'}"]
    serving += [f"--tls-private-key-file={pki / 'serving.key'}"]

    def client_of(name: str) -> list[str]:
        kubeconfig = directory / f"{name}.kubeconfig"
        return [
            f"--kubeconfig={kubeconfig}",
            f"--authentication-kubeconfig={kubeconfig}",
            f"--authorization-kubeconfig={kubeconfig}",
        ]

    peer = f"http://127.0.0.1:{ports.etcd_peer}"
    client = f"http://127.0.0.1:{ports.etcd}"
    return {
        ETCD: [
            str(binaries / ETCD),
            f"--data-dir={directory / 'etcd'}",
            f"--listen-client-urls={client}",
            f"--advertise-client-urls={client}",
            f"--listen-peer-urls={peer}",
            f"--initial-advertise-peer-urls={peer}",
            f"--initial-cluster=default={peer}",
            "--unsafe-no-fsync",  # a test cluster: its data dies with DIR
            "--log-level=warn",
        ],
        APISERVER: [
            str(binaries / APISERVER),
            f"--etcd-servers={client}",
            "--bind-address=127.0.0.1",
            "--advertise-address=127.0.0.1",
            f"--secure-port={ports.apiserver}",
            *serving,
            f"--client-ca-file={pki / 'ca.crt'}",
            f"--token-auth-file={directory / 'tokens.csv'}",
            "--authorization-mode=Node,RBAC",
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
            f"--service-account-key-file={pki / 'service-accounts.pub'}",
            f"--service-account-signing-key-file={pki / 'service-accounts.key'}",
            f"--service-cluster-ip-range={SERVICE_RANGE}",
            # The Endpoints of Service "kubernetes" may not hold a loopback address.
            "--endpoint-reconciler-type=none",
            # A new node is tainted not-ready until the node lifecycle controller sees its
            # heartbeats; kwok's node is Ready at once and sends none.
            "--disable-admission-plugins=TaintNodesByCondition",
            # Pod logs: the API server asks the node's kubelet API (kwok's, at the node's
            # InternalIP and daemonEndpoints port) and checks its serving certificate.
            f"--kubelet-certificate-authority={pki / 'ca.crt'}",
            "--kubelet-preferred-address-types=InternalIP",
            f"--kubelet-client-certificate={pki / 'kubelet-client.crt'}",  # a real node asks
            f"--kubelet-client-key={pki / 'kubelet-client.key'}",
            f"--cert-dir={directory / 'apiserver'}",
            "--profiling=false",
        ],
        CONTROLLERS: [
            str(binaries / CONTROLLERS),
            *client_of(CONTROLLERS),
            "--bind-address=127.0.0.1",
            f"--secure-port={ports.controllers}",
            *serving,
            f"--controllers={','.join(RUNNING_CONTROLLERS)}",
            "--use-service-account-credentials=true",
            f"--service-account-private-key-file={pki / 'service-accounts.key'}",
            f"--root-ca-file={pki / 'ca.crt'}",
            "--leader-elect=false",
            "--profiling=false",
        ],
        SCHEDULER: [
            str(binaries / SCHEDULER),
            *client_of(SCHEDULER),
            "--bind-address=127.0.0.1",
            f"--secure-port={ports.scheduler}",
            *serving,
            "--leader-elect=false",
            "--profiling=false",
        ],
        KWOK: [
            str(binaries / KWOK),
            f"--kubeconfig={directory / f'{KWOK}.kubeconfig'}",
            f"--config={MODULE / 'kwok.yaml'}",
            # Only the simulated node: the real one (tests/k8s_real_node.py) has a kubelet.
            "--manage-nodes-with-annotation-selector=kwok.x-k8s.io/node=fake",
            "--node-ip=127.0.0.1",
            f"--cidr={POD_RANGE}",
            f"--server-address=127.0.0.1:{ports.kwok}",
            f"--node-port={ports.kwok}",  # the node's daemonEndpoints (tests/k8s/kwok.yaml)
            *serving,
            f"--enable-crds={','.join(KWOK_KINDS)}",  # a pod's log file (tests/k8s_node.py)
        ],
    }


def pid_file(directory: Path, name: str) -> Path:
    return directory / "pids" / f"{name}.pid"


def launch(directory: Path, name: str, command: list[str]) -> subprocess.Popen[bytes]:
    """Start one component in a session of its own, its output in DIR/logs/NAME.log."""
    environment = dict(os.environ)
    if name == KWOK:  # kwok would also read ~/.kwok/kwok.yaml
        environment["HOME"] = str(directory / "kwok-home")
    with (directory / "logs" / f"{name}.log").open("ab") as log:
        process = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=directory,
            env=environment,
            start_new_session=True,
        )
    pid_file(directory, name).write_text(f"{process.pid}\n")
    return process


def log_tail(directory: Path, name: str, lines: int = 5) -> str:
    try:
        text = (directory / "logs" / f"{name}.log").read_text(errors="replace")
    except OSError:
        return ""
    return " | ".join(text.strip().splitlines()[-lines:])


def wait_until(
    what: str,
    check: Callable[[], bool],
    deadline: float,
    watched: dict[str, subprocess.Popen[bytes]],
) -> None:
    """Poll ``check`` until it holds; fail if a component died or the deadline passed."""
    while True:
        for name, process in watched.items():
            if process.poll() is not None:
                raise ClusterError(f"{name} exited ({process.returncode}) while waiting for {what}")
        try:
            if check():
                return
        except (OSError, ApiError):
            pass
        if time.monotonic() > deadline:
            raise ClusterError(f"timed out waiting for {what}")
        time.sleep(0.2)


def healthy(url: str, authority: Path, token: str | None = None) -> bool:
    """Whether a component's health endpoint answers ok."""
    request = urllib.request.Request(url)
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    context = ssl.create_default_context(cafile=str(authority))
    with urllib.request.urlopen(request, timeout=5, context=context) as answer:
        return bool(answer.status == 200 and answer.read().strip() == b"ok")


def admin_client(directory: Path) -> Client:
    return Client(config=KubeConfig.from_file(directory / "kubeconfig"))


def node_ready(client: Client, name: str = NODE) -> bool:
    node = client.get(Node, name)
    conditions = node.status.conditions if node.status else None
    return any(c.type == "Ready" and c.status == "True" for c in conditions or ())


def register_node(client: Client) -> None:
    """The node kwok plays: pods bound to it run (as far as the API can tell)."""
    metadata = ObjectMeta(
        name=NODE,
        labels={"kubernetes.io/hostname": NODE, "kubernetes.io/os": "linux", "type": "kwok"},
        annotations={"kwok.x-k8s.io/node": "fake"},
    )
    client.create(Node(metadata=metadata, spec=NodeSpec(podCIDR=POD_RANGE, podCIDRs=[POD_RANGE])))


def start(directory: Path) -> Path:
    """Start a cluster with its state under ``directory``; return its kubeconfig's path."""
    binaries = built()
    if binaries is None:
        raise ClusterError("not built for this go.mod: run scripts/k8s-test-cluster build")
    if running(directory):
        raise ClusterError(f"a cluster already runs in {directory}: stop it first")
    directory = directory.resolve()
    if directory.exists() and any(directory.iterdir()):
        raise ClusterError(f"{directory} is not empty: start a cluster in a new folder")
    for sub in ("logs", "pids", "kwok-home"):
        (directory / sub).mkdir(parents=True)
    try:
        return start_components(binaries, directory)
    except BaseException:
        stop(directory)
        raise


def start_components(binaries: Path, directory: Path) -> Path:
    """Start the components in order, each once the one before answers."""
    deadline = time.monotonic() + START_TIMEOUT
    ports = free_ports()
    make_pki(directory / "pki")
    server = f"https://127.0.0.1:{ports.apiserver}"
    admin_token = write_credentials(directory, server)
    lines = commands(binaries, directory, ports)
    authority = directory / "pki" / "ca.crt"
    watched: dict[str, subprocess.Popen[bytes]] = {}

    def up(name: str, what: str, check: Callable[[], bool]) -> None:
        watched[name] = launch(directory, name, lines[name])
        try:
            wait_until(what, check, deadline, watched)
        except ClusterError as error:
            raise ClusterError(f"{error}; {name}'s log ends: {log_tail(directory, name)}") from None

    etcd = f"http://127.0.0.1:{ports.etcd}/health"
    up(ETCD, "etcd's /health", lambda: json_health(etcd))
    up(
        APISERVER,
        "the API server's /readyz",
        lambda: healthy(f"{server}/readyz", authority, admin_token),
    )
    client = admin_client(directory)
    up(
        CONTROLLERS,
        "the controllers (the default ServiceAccount)",
        lambda: bool(client.get(ServiceAccount, "default", namespace="default")),
    )
    scheduler = f"https://127.0.0.1:{ports.scheduler}/healthz"
    up(SCHEDULER, "the scheduler's /healthz", lambda: healthy(scheduler, authority))
    try:
        install(directory / "kubeconfig", kwok_definitions())
    except (TimeoutError, ApiError) as error:
        raise ClusterError(f"cannot install kwok's CRDs: {error}") from None
    register_node(client)
    kubelet = f"https://127.0.0.1:{ports.kwok}/healthz"
    up(
        KWOK,
        f"node {NODE} Ready and its kubelet API's /healthz",
        lambda: node_ready(client) and healthy(kubelet, authority),
    )
    return directory / "kubeconfig"


def json_health(url: str) -> bool:
    with urllib.request.urlopen(url, timeout=5) as answer:
        return bool(json.load(answer).get("health") == "true")


def recorded(directory: Path, names: Sequence[str] = BINARIES) -> Iterator[tuple[str, int]]:
    """The components of ``names`` whose pid DIR/pids has and whose process still runs that
    component."""
    for name in names:
        try:
            pid = int(pid_file(directory, name).read_text())
            argv0 = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0]
        except (OSError, ValueError, IndexError):
            continue
        if os.path.basename(argv0.decode(errors="replace")) == name and lives(pid):
            yield name, pid


def lives(pid: int) -> bool:
    """Whether a thread of ``pid`` still runs. Not its first thread's state alone: a Go
    program's first thread is a zombie while the others still run its exit (and it cannot
    be reaped until they are done)."""
    states = []
    for task in Path(f"/proc/{pid}/task").glob("*/stat"):
        with contextlib.suppress(OSError, IndexError):
            states.append(task.read_text().rsplit(")", 1)[1].split()[0])
    return any(state != "Z" for state in states)


def running(directory: Path, names: Sequence[str] = BINARIES) -> list[str]:
    return [name for name, _ in recorded(directory, names)]


def stop(directory: Path) -> list[str]:
    """End every component started in ``directory``, the API server's clients first, etcd
    last (an API server whose etcd is gone waits for it instead of ending). Return the
    names of those that ran."""
    return end(directory, STOP_ORDER, BINARIES)


def end(directory: Path, order: Sequence[set[str]], names: Sequence[str]) -> list[str]:
    """End the processes of ``names`` that DIR/pids records, a group of ``order`` at a time;
    each gets SIGTERM, then SIGKILL after STOP_TIMEOUT. Return the names of those that ran,
    in the order of ``names``."""
    stopped = []
    for group in order:
        found = [(name, pid) for name, pid in recorded(directory, names) if name in group]
        for _, pid in found:
            os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT
        while set(running(directory, names)) & group and time.monotonic() < deadline:
            time.sleep(0.05)
        for name, pid in recorded(directory, names):
            if name in group:
                os.kill(pid, signal.SIGKILL)
        while set(running(directory, names)) & group:
            time.sleep(0.05)
        stopped += [name for name, _ in found]
    for name in names:
        pid_file(directory, name).unlink(missing_ok=True)
    return sorted(stopped, key=names.index)


def main(argv: list[str] | None = None) -> int:
    from tests import k8s_real_node  # it builds on this module

    parser = argparse.ArgumentParser(
        prog="k8s-test-cluster",
        description="Build, start and stop the test Kubernetes control plane (on loopback), "
        "with a real node if asked.",
    )
    actions = parser.add_subparsers(dest="action", required=True)
    actions.add_parser("build", help="build the binaries and images (skipped when there)")
    starting = actions.add_parser("start", help="start a cluster in DIR")
    starting.add_argument(
        "--real-node", action="store_true", help="with a real node (root, Debian)"
    )
    for action in (starting, actions.add_parser("stop", help="stop DIR's cluster")):
        action.add_argument("directory", type=Path, metavar="DIR")
    arguments = parser.parse_args(argv)
    try:
        if arguments.action == "build":
            print(build())
            for made in k8s_real_node.build():
                print(made)
        elif arguments.action == "start":
            if arguments.real_node:  # before the control plane starts for nothing
                k8s_real_node.refuse_if_taken(arguments.directory.resolve())
            print(start(arguments.directory))
            if arguments.real_node:
                try:
                    k8s_real_node.start(arguments.directory)
                except BaseException:
                    stop(arguments.directory)
                    raise
                print(f"real node {k8s_real_node.NODE}: {arguments.directory.resolve() / 'node'}")
        else:
            stopped = k8s_real_node.stop(arguments.directory) + stop(arguments.directory)
            print(f"stopped {', '.join(stopped)}" if stopped else "nothing was running")
    except (ClusterError, ModuleError) as error:
        print(f"k8s-test-cluster: {error}", file=sys.stderr)
        return 3 if isinstance(error, NoGo) else 4 if isinstance(error, k8s_real_node.NoNode) else 1
    return 0


if __name__ == "__main__":
    # As tests.k8s_cluster, the module tests.k8s_real_node imports, rather than as a copy of
    # it named __main__, whose ClusterError would be another class.
    from tests import k8s_cluster

    sys.exit(k8s_cluster.main())
