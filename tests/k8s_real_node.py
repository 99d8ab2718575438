"""The test cluster's real node (scripts/k8s-test-cluster start --real-node DIR;
docs/kubernetes.md, "The test node"): beside the control plane and kwok's simulated node,
containerd with runc, a kubelet, kube-proxy, CNI bridge networking and CoreDNS run real
pods from images built here.

The pod network stays on this machine: the bridge ``branchyard0`` (its gateway is the
node's IP and CoreDNS's address), routes to the pod and Service ranges through it alone,
no default route and no NAT in a pod, and an nftables table that drops whatever would be
forwarded between the bridge and another interface. Pods reach the API server (on
loopback) as ``kubernetes.default.svc``: socat forwards the gateway's port to it.
containerd and the kubelet share a mount namespace of their own, so every mount they make
(overlays, volumes, the pods' network namespaces) goes when they do. One real node runs
per machine at a time (``MARKER`` says whose).

What is decided (the configurations, the ruleset, the images' documents, whether a start
may go on) is rendered by pure functions; ``build``, ``start`` and ``stop`` carry it out.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import tarfile
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from lightkube import ApiError
from lightkube.models.core_v1 import NodeSpec, Taint, Toleration
from lightkube.models.discovery_v1 import Endpoint, EndpointConditions, EndpointPort
from lightkube.models.meta_v1 import ObjectMeta
from lightkube.models.rbac_v1 import RoleRef, Subject
from lightkube.resources.core_v1 import Node
from lightkube.resources.discovery_v1 import EndpointSlice
from lightkube.resources.rbac_authorization_v1 import ClusterRoleBinding

from branchyard.runtime.processes import Ports
from tests import k8s_cluster
from tests.k8s_cluster import (
    APISERVER,
    SERVICE_RANGE,
    ClusterError,
    admin_client,
    build_flags,
    certify,
    compile_binaries,
    end,
    launch,
    log_tail,
    pinned_release,
    recorded,
    source_hash,
    wait_until,
)
from tests.k8s_modules import MODULE, cache_root

NODE = "real-node-0"
BRIDGE = "branchyard0"
NODE_NETWORK = "10.244.128.0/24"  # this node's pods (kwok's are 10.244.0.0/17)
GATEWAY = "10.244.128.1"  # on the bridge: the node's IP, CoreDNS's address
POD_NETWORK = "10.244.0.0/16"  # every pod IP of the cluster: routed to the bridge only
NFT_TABLE = "branchyard_test_node"  # family inet
KUBE_PROXY_TABLES = (("ip", "kube-proxy"), ("ip6", "kube-proxy"))  # nftables mode's
MARKER = Path("/run/branchyard-test-node")  # the cluster folder whose node runs
KUBELET_PORT = 10250  # on the gateway only
CLUSTER_DOMAIN = "cluster.local"
TAINT = "branchyard.test/real-node"
LABEL = "branchyard.test/node"
TOLERATION = Toleration(key=TAINT, operator="Exists", effect="NoSchedule")
NODE_SELECTOR = {LABEL: "real"}
"""A pod's ``tolerations: [TOLERATION]`` and ``nodeSelector: NODE_SELECTOR`` put it on the
real node; a pod without them lands on kwok's."""
SYSCTLS = (
    "net.ipv4.ip_forward",  # set here: a Service's pod reached from another pod
    "vm.overcommit_memory",  # set by the kubelet
    "kernel.panic",
    "kernel.panic_on_oops",
)
CONTAINERD, KUBELET, KUBE_PROXY, COREDNS = "containerd", "kubelet", "kube-proxy", "coredns"
SOCAT = "socat"  # the API server's port on the gateway, forwarded to its loopback one
PIECES = (CONTAINERD, KUBELET, KUBE_PROXY, COREDNS, SOCAT)  # also the order they start in
NODE_MODULE = MODULE / "node"  # kubelet, kube-proxy
COREDNS_MODULE = MODULE / "coredns"
COREDNS_FLAGS = ("-trimpath", "-buildvcs=false", "-ldflags=-s -w")
PAUSE_SOURCE = MODULE / "pause" / "pause.c"
PAUSE_FLAGS = ("-static", "-O2")
CNI_PLUGINS = Path("/usr/lib/cni")  # Debian's containernetworking-plugins
SUITE, MIRROR = "bookworm", "http://deb.debian.org/debian"
MMDEBSTRAP = ("--variant=essential", "--skip=output/dev")  # runc makes /dev
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
START_TIMEOUT = 180.0
RUN_DIRECTORIES = (Path("/run/containerd"), Path("/run/netns"))  # a tmpfs each, privately
NEEDED = {  # command: the Debian package that has it
    "containerd": "containerd",
    "ctr": "containerd",
    "runc": "runc",
    "nft": "nftables",
    "mmdebstrap": "mmdebstrap",
    "cc": "gcc",
    "ip": "iproute2",
    "unshare": "util-linux",
    "nsenter": "util-linux",
    "socat": "socat",
}


