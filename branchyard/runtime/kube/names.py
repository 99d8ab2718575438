"""The names and labels of branchyard's Kubernetes objects: pure functions, no I/O.

A branchyard service is named after its repository, so it may hold ``_`` or ``.``,
capitals, or start with a digit (``other_app``, ``2fa``); a Kubernetes Service's name
must be a DNS-1035 label (``[a-z0-9-]``, a letter first, at most 63 characters).
:func:`object_name` is the one mapping from one to the other, used for every object
of a service (its Services, Deployments, ConfigMaps, Secrets, Ingress, route) and for
its label: a name that is already such a label, short enough to take a ``-vN``
suffix, stays as it is; any other is made one and gets a hash of the original
(``other_app`` gives ``other-app-`` and six hex digits), so two services never map to
one name.

Every object carries :data:`MANAGED_BY`; the objects of a service carry
:data:`SERVICE`, and those of one revision also :data:`REVISION` and :data:`COMMIT`
(docs/kubernetes.md, "The mapping").
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping

from branchyard.errors import UsageError
from branchyard.naming import MAX_LABEL, dns_label, short_hash

MANAGED_BY = "app.kubernetes.io/managed-by"
"""The label that marks what branchyard made (its value: :data:`MANAGER`); branchyard
never changes an object without it."""
MANAGER = "branchyard"
NAMESPACE = "branchyard.dev/namespace"
"""On a Namespace: the branchyard namespace it holds (its name may have a prefix)."""
SERVICE = "branchyard.dev/service"
"""The service an object belongs to, as :func:`object_name` gives it."""
REVISION = "branchyard.dev/revision"
"""The ordinal of the revision an object belongs to (``4`` for v4)."""
COMMIT = "branchyard.dev/commit"
"""The full sha of that revision's commit."""
PROCESS = "branchyard.dev/process"
"""Which of a revision's processes a pod runs: ``web``, or a worker's name."""
FALLBACK = "branchyard.dev/fallback"
"""On an ExternalName Service: ``"true"``, it stands in for a peer the namespace lacks."""
LAST_OUTPUT = "branchyard.dev/last-output"
LAST_BUILD_OUTPUT = "branchyard.dev/last-build-output"
"""Annotations on the web Deployment of a revision that failed to start: the last lines of
its output (or of its build's), kept when it was scaled to 0, as its pod took its log along."""

WEB = "web"
ORDINAL_ROOM = 10
"""Characters a service's name leaves for a revision's ``-vN`` (up to v99999999)."""
MAX_NAME = MAX_LABEL - ORDINAL_ROOM
_DNS_1035 = re.compile(r"[a-z]([a-z0-9-]*[a-z0-9])?")
_HASH_ROOM = 7  # "-" and naming.short_hash's six hex digits


def object_name(name: str) -> str:
    """``name`` (a service's or a worker's) as a DNS-1035 label of at most
    :data:`MAX_NAME` characters: itself if it is one, else made one with a hash of it."""
    if _DNS_1035.fullmatch(name) and len(name) <= MAX_NAME:
        return name
    label = dns_label(name)
    if not label[:1].isalpha():
        label = f"s-{label}"
    head = label[: MAX_NAME - _HASH_ROOM].rstrip("-")
    return f"{head}-{short_hash(name)}"


def revision_name(service: str, ordinal: int) -> str:
    """The web Deployment of revision ``ordinal``, and its own Service: ``SERVICE-vN``."""
    return f"{object_name(service)}-v{ordinal}"


def login_name(service: str) -> str:
    """The Secret of the login a private repo's fetch uses: ``SERVICE-git`` (an env
    Secret's is ``SERVICE-secret-HASH``, its hash of hex digits only)."""
    return f"{object_name(service)}-git"


def worker_name(service: str, ordinal: int, worker: str) -> str:
    """A worker's Deployment: ``SERVICE-vN-WORKER``."""
    return f"{revision_name(service, ordinal)}-{object_name(worker)}"


def namespace_name(prefix: str, namespace: str) -> str:
    """The Kubernetes Namespace of a branchyard namespace: ``prefix`` then its name."""
    name = prefix + namespace
    if len(name) > MAX_LABEL:
        raise UsageError(
            f"the Kubernetes Namespace {name!r} would be {len(name)} characters, more than "
            f"{MAX_LABEL}: use a shorter namespace prefix than {prefix!r}"
        )
    return name


def content_hash(data: Mapping[str, str]) -> str:
    """Ten hex digits of a hash of ``data``: the same content, the same hash."""
    text = json.dumps(dict(sorted(data.items())), separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:10]


def managed() -> dict[str, str]:
    """The label every object carries."""
    return {MANAGED_BY: MANAGER}


def service_labels(service: str) -> dict[str, str]:
    """The labels of an object of a service that no one revision owns (its Service,
    Ingress, route, and the ConfigMaps and Secrets revisions share by content)."""
    return {**managed(), SERVICE: object_name(service)}


def revision_labels(service: str, ordinal: int, sha: str) -> dict[str, str]:
    """The labels of an object of one revision."""
    return {**service_labels(service), REVISION: str(ordinal), COMMIT: sha}


def selector(service: str, ordinal: int, process: str = WEB) -> dict[str, str]:
    """What picks the pods of one process of one revision."""
    return {SERVICE: object_name(service), REVISION: str(ordinal), PROCESS: process}
