"""What a box's environment holds: as a pod's, explicit, and never the daemon's.

A user's ``AWS_*``, ``GITHUB_TOKEN`` or anything else the daemon was started with
must not reach pushed code. So every box (a service's processes, its workers, its
build steps, an install) gets only what :func:`box_environment` builds:

- of the daemon's environment, the search path, the locale and the time zone
  (:data:`EVERY_BOX`, and ``LC_*``), and what ``up --pass-env NAME`` names;
- ``HOME`` (the box's own) and ``TMPDIR`` (its private ``/tmp``);
- what the runtime gives it: branchyard's variables (``PORT``,
  ``BRANCHYARD_NAMESPACE`` and the rest, ``<PEER>_URL``), the manifest's env, the
  settings and secrets, which win over everything above but ``HOME`` and ``TMPDIR``.

An install also gets what package tools need to reach an index from behind a
proxy or a mirror (:data:`INSTALLS`): the proxy variables and the index settings of
uv and pip, and the TLS roots they trust. Services do not get them: what a service
needs, the manifest or the settings say, or ``--pass-env``.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_PATH = "/usr/local/bin:/usr/bin:/bin"
TMPDIR = "/tmp"  # the box's private, bounded /tmp (see ``sandbox``)
EVERY_BOX = ("PATH", "LANG", "LANGUAGE", "TZ")
LOCALE_PREFIX = "LC_"
_PROXIES = ("HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "ALL_PROXY")
INSTALLS = (
    *_PROXIES,
    *(name.lower() for name in _PROXIES),
    "UV_INDEX",
    "UV_INDEX_URL",
    "UV_DEFAULT_INDEX",
    "UV_EXTRA_INDEX_URL",
    "UV_FIND_LINKS",
    "UV_NATIVE_TLS",
    "UV_OFFLINE",
    "PIP_INDEX_URL",
    "PIP_EXTRA_INDEX_URL",
    "PIP_TRUSTED_HOST",
    "SSL_CERT_FILE",
    "SSL_CERT_DIR",
)


def box_environment(
    daemon: Mapping[str, str],
    passed: Collection[str],
    own: Mapping[str, str],
    home: Path,
    install: bool = False,
) -> dict[str, str]:
    """The whole environment of one box: of the ``daemon``'s, only what every box (or,
    for an ``install``, every install) gets and the ``passed`` names; then its ``own``
    (branchyard's variables, the manifest's env, the settings); then ``HOME`` and ``TMPDIR``."""
    wanted = {*EVERY_BOX, *passed, *(INSTALLS if install else ())}
    kept = {
        name: value
        for name, value in daemon.items()
        if name in wanted or name.startswith(LOCALE_PREFIX)
    }
    return {
        "PATH": DEFAULT_PATH,
        **kept,
        **own,
        "HOME": str(home),
        "TMPDIR": TMPDIR,
    }


@dataclass(frozen=True)
class Outside:
    """The daemon's environment as the runtime found it at start (its secrets already
    taken out, see ``daemon``), and the names ``up --pass-env`` hands through."""

    variables: Mapping[str, str] = field(default_factory=dict)
    passed: frozenset[str] = frozenset()

    def box(self, own: Mapping[str, str], home: Path, install: bool = False) -> dict[str, str]:
        """One box's environment (see :func:`box_environment`)."""
        return box_environment(self.variables, self.passed, own, home, install)


NOTHING_OUTSIDE = Outside()  # no variable of the daemon's: the tests' runtimes