class NoNode(ClusterError):
    """The real node cannot be built or run on this machine (the script exits 4)."""


@dataclass(frozen=True)
class Image:
    """A locally built image: Debian's ``packages`` (mmdebstrap), or none for the pause
    program alone."""

    name: str
    packages: tuple[str, ...]
    command: tuple[str, ...]  # Cmd, or for the pause image its Entrypoint

    def key(self) -> str:
        """A hash of what makes the image, which names its archive in the cache."""
        recipe: list[object] = [self.name, self.packages, self.command, PATH]
        recipe += [SUITE, MIRROR, MMDEBSTRAP, inspect.getsource(oci_documents)]
        if not self.packages:
            recipe += [PAUSE_FLAGS, PAUSE_SOURCE.read_text()]
        return hashlib.sha256(json.dumps(recipe).encode()).hexdigest()[:16]

    def archive(self) -> Path:
        """The OCI archive in the cache: CACHE/images/NAME-KEY.tar."""
        slug = self.name.replace("/", "_").replace(":", "_")
        return cache_root() / "images" / f"{slug}-{self.key()}.tar"


PYTHON = Image(
    "branchyard.test/python:3.11",
    ("python3", "python3-venv", "python-is-python3", "git"),
    ("python3",),
)
GIT = Image("branchyard.test/git:2", ("git",), ("git",))
PAUSE = Image("branchyard.test/pause:3.10", (), ("/pause",))
IMAGES = (PYTHON, GIT, PAUSE)


def daemon_flags() -> tuple[str, ...]:
    """What ``branchyard up --runtime kubernetes`` is given to run its pods on this node:
    the node's own images, and its label and taint (kwok's nodes keep the rest)."""
    return (
        *("--image", PYTHON.name, "--git-image", GIT.name),
        *("--node-selector", f"{LABEL}={NODE_SELECTOR[LABEL]}"),
        *("--toleration", f"{TAINT}:NoSchedule"),
    )


def node_problem(uid: int, found: Callable[[str], bool], plugins: bool) -> str | None:
    """Why the real node cannot be built or run here (``found`` says whether a command is
    on the PATH, ``plugins`` whether the CNI plugins are there), or None."""
    if uid != 0:
        return "the real node needs root (network, mounts, cgroups)"
    lacking = {package for command, package in NEEDED.items() if not found(command)}
    if not plugins:
        lacking.add("containernetworking-plugins")
    if lacking:
        return f"the real node needs Debian's {', '.join(sorted(lacking))}: run scripts/setup"
    return None


def problem() -> str | None:
    """Why the real node cannot be built or run on this machine, or None."""
    plugins = (CNI_PLUGINS / "bridge").is_file()
    return node_problem(os.getuid(), lambda command: shutil.which(command) is not None, plugins)


def claim_refusal(owner: str | None, directory: Path, owner_runs: bool) -> str | None:
    """Why a real node cannot start for the cluster in ``directory`` when MARKER names
    ``owner`` (None: no marker) whose node runs or not; None when it may."""
    if owner is None or not owner_runs:
        return None
    if owner == str(directory):
        return f"the real node already runs for {directory}"
    return f"a real node already runs on this machine, for the cluster in {owner}: stop it first"


def node_binaries() -> Path:
    release = pinned_release()
    flags = build_flags(release)
    return cache_root() / f"node-{release}-{source_hash(NODE_MODULE, flags)}" / "bin"


def coredns_binaries() -> Path:
    return cache_root() / f"coredns-{source_hash(COREDNS_MODULE, list(COREDNS_FLAGS))}" / "bin"


def built() -> bool:
    """Whether the node's binaries and image archives are all in the cache."""
    return (
        all((node_binaries() / name).is_file() for name in (KUBELET, KUBE_PROXY))
        and (coredns_binaries() / COREDNS).is_file()
        and all(image.archive().is_file() for image in IMAGES)
    )


def build() -> list[Path]:
    """Build what the cache lacks: kubelet and kube-proxy, CoreDNS, the images. Return the
    folders and archives."""
    if (reason := problem()) is not None:
        raise NoNode(reason)
    binaries = node_binaries()
    if not all((binaries / name).is_file() for name in (KUBELET, KUBE_PROXY)):
        compile_binaries(binaries, NODE_MODULE, build_flags(pinned_release()))
    dns = coredns_binaries()
    if not (dns / COREDNS).is_file():
        compile_binaries(dns, COREDNS_MODULE, list(COREDNS_FLAGS))
    for image in IMAGES:
        if not image.archive().is_file():
            make_image(image)
    return [binaries, dns, *(image.archive() for image in IMAGES)]


