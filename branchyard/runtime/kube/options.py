"""What ``branchyard up --runtime kubernetes`` was told: which cluster, and how to
render the objects of a revision there."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from branchyard.naming import is_domain
from branchyard.text import redacted_url

DEFAULT_IMAGE = "python:3.11-slim"
"""The image a revision runs in unless its ``branchyard.yaml`` names one."""

DEFAULT_GIT_IMAGE = "alpine/git:2.47.2"
"""The image of the init container that fetches a revision's commit (the default
image has no git)."""

DEFAULT_MEMORY = 512 * 1024**2
DEFAULT_CPU = 1.0
"""A container's limits where ``branchyard.yaml`` says none: a local box's defaults
(``up --box-memory``, ``--box-cpu``, which ``up`` hands to both runtimes)."""


INDEX_VARIABLES = (
    "PIP_INDEX_URL",
    "PIP_EXTRA_INDEX_URL",
    "PIP_TRUSTED_HOST",
    "UV_INDEX",
    "UV_INDEX_URL",
    "UV_DEFAULT_INDEX",
    "UV_EXTRA_INDEX_URL",
)
"""The package index settings of pip and uv that the daemon's environment hands to every
install container, as the local runtime hands them to every install: a cluster with its
own package index (or none but a mirror) is named where the daemon starts."""


def index_settings(environment: Mapping[str, str]) -> dict[str, str]:
    """The :data:`INDEX_VARIABLES` of ``environment``; a ValueError naming one whose value
    carries credentials, which a pod's spec (and ``k8s render``) would show."""
    found = {name: environment[name] for name in INDEX_VARIABLES if name in environment}
    for name, value in found.items():
        if any(redacted_url(url) != url for url in value.split()):
            raise ValueError(
                f"{name} carries credentials ({' '.join(map(redacted_url, value.split()))}), "
                "which every install container's spec would show: name an index pods reach "
                "without them"
            )
    return found


_LABEL_NAME = re.compile(r"([A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)")
EFFECTS = ("NoSchedule", "PreferNoSchedule", "NoExecute")


@dataclass(frozen=True)
class Toleration:
    """A taint the revisions' pods tolerate: ``KEY[=VALUE]:EFFECT``, as ``kubectl taint``
    writes it (without a value, any value of the key)."""

    key: str
    value: str | None
    effect: str


def _label(key: str, value: str) -> tuple[str, str]:
    prefix, slash, name = key.rpartition("/")
    if (slash and not is_domain(prefix)) or not _LABEL_NAME.fullmatch(name):
        raise ValueError(f"{key!r} is not a label key")
    if value and not _LABEL_NAME.fullmatch(value):
        raise ValueError(f"{value!r} is not a label value")
    return key, value


def node_label(text: str) -> tuple[str, str]:
    """``KEY=VALUE``, a label of the nodes the revisions' pods may run on; a ValueError
    saying what is wrong with it."""
    key, equals, value = text.partition("=")
    if not equals:
        raise ValueError(f"{text!r} is not KEY=VALUE")
    return _label(key, value)


def toleration(text: str) -> Toleration:
    """``KEY[=VALUE]:EFFECT``; a ValueError saying what is wrong with it."""
    taint, colon, effect = text.rpartition(":")
    if not colon or effect not in EFFECTS:
        raise ValueError(f"{text!r} is not KEY[=VALUE]:EFFECT, EFFECT one of {', '.join(EFFECTS)}")
    key, equals, value = taint.partition("=")
    _label(key, value)
    return Toleration(key, value if equals else None, effect)


@dataclass(frozen=True)
class KubeOptions:
    kubeconfig: str | None = None
    """A kubeconfig's path; None: ``KUBECONFIG``, ``~/.kube/config``, else the pod's own
    service account when branchyard runs in the cluster."""
    context: str | None = None
    """The kubeconfig's context to use; None: its current one."""
    domain: str | None = None
    """Services are reached at ``SERVICE.NS.DOMAIN`` through an Ingress; None: no
    Ingress, and a service's URL is its in-cluster name."""
    ingress_class: str | None = None
    """The Ingress class of those Ingresses; None: the cluster's default class."""
    image: str = DEFAULT_IMAGE
    git_image: str = DEFAULT_GIT_IMAGE
    install_env: Mapping[str, str] = field(default_factory=dict)
    """What the install container gets besides the revision's env: the package index
    settings of the daemon's environment (:func:`index_settings`)."""
    cluster_domain: str = "cluster.local"
    """The cluster's DNS domain: a Service is ``NAME.NAMESPACE.svc.CLUSTER_DOMAIN``."""
    memory: int = DEFAULT_MEMORY
    """Bytes each container of a pod may use where its ``branchyard.yaml`` says no
    ``memory:`` (``up --box-memory``, as for a local box)."""
    cpu: float = DEFAULT_CPU
    """Cores each may keep busy where it says no ``cpu:`` (``up --box-cpu``)."""
    build_timeout: int = 300
    """Seconds a pod's init containers (fetch the commit, install, build) may take: a
    Deployment's ``progressDeadlineSeconds`` is this plus the manifest's health timeout,
    since on Kubernetes the build runs in the pod (locally the health timeout starts
    after the build)."""
    stop_grace: int = 10
    """Seconds a pod's process has from SIGTERM to its exit before it is killed (``up
    --stop-grace``, rounded up); a web pod's grace adds the pause before the SIGTERM
    (``render.UNROUTED``)."""
    node_selector: Mapping[str, str] = field(default_factory=dict)
    """Labels a node must have for the revisions' pods to run on it (``up --node-selector``:
    nodes kept for branch environments)."""
    tolerations: tuple[Toleration, ...] = ()
    """Taints of such nodes the pods tolerate (``up --toleration``)."""
    install_cache: int | None = None
    """Bytes of each Namespace's install cache (``up --install-cache``): a
    PersistentVolumeClaim the install containers keep their environments in, so a
    rollback or a restart copies what it installed before; None (the default): no claim,
    every pod installs (a cluster without a default StorageClass would leave the claim,
    and every pod, Pending)."""
    install_cache_class: str | None = None
    """The StorageClass of that claim (``up --install-cache-class``); None: the cluster's
    default class."""
    install_cache_access: str = "ReadWriteOnce"
    """The claim's access mode (``up --install-cache-access``): ``ReadWriteOnce``, which
    every class serves and which keeps the pods of a Namespace that mount it on one node
    (a single-node cluster), or ``ReadWriteMany``, for a class that serves it (a shared
    file system), whose pods may run on any node."""
    namespace_prefix: str = ""
    """Put before each branchyard namespace to name its Kubernetes Namespace."""
    git_url: str | None = None
    """Where pods fetch the daemon's mirrors of local repos over git's smart HTTP
    (``http://HOST:PORT``); None: only remote repos can be deployed."""
