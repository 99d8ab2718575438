"""The environment keys of an install cache (branchyard.runtime.kube.installs), read from
real repos' git objects: what changes a key and what does not, that a key is remembered,
and that a tree the local runtime would refuse gets none."""

from __future__ import annotations

import asyncio
import os
import shutil
from collections.abc import Callable
from pathlib import Path

from branchyard.git import Sources
from branchyard.manifest import Manifest
from branchyard.runtime import RevisionSpec
from branchyard.runtime.kube.installs import InstallKeys
from tests.conftest import ServiceRepo, git, stdlib_service


def revision(repo: ServiceRepo, sha: str, namespace: str = "main") -> RevisionSpec:
    return RevisionSpec(namespace, "app", 1, str(repo.origin), sha, Manifest(web="x"), {})


def keys(tmp_path: Path, *revisions: RevisionSpec) -> list[str | None]:
    async def main() -> list[str | None]:
        sources = Sources(tmp_path / "mirrors")
        try:
            found = InstallKeys(sources)
            return [await found.key(one) for one in revisions]
        finally:
            await sources.close()

    return asyncio.run(main())


def test_a_key_changes_with_the_dependencies_and_the_namespace_and_not_with_code(
    tmp_path: Path, make_repo: Callable[..., ServiceRepo]
) -> None:
    app = make_repo("app", stdlib_service(**{"requirements.txt": "flask\n"}))
    first = git("rev-parse", "HEAD", cwd=app.clone)
    code = app.commit({"app.py": "print('changed')\n"})
    needs = app.commit({"requirements.txt": "flask\nrequests\n"})
    app.push()
    found = keys(
        tmp_path,
        revision(app, first),
        revision(app, code),
        revision(app, needs),
        revision(app, first, "bugfix"),
    )
    assert found[0] is not None and len(set(found)) == 3
    assert found[0] == found[1]


def test_a_key_is_read_once_per_repo_commit_and_namespace(
    tmp_path: Path, make_repo: Callable[..., ServiceRepo]
) -> None:
    app = make_repo("app", stdlib_service(**{"requirements.txt": "flask\n"}))
    sha = git("rev-parse", "HEAD", cwd=app.clone)

    async def main() -> tuple[str | None, str | None]:
        sources = Sources(tmp_path / "mirrors")
        try:
            found = InstallKeys(sources)
            first = await found.key(revision(app, sha))
            shutil.rmtree(app.origin)  # nothing left to read
            return first, await found.key(revision(app, sha))
        finally:
            await sources.close()

    first, again = asyncio.run(main())
    assert first is not None and again == first


def test_a_tree_the_local_runtime_refuses_gets_no_key(
    tmp_path: Path, make_repo: Callable[..., ServiceRepo]
) -> None:
    app = make_repo("app", stdlib_service(**{"requirements.txt": "flask\n"}))
    os.symlink("/etc/passwd", app.clone / "passwd")
    sha = app.commit({}, "a link out of the checkout")
    app.push()
    assert keys(tmp_path, revision(app, sha)) == [None]