def run(*command: str | Path, what: str) -> str:
    """Run a command (no shell); fail in one line with the end of what it said."""
    done = subprocess.run([str(part) for part in command], capture_output=True, text=True)
    if done.returncode != 0:
        said = " | ".join((done.stderr or done.stdout).strip().splitlines()[-3:])
        raise ClusterError(f"{what} failed (exit {done.returncode}): {said}")
    return done.stdout


def make_image(image: Image) -> None:
    """Build ``image``'s root file system as one layer and write its OCI archive (whole or
    not at all)."""
    archive = image.archive()
    archive.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=archive.parent) as scratch:
        layer = Path(scratch) / "layer.tar"
        if image.packages:
            packages = ",".join(image.packages)
            # fmt: off
            run("nice", "-n", "10", "mmdebstrap", "--quiet", *MMDEBSTRAP,
                f"--include={packages}", SUITE, layer, MIRROR, what=f"mmdebstrap of {image.name}")
            # fmt: on
        else:
            program = Path(scratch) / "pause"
            run("cc", *PAUSE_FLAGS, "-o", program, PAUSE_SOURCE, what="cc of the pause program")
            with tarfile.open(layer, "w") as tar:
                tar.add(program, arcname="pause")
        partial = archive.with_name(f"{archive.name}.partial-{os.getpid()}")
        write_oci(layer, image, partial)
        partial.rename(archive)


def oci_documents(image: Image, layer_digest: str, layer_size: int) -> dict[str, bytes]:
    """The files of an OCI image layout holding ``image`` with one layer (its tar's
    sha256 and size), the layer's blob aside: path in the archive -> content."""
    command = {"Entrypoint" if not image.packages else "Cmd": list(image.command)}
    config = {
        "architecture": "amd64",
        "os": "linux",
        "config": {"Env": [f"PATH={PATH}"], "WorkingDir": "/", **command},
        "rootfs": {"type": "layers", "diff_ids": [f"sha256:{layer_digest}"]},
    }
    config_bytes = json.dumps(config, sort_keys=True).encode()
    config_digest = hashlib.sha256(config_bytes).hexdigest()
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": f"sha256:{config_digest}",
            "size": len(config_bytes),
        },
        "layers": [
            {
                "mediaType": "application/vnd.oci.image.layer.v1.tar",
                "digest": f"sha256:{layer_digest}",
                "size": layer_size,
            }
        ],
    }
    manifest_bytes = json.dumps(manifest, sort_keys=True).encode()
    manifest_digest = hashlib.sha256(manifest_bytes).hexdigest()
    index = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [
            {
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "digest": f"sha256:{manifest_digest}",
                "size": len(manifest_bytes),
                "annotations": {
                    "io.containerd.image.name": image.name,
                    "org.opencontainers.image.ref.name": image.name.rsplit(":", 1)[1],
                },
            }
        ],
    }
    return {
        "oci-layout": json.dumps({"imageLayoutVersion": "1.0.0"}).encode(),
        "index.json": json.dumps(index, sort_keys=True).encode(),
        f"blobs/sha256/{config_digest}": config_bytes,
        f"blobs/sha256/{manifest_digest}": manifest_bytes,
    }


def write_oci(layer: Path, image: Image, archive: Path) -> None:
    digest = hashlib.sha256()
    with layer.open("rb") as opened:
        while chunk := opened.read(1 << 20):
            digest.update(chunk)
    documents = oci_documents(image, digest.hexdigest(), layer.stat().st_size)
    with tarfile.open(archive, "w") as tar:
        tar.add(layer, arcname=f"blobs/sha256/{digest.hexdigest()}")
        for name, content in documents.items():
            entry = tarfile.TarInfo(name)
            entry.size = len(content)
            tar.addfile(entry, io.BytesIO(content))


@dataclass(frozen=True)
class Layout:
    """Where the node keeps its state: DIR/node."""

    root: Path

    @property
    def socket(self) -> Path:
        return self.root / "containerd" / "containerd.sock"

    @property
    def pki(self) -> Path:
        return self.root / "pki"


@dataclass(frozen=True)
class NodePorts:
    """The node's loopback ports (its kubelet API is on the gateway, KUBELET_PORT)."""

    kubelet_health: int
    proxy_health: int
    proxy_metrics: int
    dns_ready: int


