"""Naming rules: branch names to namespaces, service names to DNS labels and env vars.

Pure functions, no I/O. A namespace is a DNS-1123 label (lowercase, ``[a-z0-9-]``,
at most 63 characters, starting and ending with an alphanumeric). Branch names
are free text, so the mapping is lossy; a name that had to be cut, or that would
take a namespace another branch already holds, gets a short hash suffix.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Container

BASELINE = "main"
MAX_LABEL = 63
_HASH_LEN = 6
_NOT_DNS = re.compile(r"[^a-z0-9-]+")
_DASHES = re.compile(r"-{2,}")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def dns_label(name: str) -> str:
    """Lowercase ``name`` and replace everything outside ``[a-z0-9-]`` by ``-``.

    Accents are folded first (``ü`` gives ``u``). The result may be empty or
    longer than 63 characters; :func:`namespace_for_branch` deals with that.
    """
    folded = unicodedata.normalize("NFKD", name).encode("ascii", "ignore").decode()
    label = _NOT_DNS.sub("-", folded.lower())
    return _DASHES.sub("-", label).strip("-")


def short_hash(text: str) -> str:
    import hashlib  # here, not at the top: it loads OpenSSL, and the CLI only needs BASELINE

    return hashlib.sha256(text.encode()).hexdigest()[:_HASH_LEN]


def _with_suffix(label: str, branch: str, taken: Container[str]) -> str:
    """``label`` cut to fit a hash of ``branch``; rehashed in the rare case that is taken."""
    head = label[: MAX_LABEL - _HASH_LEN - 1].rstrip("-") or "b"
    salt = 0
    while (candidate := f"{head}-{short_hash(f'{branch}#{salt}' if salt else branch)}") in taken:
        salt += 1
    return candidate


def namespace_for_branch(branch: str, taken: Container[str] = ()) -> str:
    """The namespace for a non-default branch.

    ``taken`` holds namespaces already assigned to *other* branches (and the
    baseline); a clash gets the hashed form, which is unique per branch name.
    """
    label = dns_label(branch)
    if not label or len(label) > MAX_LABEL or label in taken or label == BASELINE:
        return _with_suffix(label, branch, taken)
    return label


def env_var_for(service: str) -> str:
    """``other_app`` gives ``OTHER_APP_URL``: upper-cased, other characters as ``_``.

    A name that starts with a digit gets a leading ``_`` (``2fa`` gives ``_2FA_URL``),
    since a variable name cannot start with one.
    """
    name = re.sub(r"[^A-Z0-9]", "_", service.upper()) + "_URL"
    return f"_{name}" if name[0].isdigit() else name


def service_name_from_url(url: str) -> str:
    """The repo's name without ``.git``: ``git@host:team/other_app.git`` gives ``other_app``."""
    tail = url.rstrip("/").replace(":", "/").rsplit("/", 1)[-1]
    return tail.removesuffix(".git")


def is_env_name(name: str) -> bool:
    return bool(_ENV_NAME.fullmatch(name))


_DOMAIN = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?(\.[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)*")


def is_domain(name: str) -> bool:
    """Whether ``name`` is a DNS name of lowercase labels (``cluster.local``)."""
    return len(name) <= 253 and _DOMAIN.fullmatch(name) is not None
