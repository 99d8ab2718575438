"""What ``branchyard up --runtime kubernetes`` was told: which cluster, and how to
render the objects of a revision there."""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_IMAGE = "python:3.11-slim"
"""The image a revision runs in unless its ``branchyard.yaml`` names one."""

DEFAULT_GIT_IMAGE = "alpine/git:2.47.2"
"""The image of the init container that fetches a revision's commit (the default
image has no git)."""

DEFAULT_MEMORY = 512 * 1024**2
DEFAULT_CPU = 1.0
"""A container's limits where ``branchyard.yaml`` says none: a local box's defaults
(``up --box-memory``, ``--box-cpu``, which ``up`` hands to both runtimes)."""


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
    namespace_prefix: str = ""
    """Put before each branchyard namespace to name its Kubernetes Namespace."""
    git_url: str | None = None
    """Where pods fetch the daemon's mirrors of local repos over git's smart HTTP
    (``http://HOST:PORT``); None: only remote repos can be deployed."""