def containerd_config(layout: Layout) -> str:
    """containerd's own configuration: its root, state and socket under DIR/node, the CRI
    plugin with the local pause image, CNI from DIR/node/cni, and ``restrict_oom_score_adj``
    (root here lacks CAP_SYS_RESOURCE: runc cannot lower a container's oom_score_adj)."""
    base = layout.root / "containerd"
    cri = '[plugins."io.containerd.grpc.v1.cri"]'
    return f"""version = 2
root = "{base / "root"}"
state = "{base / "state"}"

[grpc]
  address = "{layout.socket}"

{cri}
  sandbox_image = "{PAUSE.name}"
  restrict_oom_score_adj = true
  enable_cdi = false

{cri[:-1]}.containerd]
  snapshotter = "overlayfs"
  default_runtime_name = "runc"

{cri[:-1]}.containerd.runtimes.runc]
  runtime_type = "io.containerd.runc.v2"

{cri[:-1]}.cni]
  bin_dir = "{CNI_PLUGINS}"
  conf_dir = "{layout.root / "cni" / "conf"}"
"""


def cni_config(layout: Layout) -> str:
    """The pods' network: a veth on the bridge each, an address of NODE_NETWORK, routes to
    the pod and Service ranges through the gateway and none other (no default route),
    no IP masquerade."""
    return json.dumps(
        {
            "cniVersion": "1.0.0",
            "name": "branchyard",
            "plugins": [
                {
                    "type": "bridge",
                    "bridge": BRIDGE,
                    "isGateway": True,
                    "isDefaultGateway": False,
                    "ipMasq": False,
                    "hairpinMode": True,
                    "ipam": {
                        "type": "host-local",
                        "ranges": [[{"subnet": NODE_NETWORK, "gateway": GATEWAY}]],
                        "routes": [{"dst": POD_NETWORK}, {"dst": SERVICE_RANGE}],
                        "dataDir": str(layout.root / "cni" / "ipam"),
                    },
                }
            ],
        },
        indent=2,
    )


def kubelet_config(layout: Layout, ports: NodePorts) -> str:
    """The kubelet's KubeletConfiguration: its API on the gateway only, clients by
    certificate of the cluster's CA (the API server's) and authorized by the API server,
    cluster DNS at the gateway, cgroupfs, no swap check, no iptables chains of its own,
    no image GC or eviction for disk (the images are loaded once, never pulled)."""
    pki = layout.pki
    return json.dumps(
        {
            "apiVersion": "kubelet.config.k8s.io/v1beta1",
            "kind": "KubeletConfiguration",
            "address": GATEWAY,
            "port": KUBELET_PORT,
            "readOnlyPort": 0,
            "healthzBindAddress": "127.0.0.1",
            "healthzPort": ports.kubelet_health,
            "tlsCertFile": str(pki / "kubelet.crt"),
            "tlsPrivateKeyFile": str(pki / "kubelet.key"),
            "authentication": {
                "anonymous": {"enabled": False},
                "webhook": {"enabled": True},
                "x509": {"clientCAFile": str(pki / "ca.crt")},
            },
            "authorization": {"mode": "Webhook"},
            "containerRuntimeEndpoint": f"unix://{layout.socket}",
            "cgroupDriver": "cgroupfs",
            "failCgroupV1": False,  # this machine's are v1 (hybrid)
            "failSwapOn": False,
            "makeIPTablesUtilChains": False,
            "clusterDomain": CLUSTER_DOMAIN,
            "clusterDNS": [GATEWAY],
            "resolvConf": "",
            "podLogsDir": str(layout.root / "pod-logs"),
            "imageGCHighThresholdPercent": 100,
            "imageGCLowThresholdPercent": 99,
            "evictionHard": {"memory.available": "100Mi"},
            "serializeImagePulls": False,
        },
        indent=2,
    )


def kube_proxy_config(directory: Path, ports: NodePorts) -> str:
    """kube-proxy's KubeProxyConfiguration: nftables mode, every Service connection
    masqueraded to the gateway (a pod's reply then comes back through the host, where
    the connection's translation is undone: no br_netfilter needed), node ports on the
    bridge only, the kernel's conntrack settings left as they are."""
    return json.dumps(
        {
            "apiVersion": "kubeproxy.config.k8s.io/v1alpha1",
            "kind": "KubeProxyConfiguration",
            "mode": "nftables",
            "clientConnection": {"kubeconfig": str(directory / "kube-proxy.kubeconfig")},
            "hostnameOverride": NODE,
            "bindAddress": GATEWAY,
            "clusterCIDR": POD_NETWORK,
            "healthzBindAddress": f"127.0.0.1:{ports.proxy_health}",
            "metricsBindAddress": f"127.0.0.1:{ports.proxy_metrics}",
            "masqueradeAll": True,
            "nodePortAddresses": [NODE_NETWORK],
            "conntrack": {
                "maxPerCore": 0,
                "min": 0,
                "tcpEstablishedTimeout": "0s",
                "tcpCloseWaitTimeout": "0s",
            },
        },
        indent=2,
    )


