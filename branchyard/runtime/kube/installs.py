"""Which entry of a Namespace's install cache (``up --install-cache``) a revision's
install reuses: the key of its environment, from the daemon's own copy of the repo.

The key is the local runtime's (``venvs.inputs``, ``venvs.environment_key``): the
dependency files and every path of the repo they reference, the repo's URL and the
namespace, read from git's objects (no checkout), and the whole tree where only it says
what goes in (no reuse, always right). One part differs: the daemon's Python is no part
of it, since a pod installs with its image's (``render.install_key`` adds the image), so
a daemon on another Python renders the same pods and rolls none.

It is computed once per (repo, commit, namespace) and remembered, and it is a function
of git's objects alone: every apply of a revision (its start, a restart, a scale to 0
and back, the next daemon's) renders the same pod template, which rolls no pod. A commit
whose tree the local runtime would refuse to check out (``trees``) gets no key, and its
pods install as without the cache.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable

from branchyard.errors import BuildFailed
from branchyard.git import Source
from branchyard.runtime import RevisionSpec
from branchyard.runtime.venvs import environment_key, inputs

log = logging.getLogger(__name__)

INTERPRETER = b"kubernetes"
"""What stands for the interpreter in a pod's key: the image's, which render adds."""
REMEMBERED = 4096
"""Keys kept, the oldest forgotten first (each costs a read of git's objects again)."""


class InstallKeys:
    """The environment keys of revisions, read from ``sources`` (the daemon's copies of
    the repos, by URL) and remembered."""

    def __init__(self, sources: Callable[[str], Source]) -> None:
        self._sources = sources
        self._known: dict[tuple[str, str, str], str | None] = {}

    async def key(self, spec: RevisionSpec) -> str | None:
        """The key of ``spec``'s environment; None for a tree no key is made of.
        BuildFailed if the commit is not in the repo."""
        known = (spec.repo_url, spec.sha, spec.namespace)
        if known in self._known:
            return self._known[known]
        source = self._sources(spec.repo_url)
        await source.ensure(spec.sha)
        try:
            tree = await source.tree(spec.sha, sys.maxsize)  # the pod checks out any size
        except BuildFailed as exc:
            log.info("%s@%s installs without the cache: %s", spec.service, spec.sha[:7], exc)
            found = None
        else:
            files = await inputs(source, spec.sha, tree)
            found = environment_key(source.url, spec.namespace, files, tree, INTERPRETER)
        if len(self._known) >= REMEMBERED:
            del self._known[next(iter(self._known))]
        self._known[known] = found
        return found
