"""The git seam: every call to the ``git`` program goes through here.

A repository is reached by its URL. A local one (a path or ``file://``) is read
in place; a remote one is mirrored under the home and fetched only when
``git ls-remote`` says its heads moved. Both answer the same questions: which
branch heads exist, what a file holds at a commit, and the tree of a commit.
"""

from __future__ import annotations

import asyncio
import io
import os
import shutil
import tarfile
from dataclasses import dataclass
from pathlib import Path

from branchyard.errors import BuildFailed, UsageError
from branchyard.naming import short_hash

_GIT_ENV = {
    "GIT_TERMINAL_PROMPT": "0",
    "GIT_SSH_COMMAND": "ssh -o BatchMode=yes",
    "LC_ALL": "C",
}


class GitError(UsageError):
    code = "git_error"


async def git(*args: str, cwd: Path | None = None) -> bytes:
    """Run git with ``args`` (never through a shell); its first stderr line on failure."""
    process = await asyncio.create_subprocess_exec(
        "git",
        *args,
        cwd=cwd,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, **_GIT_ENV},
    )
    out, err = await process.communicate()
    if process.returncode != 0:
        lines = [line for line in err.decode(errors="replace").splitlines() if line.strip()]
        raise GitError(lines[0] if lines else f"git {args[0]} failed")
    return out


def local_path(url: str) -> Path | None:
    """The directory of a repo on this machine, or None for a remote URL."""
    if url.startswith("file://"):
        return Path(url.removeprefix("file://"))
    if "://" in url or (":" in url and not url.startswith("/")):
        return None
    return Path(url)


@dataclass(frozen=True)
class Heads:
    default_branch: str | None
    branches: dict[str, str]


def parse_ls_remote(text: str) -> Heads:
    """Parse ``git ls-remote --symref URL HEAD refs/heads/*`` output."""
    default = None
    branches: dict[str, str] = {}
    for line in text.splitlines():
        left, _, ref = line.partition("\t")
        if left.startswith("ref: ") and ref == "HEAD":
            default = left.removeprefix("ref: refs/heads/")
        elif ref.startswith("refs/heads/"):
            branches[ref.removeprefix("refs/heads/")] = left
    return Heads(default, branches)


async def ls_remote(url: str) -> Heads:
    return parse_ls_remote(
        (await git("ls-remote", "--symref", "--", url, "HEAD", "refs/heads/*")).decode()
    )


class Source:
    """A readable copy of one repo: in place for local repos, a mirror for remote ones."""

    def __init__(self, url: str, mirrors: Path) -> None:
        self.url = url
        path = local_path(url)
        self.local = path is not None
        self.git_dir = path if path is not None else mirrors / f"{short_hash(url)}.git"
        self._lock = asyncio.Lock()

    async def sync(self) -> None:
        """Make the source hold every current head (a fetch for remote repos)."""
        if self.local:
            return
        async with self._lock:
            if not self.git_dir.exists():
                await git("init", "--bare", "--quiet", str(self.git_dir))
            await self._git(
                "fetch",
                "--prune",
                "--no-tags",
                "--quiet",
                "--no-write-fetch-head",
                "--no-show-forced-updates",  # a check of the old heads' history, for a message
                "--no-auto-maintenance",  # no repack that could start in the middle of a deploy
                "--",
                self.url,
                "+refs/heads/*:refs/heads/*",
            )

    async def _git(self, *args: str) -> bytes:
        return await git("--git-dir", str(self.git_dir), *args)

    async def has(self, sha: str) -> bool:
        try:
            await self._git("cat-file", "-e", f"{sha}^{{commit}}")
        except GitError:
            return False
        return True

    async def ensure(self, sha: str) -> None:
        if not await self.has(sha):
            await self.sync()
            if not await self.has(sha):
                raise BuildFailed(f"commit {sha[:7]} is not in {self.url}")

    async def read_file(self, sha: str, path: str) -> str | None:
        try:
            data = await self._git("cat-file", "blob", f"{sha}:{path}")
        except GitError:
            return None
        return data.decode(errors="replace")

    async def subject(self, sha: str) -> str:
        """The first line of the commit message."""
        return (await self._git("log", "-1", "--format=%s", sha)).decode().strip()

    async def checkout(self, sha: str, dest: Path) -> None:
        """Write the tree of ``sha`` into ``dest`` (which must not exist yet)."""
        data = await self._git("archive", "--format=tar", sha)
        dest.mkdir(parents=True)
        with tarfile.open(fileobj=io.BytesIO(data)) as archive:
            archive.extractall(dest, filter="data")


class Sources:
    """One :class:`Source` per URL, created on first use."""

    def __init__(self, mirrors: Path) -> None:
        self._mirrors = mirrors
        self._sources: dict[str, Source] = {}

    def drop(self, url: str) -> None:
        """Forget a repo; a remote repo's mirror is deleted."""
        source = self._sources.pop(url, None)
        if source is not None and not source.local:
            shutil.rmtree(source.git_dir, ignore_errors=True)

    def __call__(self, url: str) -> Source:
        if url not in self._sources:
            self._sources[url] = Source(url, self._mirrors)
        return self._sources[url]