def corefile(directory: Path, ports: NodePorts) -> str:
    """CoreDNS on the gateway: the cluster's names from the API, nothing forwarded."""
    return f""".:53 {{
    bind {GATEWAY}
    errors
    ready 127.0.0.1:{ports.dns_ready}
    kubernetes {CLUSTER_DOMAIN} in-addr.arpa ip6.arpa {{
        kubeconfig {directory / "coredns.kubeconfig"} branchyard-test
        pods insecure
    }}
}}
"""


def nft_ruleset() -> str:
    """The table that keeps the pod network on this machine: nothing is forwarded between
    the bridge and any other interface, either way."""
    return f"""table inet {NFT_TABLE} {{
    chain forward {{
        type filter hook forward priority filter - 10; policy accept;
        iifname "{BRIDGE}" oifname != "{BRIDGE}" drop
        oifname "{BRIDGE}" iifname != "{BRIDGE}" drop
    }}
}}
"""


def sysctl_file(name: str) -> Path:
    return Path("/proc/sys") / name.replace(".", "/")


def kubelet_kubeconfig(directory: Path, layout: Layout) -> str:
    """The kubelet's kubeconfig: system:node:NODE by the certificate of the cluster's CA."""
    server = json.loads((directory / "kubeconfig").read_text())["clusters"][0]["cluster"]
    return json.dumps(
        {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "branchyard-test", "cluster": server}],
            "users": [
                {
                    "name": f"system:node:{NODE}",
                    "user": {
                        "client-certificate": str(layout.pki / "kubelet-client.crt"),
                        "client-key": str(layout.pki / "kubelet-client.key"),
                    },
                }
            ],
            "contexts": [
                {
                    "name": "branchyard-test",
                    "context": {"cluster": "branchyard-test", "user": f"system:node:{NODE}"},
                }
            ],
            "current-context": "branchyard-test",
        },
        indent=2,
    )


def commands(directory: Path, layout: Layout, containerd_pid: int) -> dict[str, list[str]]:
    """Each piece's command line but containerd's (it runs first: :func:`start_containerd`).
    The kubelet enters containerd's mount namespace: the volumes it mounts are the ones
    containerd gives the containers."""
    root = layout.root
    return {
        KUBELET: [
            "nsenter",
            f"--mount=/proc/{containerd_pid}/ns/mnt",
            "--",
            str(node_binaries() / KUBELET),
            f"--config={root / 'kubelet.json'}",
            f"--kubeconfig={root / 'kubelet.kubeconfig'}",
            f"--root-dir={root / 'kubelet'}",
            f"--node-ip={GATEWAY}",
            f"--hostname-override={NODE}",
        ],
        KUBE_PROXY: [str(node_binaries() / KUBE_PROXY), f"--config={root / 'kube-proxy.json'}"],
        COREDNS: [str(coredns_binaries() / COREDNS), "-conf", str(root / "Corefile")],
        SOCAT: forwarder(apiserver_port(directory)),
    }


def apiserver_port(directory: Path) -> int:
    """The API server's loopback port, from the cluster's kubeconfig."""
    config = json.loads((directory / "kubeconfig").read_text())
    return int(config["clusters"][0]["cluster"]["server"].rsplit(":", 1)[1])


def forwarder(port: int) -> list[str]:
    """socat from the gateway's ``port`` to the API server's on loopback: the endpoint of
    the Service ``kubernetes`` (kubernetes.default.svc), which pods reach as in any
    cluster. Only the bridge reaches the gateway's address (the ruleset)."""
    return [
        SOCAT,
        f"TCP-LISTEN:{port},bind={GATEWAY},reuseaddr,fork",
        f"TCP:127.0.0.1:{port}",
    ]


def api_endpoints(port: int) -> EndpointSlice:
    """The EndpointSlice of the Service ``kubernetes``: the gateway's ``port`` (the API
    server, whose own address is loopback, keeps none: --endpoint-reconciler-type=none)."""
    return EndpointSlice(
        metadata=ObjectMeta(
            name="kubernetes",
            namespace="default",
            labels={
                "kubernetes.io/service-name": "kubernetes",
                "endpointslice.kubernetes.io/managed-by": "k8s-test-cluster",
            },
        ),
        addressType="IPv4",
        endpoints=[Endpoint(addresses=[GATEWAY], conditions=EndpointConditions(ready=True))],
        ports=[EndpointPort(name="https", port=port, protocol="TCP")],
    )


def owner() -> str | None:
    try:
        return MARKER.read_text().strip() or None
    except FileNotFoundError:
        return None


def runs(directory: Path) -> list[str]:
    """The node's pieces that run for the cluster in ``directory``."""
    return [name for name, _ in recorded(directory / "node", PIECES)]


