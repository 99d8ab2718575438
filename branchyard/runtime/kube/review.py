"""What ``branchyard k8s render`` shows, from any daemon: the objects of a revision as the
Kubernetes runtime applies them, and a warning for each address in them a pod cannot
reach.

A revision's env holds the ``<PEER>_URL`` its runtime gave it: on a daemon that runs the
local runtime, a loopback port of this machine (``http://127.0.0.1:44885``), which in a
pod is the pod itself. So :func:`review` shows those as the Kubernetes runtime gives
them (``render.peer_url``: the peer's Service name); a value a person set is theirs and
stays. What it cannot put right, it says: a fetch URL or an env value on a loopback
address (a repo registered as ``http://127.0.0.1:PORT/…``, a daemon's git server
listening on loopback, an ``APP_URL`` set by hand) gets one line of warning, which the
CLI prints on stderr.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import replace
from urllib.parse import urlsplit

from branchyard.git import local_path
from branchyard.runtime import Reviewed, RevisionSpec
from branchyard.runtime.kube import render
from branchyard.runtime.kube.options import KubeOptions
from branchyard.text import redacted_url

PODS_CANNOT = "a loopback address, which in a pod is the pod itself"


def review(
    options: KubeOptions, spec: RevisionSpec, peers: Mapping[str, str], key: str | None = None
) -> Reviewed:
    """The objects of ``spec`` as YAML (``render.review``, its environment's ``key`` for an
    install cache), each env key of ``peers`` (``APP_URL`` -> ``app``: a peer URL the
    daemon's runtime gave) as the Kubernetes runtime gives it, and the warnings about what
    pods would not reach."""
    env = dict(spec.env)
    for key, peer in peers.items():
        if key in env and key not in spec.secret_keys:
            env[key] = render.peer_url(peer)
    shown = replace(spec, env=env)
    text = render.review(options, shown, key)
    return Reviewed(text, tuple(warnings(options, shown)))


def warnings(options: KubeOptions, spec: RevisionSpec) -> list[str]:
    """One line for the fetch URL and for each env value (secrets aside: they are not
    shown) whose host is loopback."""
    said = []
    fetch = render.source_url(options, spec)
    if loopback(fetch):
        hint = (
            "serve the daemon's git server where pods reach it (up --git-listen, --git-url)"
            if local_path(spec.repo_url) is not None
            else "register the repo by a URL pods reach"
        )
        said.append(f"pods fetch {spec.service} from {redacted_url(fetch)}, {PODS_CANNOT}: {hint}")
    for key, value in sorted(spec.env.items()):
        if key not in spec.secret_keys and loopback(value):
            said.append(f"{key} is {redacted_url(value)}, {PODS_CANNOT}")
    return said


def loopback(url: str) -> bool:
    """Whether ``url`` (``scheme://host…``) names this machine only: ``localhost``, a
    ``*.localhost`` name, a loopback or unspecified address."""
    if "://" not in url:
        return False
    try:
        host = urlsplit(url).hostname
    except ValueError:
        return False
    if not host:
        return False
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    return address.is_loopback or address.is_unspecified