def start(directory: Path) -> Path:
    """Start the real node beside the cluster running in ``directory``; return DIR/node."""
    directory = directory.resolve()
    if (reason := problem()) is not None:
        raise NoNode(reason)
    if not built():
        raise ClusterError("the real node is not built: run scripts/k8s-test-cluster build")
    refuse_if_taken(directory)
    if APISERVER not in k8s_cluster.running(directory):
        raise ClusterError(f"no cluster runs in {directory}: start it first")
    if (holder := owner()) is not None:  # a node that did not stop: what it left goes first
        stop(Path(holder))
    layout = Layout(directory / "node")
    if layout.root.exists():
        shutil.rmtree(layout.root)
    MARKER.write_text(f"{directory}\n")
    try:
        start_pieces(directory, layout)
    except BaseException:
        stop(directory)
        raise
    return layout.root


def refuse_if_taken(directory: Path) -> None:
    """Fail if another real node runs on this machine (or this cluster's already runs)."""
    holder = owner()
    refusal = claim_refusal(holder, directory, holder is not None and bool(runs(Path(holder))))
    if refusal is not None:
        raise ClusterError(refusal)


def start_pieces(directory: Path, layout: Layout) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    for sub in ("logs", "pids", "pki", "cni/conf", "cni/ipam", "kubelet", "pod-logs"):
        (layout.root / sub).mkdir(parents=True)
    saved = {name: sysctl_file(name).read_text().strip() for name in SYSCTLS}
    (layout.root / "sysctls.json").write_text(json.dumps(saved, indent=2) + "\n")
    made = [str(path) for path in RUN_DIRECTORIES if not path.exists()]
    (layout.root / "made.json").write_text(json.dumps(made) + "\n")
    for path in RUN_DIRECTORIES:
        path.mkdir(exist_ok=True)
    make_network()
    make_node_pki(directory, layout)
    taker = Ports()
    ports = NodePorts(*(taker.take() for _ in range(4)))
    files = {
        "containerd.toml": containerd_config(layout),
        "cni/conf/10-branchyard.conflist": cni_config(layout),
        "kubelet.json": kubelet_config(layout, ports),
        "kubelet.kubeconfig": kubelet_kubeconfig(directory, layout),
        "kube-proxy.json": kube_proxy_config(directory, ports),
        "Corefile": corefile(directory, ports),
    }
    for name, text in files.items():
        (layout.root / name).write_text(text)
    register(directory)
    containerd = start_containerd(layout, deadline)
    watched = {CONTAINERD: containerd}
    for image in IMAGES:
        ctr(layout, "images", "import", image.archive(), what=f"the import of {image.name}")
    lines = commands(directory, layout, containerd.pid)
    client = admin_client(directory)

    def up(name: str, what: str, check: Callable[[], bool]) -> None:
        watched[name] = launch(layout.root, name, lines[name])
        try:
            wait_until(what, check, deadline, watched)
        except ClusterError as error:
            tail = log_tail(layout.root, name)
            raise ClusterError(f"{error}; {name}'s log ends: {tail}") from None

    up(KUBELET, f"node {NODE} Ready", lambda: k8s_cluster.node_ready(client, NODE))
    up(KUBE_PROXY, "kube-proxy's /healthz", lambda: answers(ports.proxy_health, "/healthz"))
    up(COREDNS, "CoreDNS's /ready", lambda: answers(ports.dns_ready, "/ready"))
    port = apiserver_port(directory)
    up(SOCAT, f"the API server on {GATEWAY}:{port}", lambda: listens(GATEWAY, port))
    client.apply(api_endpoints(port), field_manager="k8s-test-cluster", force=True)


def listens(host: str, port: int) -> bool:
    with socket.create_connection((host, port), timeout=5):
        return True


def answers(port: int, path: str) -> bool:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as answer:
        return bool(answer.status == 200)


def make_network() -> None:
    """The bridge with the gateway's address, the pod and Service ranges routed to it, the
    ruleset, and forwarding (which the ruleset keeps to the bridge)."""
    # fmt: off
    steps = [
        ["ip", "link", "add", BRIDGE, "type", "bridge"],
        ["ip", "address", "add", f"{GATEWAY}/{NODE_NETWORK.split('/')[1]}", "dev", BRIDGE],
        ["ip", "link", "set", BRIDGE, "up"],
        ["ip", "route", "add", POD_NETWORK, "dev", BRIDGE],
        ["ip", "route", "add", SERVICE_RANGE, "dev", BRIDGE],
    ]
    # fmt: on
    for step in steps:
        run(*step, what=" ".join(step))
    done = subprocess.run(["nft", "-f", "-"], input=nft_ruleset(), capture_output=True, text=True)
    if done.returncode != 0:
        raise ClusterError(f"nft -f failed: {done.stderr.strip()}")
    sysctl_file("net.ipv4.ip_forward").write_text("1\n")


def make_node_pki(directory: Path, layout: Layout) -> None:
    """The kubelet's serving certificate (the gateway's address) and its client
    certificate (system:node:NODE in system:nodes), of the cluster's CA."""
    authority = directory / "pki"
    shutil.copy(authority / "ca.crt", layout.pki / "ca.crt")
    certify(authority, layout.pki, "kubelet", f"/CN={NODE}",
            f"subjectAltName=IP:{GATEWAY},DNS:{NODE}", "extendedKeyUsage=serverAuth")  # fmt: skip
    certify(authority, layout.pki, "kubelet-client", f"/O=system:nodes/CN=system:node:{NODE}",
            "extendedKeyUsage=clientAuth")  # fmt: skip


def register(directory: Path) -> None:
    """The Node, tainted and labelled so that only pods that ask land on it, with its pod
    range (no controller hands one out here); CoreDNS's read access (the view role)."""
    metadata = ObjectMeta(
        name=NODE,
        labels={"kubernetes.io/hostname": NODE, "kubernetes.io/os": "linux", LABEL: "real"},
    )
    taint = Taint(key=TAINT, effect="NoSchedule")
    spec = NodeSpec(podCIDR=NODE_NETWORK, podCIDRs=[NODE_NETWORK], taints=[taint])
    binding = ClusterRoleBinding(
        metadata=ObjectMeta(name="branchyard-test-coredns"),
        roleRef=RoleRef(apiGroup="rbac.authorization.k8s.io", kind="ClusterRole", name="view"),
        subjects=[Subject(kind="User", name="system:coredns")],
    )
    client = admin_client(directory)
    try:
        client.create(Node(metadata=metadata, spec=spec))
        client.apply(binding, field_manager="k8s-test-cluster", force=True)
    except ApiError as error:
        raise ClusterError(f"cannot register {NODE}: {error}") from None


def start_containerd(layout: Layout, deadline: float) -> subprocess.Popen[bytes]:
    """containerd in a mount namespace of its own, with a tmpfs on /run/containerd (its
    shims' sockets) and /run/netns (the pods' network namespaces) there: all of it goes
    when the namespace's last process does."""
    mounts = " && ".join(
        f"mount -t tmpfs -o mode=0711 branchyard-test-node {path}" for path in RUN_DIRECTORIES
    )
    command = [
        "unshare", "--mount", "--propagation", "private",
        "sh", "-c", f'{mounts} && exec "$0" "$@"',
        CONTAINERD, f"--config={layout.root / 'containerd.toml'}",
    ]  # fmt: skip
    process = launch(layout.root, CONTAINERD, command)
    watched = {CONTAINERD: process}
    wait_until("containerd's socket", lambda: serves(layout), deadline, watched)
    namespace = os.readlink(f"/proc/{process.pid}/ns/mnt")
    (layout.root / "mount-namespace").write_text(namespace + "\n")
    return process


def serves(layout: Layout) -> bool:
    if not layout.socket.exists():
        return False
    done = subprocess.run(
        ["ctr", "--address", str(layout.socket), "version"], capture_output=True, timeout=10
    )
    return done.returncode == 0


def ctr(layout: Layout, *args: str | Path, what: str) -> str:
    return run("ctr", "--namespace", "k8s.io", "--address", layout.socket, *args, what=what)


def stop(directory: Path) -> list[str]:
    """End the node of the cluster in ``directory`` and remove what it made: its processes
    and its pods', their cgroups, the mount namespace (with every mount in it), the Node
    object, the nftables tables, the bridge (its routes with it); the sysctls as they
    were before it started. Return the names of the pieces that ran."""
    directory = directory.resolve()
    layout = Layout(directory / "node")
    if not layout.root.is_dir():
        return []
    forwarders = [pid for _, pid in recorded(layout.root, [SOCAT])]  # a session each
    stopped = end(layout.root, [{KUBELET, KUBE_PROXY, COREDNS, SOCAT}], PIECES[1:])
    end_pods()
    for pid in forwarders:  # socat's children, one a connection, outlive it
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)
    stopped = end(layout.root, [{CONTAINERD}], [CONTAINERD]) + stopped
    end_namespace(layout)
    remove_cgroups()
    for family, table in (("inet", NFT_TABLE), *KUBE_PROXY_TABLES):
        subprocess.run(["nft", "delete", "table", family, table], capture_output=True)
    subprocess.run(["ip", "link", "delete", BRIDGE], capture_output=True)
    with contextlib.suppress(FileNotFoundError):
        for name, value in json.loads((layout.root / "sysctls.json").read_text()).items():
            sysctl_file(name).write_text(value + "\n")
    with contextlib.suppress(FileNotFoundError):
        for made in json.loads((layout.root / "made.json").read_text()):
            with contextlib.suppress(OSError):
                Path(made).rmdir()
    if APISERVER in k8s_cluster.running(directory):
        client = admin_client(directory)
        with contextlib.suppress(ApiError):
            client.delete(Node, NODE)
        with contextlib.suppress(ApiError):
            client.delete(EndpointSlice, "kubernetes", namespace="default")
    if owner() == str(directory):
        MARKER.unlink()
    return sorted(stopped, key=PIECES.index)


def kubepods() -> list[Path]:
    """The kubelet's cgroups in every hierarchy (cgroup v1: one per controller)."""
    return sorted(Path("/sys/fs/cgroup").glob("*/kubepods"))


def cgroups_under(top: Path) -> list[Path]:
    """The cgroups below ``top``, the deepest first. A container's shim removes its
    cgroups as the container dies, at any moment of a stop: one gone in the middle of the
    walk is left out (``Path.rglob`` raises FileNotFoundError then; ``os.walk`` skips
    it)."""
    return [Path(parent) for parent, _, _ in os.walk(top, topdown=False) if parent != str(top)]


def pod_processes() -> set[int]:
    found: set[int] = set()
    for top in kubepods():
        for cgroup in [*cgroups_under(top), top]:
            with contextlib.suppress(OSError, ValueError):
                found.update(int(pid) for pid in (cgroup / "cgroup.procs").read_text().split())
    return found


def end_pods() -> None:
    """SIGKILL every process of a pod (the kubelet, stopped, stops none)."""
    deadline = time.monotonic() + k8s_cluster.STOP_TIMEOUT
    while (pids := pod_processes()) and time.monotonic() < deadline:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.05)


def in_namespace(namespace: str) -> Iterator[int]:
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if os.readlink(entry / "ns" / "mnt") == namespace:
                    yield int(entry.name)


def end_namespace(layout: Layout) -> None:
    """SIGKILL what is left in containerd's mount namespace (its shims), until none is."""
    try:
        namespace = (layout.root / "mount-namespace").read_text().strip()
    except FileNotFoundError:
        return
    deadline = time.monotonic() + k8s_cluster.STOP_TIMEOUT
    while (pids := list(in_namespace(namespace))) and time.monotonic() < deadline:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.05)


def remove_cgroups() -> None:
    """Remove the kubelet's cgroups, the deepest first (an emptied cgroup may be busy for a
    moment)."""
    deadline = time.monotonic() + k8s_cluster.STOP_TIMEOUT
    for top in kubepods():
        for cgroup in cgroups_under(top):
            remove_cgroup(cgroup, deadline)
        remove_cgroup(top, deadline)


def remove_cgroup(cgroup: Path, deadline: float) -> None:
    while True:
        try:
            cgroup.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError as error:
            if time.monotonic() > deadline:
                raise ClusterError(f"cannot remove the cgroup {cgroup}: {error}") from None
            time.sleep(0.05)


def left_behind(directory: Path) -> list[str]:
    """What is left of the node of the cluster in ``directory`` (nothing once it stopped):
    its pieces' or pods' processes, a process in its mount namespace, its cgroups, the
    bridge, an nftables table of its, a sysctl not as it was, a pod's network namespace,
    a mount of its, the marker."""
    layout = Layout(directory.resolve() / "node")
    left = [f"process {name}" for name in runs(directory)]
    left += [f"pod process {pid}" for pid in sorted(pod_processes())]
    with contextlib.suppress(FileNotFoundError):
        namespace = (layout.root / "mount-namespace").read_text().strip()
        left += [f"process {pid} in its mount namespace" for pid in in_namespace(namespace)]
    left += [f"cgroup {top}" for top in kubepods()]
    if Path(f"/sys/class/net/{BRIDGE}").exists():
        left.append(f"bridge {BRIDGE}")
    tables = subprocess.run(["nft", "list", "tables"], capture_output=True, text=True).stdout
    for family, table in (("inet", NFT_TABLE), *KUBE_PROXY_TABLES):
        if f"table {family} {table}" in tables.splitlines():
            left.append(f"nftables table {family} {table}")
    with contextlib.suppress(FileNotFoundError):
        for name, value in json.loads((layout.root / "sysctls.json").read_text()).items():
            if sysctl_file(name).read_text().strip() != value:
                left.append(f"sysctl {name} not {value}")
    left += [f"network namespace {path}" for path in Path("/run/netns").glob("cni-*")]
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        point = line.split()[4]
        if point.startswith((str(layout.root), *map(str, RUN_DIRECTORIES))):
            left.append(f"mount {point}")
    if owner() == str(directory.resolve()):
        left.append(f"marker {MARKER}")
    return left
