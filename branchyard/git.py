"""The git seam: every call to the ``git`` program goes through here.

A repository is reached by its URL. A local one (a path or ``file://``) is read
in place; a remote one is mirrored under the home and fetched only when
``git ls-remote`` says its heads moved. Both answer the same questions: which
branch heads exist, what a file holds at a commit, and the tree of a commit.
Objects are read through one long-running ``git cat-file --batch`` per repo,
not a process per question: a deploy asks half a dozen of them.

A failed git command raises :class:`~branchyard.errors.RemoteUnreachable`
(temporary) when what git wrote says the network or the server failed, and
:class:`~branchyard.errors.GitError` (permanent) otherwise
(:func:`failure_of`).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol
from urllib.parse import unquote

from branchyard.errors import BuildFailed, GitError, RemoteUnreachable, UsageError
from branchyard.naming import short_hash
from branchyard.trees import (
    LINK,
    MAX_CHECKOUT,
    Tree,
    link_refusal,
    parse_ls_tree,
    path_refusal,
    size_refusal,
)

_GIT_ENV = {
    "GIT_TERMINAL_PROMPT": "0",
    "GIT_SSH_COMMAND": "ssh -o BatchMode=yes",
    "LC_ALL": "C",
}

# What git (curl, ssh, git://) writes when the network or the server failed, not the
# request: no name resolution, no connection, a connection cut, a server's 5xx or 429.
# A repository that is not there, refused credentials or a 404 are permanent.
_TEMPORARY = re.compile(
    r"could not resolve host|temporary failure in name resolution|unable to look up"
    r"|failed to connect|couldn't connect|connection refused|connection reset"
    r"|timed out|network is unreachable|no route to host"
    r"|remote end hung up unexpectedly|early eof|returned error: (?:5\d\d|429)",
    re.IGNORECASE,
)


# The credential helper for a URL that carries credentials: fixed text, never built from
# the URL; it answers git's "get" with what the environment it is given holds.
_CREDENTIAL_HELPER = (
    "!f() { test \"$1\" = get && printf 'username=%s\\npassword=%s\\n' "
    '"$BRANCHYARD_GIT_USERNAME" "$BRANCHYARD_GIT_PASSWORD"; }; f'
)


@dataclass(frozen=True)
class Login:
    """What an http(s) URL's userinfo held (``user:TOKEN@``, or ``TOKEN@``: a token
    given as the user, the password empty), percent-decoded, as git's basic auth sends it."""

    username: str
    password: str


def split_login(url: str) -> tuple[str, Login | None]:
    """``url`` without an http(s) URL's userinfo, and what that held (None without one;
    any other URL as it is: an ssh URL's ``git@`` is no secret)."""
    scheme, sep, rest = url.partition("://")
    authority, slash, path = rest.partition("/")
    userinfo, at, host = authority.rpartition("@")
    if not (sep and at and scheme.lower() in ("http", "https")):
        return url, None
    user, _, password = userinfo.partition(":")
    return f"{scheme}://{host}{slash}{path}", Login(unquote(user), unquote(password))


@dataclass(frozen=True)
class Remote:
    """A URL as git is given it: without credentials in it, which would show in the argv
    of git and its helpers (``ps``), and the environment that hands them over instead."""

    url: str
    env: dict[str, str]


def remote(url: str) -> Remote:
    """``url`` for git: an http(s) URL's userinfo (``user:TOKEN@``) taken out and given
    to git by a credential helper through the environment; any other URL as it is."""
    bare, login = split_login(url)
    if login is None:
        return Remote(url, {})
    return Remote(
        bare,
        {
            "GIT_CONFIG_COUNT": "2",
            "GIT_CONFIG_KEY_0": "credential.helper",
            "GIT_CONFIG_VALUE_0": "",  # no other helper: they would be asked, or store it
            "GIT_CONFIG_KEY_1": "credential.helper",
            "GIT_CONFIG_VALUE_1": _CREDENTIAL_HELPER,
            "BRANCHYARD_GIT_USERNAME": login.username,
            "BRANCHYARD_GIT_PASSWORD": login.password,
        },
    )


def failure_of(stderr: str, command: str) -> GitError | RemoteUnreachable:
    """The error for a git ``command`` that failed with ``stderr``: its first line, as
    a temporary error if the network or the server failed, else a permanent one."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    message = lines[0] if lines else f"git {command} failed"
    return (RemoteUnreachable if _TEMPORARY.search(stderr) else GitError)(message)


async def git(
    *args: str, cwd: Path | None = None, env: dict[str, str] | None = None, out: int | None = None
) -> bytes:
    """Run git with ``args`` (never through a shell), ``env`` added to its environment (a
    :class:`Remote`'s): what it wrote, or with ``out`` (a file descriptor) nothing, its
    output going there as it comes. On failure, :func:`failure_of`.

    It is spawned and waited for from worker threads: the event loop's own spawn
    (uvloop's) forks the whole daemon and holds the loop, and with it the router, for
    about 10 ms per process; ``subprocess`` uses vfork, a fraction of a millisecond.
    Cancelling kills it and its helpers, so a fetch that hangs never holds a thread (or a stopping
    daemon) for long.
    """
    process = await asyncio.to_thread(
        subprocess.Popen,
        ["git", *args],
        cwd=cwd,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE if out is None else out,
        stderr=subprocess.PIPE,
        env={**os.environ, **_GIT_ENV, **(env or {})},
        start_new_session=True,  # its helpers (git-remote-http) in its group, killed with it
    )
    try:
        output, err = await asyncio.to_thread(process.communicate)
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        raise
    if process.returncode != 0:
        raise failure_of(err.decode(errors="replace"), args[0])
    return output or b""


def local_path(url: str) -> Path | None:
    """The directory of a repo on this machine, or None for a remote URL."""
    if url.startswith("file://"):
        return Path(url.removeprefix("file://"))
    if "://" in url or (":" in url and not url.startswith("/")):
        return None
    return Path(url)


def git_dir_of(path: Path) -> Path:
    """The git directory of a local repo: ``path/.git`` for one with a work tree."""
    dot_git = path / ".git"
    return dot_git if dot_git.is_dir() else path


FALLBACK_DEFAULTS = ("main", "master")  # tried in turn when HEAD names no branch


@dataclass(frozen=True)
class Heads:
    default_branch: str | None
    branches: dict[str, str]
    dangling_head: bool = False  # HEAD names no branch there is: the default was guessed


def parse_ls_remote(text: str) -> Heads:
    """Parse ``git ls-remote --symref URL HEAD refs/heads/*`` output.

    The default branch is the one HEAD names. A HEAD that names a branch that
    does not exist (a bare repo made with another default than was pushed),
    or no branch (detached), says nothing: then ``main``, else ``master``, is
    the default, and ``dangling_head`` is set so that a person can be told.
    """
    default = None
    branches: dict[str, str] = {}
    for line in text.splitlines():
        left, _, ref = line.partition("\t")
        if left.startswith("ref: ") and ref == "HEAD":
            default = left.removeprefix("ref: refs/heads/")
        elif ref.startswith("refs/heads/"):
            branches[ref.removeprefix("refs/heads/")] = left
    if branches and default not in branches:
        guess = next((name for name in FALLBACK_DEFAULTS if name in branches), None)
        return Heads(guess, branches, dangling_head=True)
    return Heads(default, branches)


def choose_default_branch(heads: Heads, configured: str | None) -> str:
    """The branch a repo deploys to the baseline, fixed when it is added (a local
    repo's HEAD moves with every checkout): the one HEAD names, else
    ``init.defaultBranch`` (``configured``), else ``main``, else ``master``, each
    only if the repo has it. A repo with none of them, or no branch yet, gets
    ``init.defaultBranch``, else ``main``, for when that branch arrives."""
    if heads.default_branch and not heads.dangling_head:
        return heads.default_branch
    for name in (configured, *FALLBACK_DEFAULTS):
        if name and name in heads.branches:
            return name
    return configured or FALLBACK_DEFAULTS[0]


async def configured_default_branch(path: Path | None) -> str | None:
    """git's ``init.defaultBranch``, as seen in the local repo at ``path`` (else globally)."""
    cwd = path if path is not None and path.is_dir() else None
    try:
        found = (await git("config", "--get", "init.defaultBranch", cwd=cwd)).decode().strip()
    except GitError:
        return None  # not set
    return found or None


async def check_branch_name(name: str) -> None:
    """Refuse what git would not take as a branch name, in one line."""
    try:
        if name.startswith("-"):
            raise GitError("starts with a dash")
        await git("check-ref-format", f"refs/heads/{name}")
    except GitError:
        raise UsageError(f"{name!r} is not a valid branch name") from None


async def ls_remote(url: str) -> Heads:
    given = remote(url)
    listed = await git(
        "ls-remote", "--symref", "--", given.url, "HEAD", "refs/heads/*", env=given.env
    )
    return parse_ls_remote(listed.decode())


class _Objects:
    """A ``git cat-file --batch`` kept running: object name in, its type and bytes out.

    Started on first use and again after it dies; a lock keeps one question on
    the pipe at a time, and a question cancelled half-way stops the process, or
    its answer would be read as the next question's. Objects fetched after it
    started are found too (git looks for new packs when an object is missing
    from those it knows).
    """

    def __init__(self, git_dir: Path) -> None:
        self._git_dir = git_dir
        self._process: asyncio.subprocess.Process | None = None
        self._lock = asyncio.Lock()

    async def read(self, name: str) -> tuple[str, bytes] | None:
        """The type and content of the object ``name`` (e.g. ``SHA:path``), or None if missing."""
        if "\n" in name:
            return None
        async with self._lock:
            process = await self._started()
            assert process.stdin is not None and process.stdout is not None
            try:
                process.stdin.write(name.encode() + b"\n")
                line = await process.stdout.readline()
                if not line:
                    raise ConnectionResetError("git cat-file stopped")
                if line.endswith((b" missing\n", b" ambiguous\n")):
                    return None
                header = line.split()  # OID TYPE SIZE
                data = await process.stdout.readexactly(int(header[2]) + 1)
            except (OSError, ValueError, asyncio.IncompleteReadError) as exc:
                self._discard()
                raise GitError(f"cannot read {self._git_dir}: {exc}") from None
            except asyncio.CancelledError:
                self._discard()  # its answer would be read as the next question's
                raise
            return header[1].decode(), data[:-1]

    def _discard(self) -> None:
        """Stop the process now; the next question starts a new one."""
        process, self._process = self._process, None
        if process is not None and process.returncode is None:
            process.kill()

    async def _started(self) -> asyncio.subprocess.Process:
        if self._process is None or self._process.returncode is not None:
            self._process = await asyncio.create_subprocess_exec(
                "git",
                "--git-dir",
                str(self._git_dir),
                "cat-file",
                "--batch",
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.DEVNULL,
                env={**os.environ, **_GIT_ENV},
            )
        return self._process

    async def close(self) -> None:
        process, self._process = self._process, None
        if process is None or process.returncode is not None:
            return
        assert process.stdin is not None
        process.stdin.close()
        try:
            async with asyncio.timeout(1.0):
                await process.wait()
        except TimeoutError:
            process.kill()
            await process.wait()


class Source:
    """A readable copy of one repo: in place for local repos, a mirror for remote ones."""

    def __init__(self, url: str, mirrors: Path) -> None:
        self.url = url
        path = local_path(url)
        self.local = path is not None
        self.git_dir = git_dir_of(path) if path is not None else mirrors / f"{short_hash(url)}.git"
        self._lock = asyncio.Lock()
        self._objects = _Objects(self.git_dir)

    async def sync(self) -> None:
        """Make the source hold every current head (a fetch for remote repos)."""
        if self.local:
            return
        async with self._lock:
            if not self.git_dir.exists():
                await git("init", "--bare", "--quiet", str(self.git_dir))
                await self._objects.close()  # one started before could read no mirror
            given = remote(self.url)
            await git(
                "--git-dir",
                str(self.git_dir),
                "fetch",
                "--prune",
                "--no-tags",
                "--quiet",
                "--no-write-fetch-head",
                "--no-show-forced-updates",  # a check of the old heads' history, for a message
                "--no-auto-maintenance",  # no repack that could start in the middle of a deploy
                "--",
                given.url,
                "+refs/heads/*:refs/heads/*",
                env=given.env,
            )

    async def _git(self, *args: str) -> bytes:
        return await git("--git-dir", str(self.git_dir), *args)

    async def has(self, sha: str) -> bool:
        found = await self._objects.read(f"{sha}^{{commit}}")
        return found is not None and found[0] == "commit"

    async def ensure(self, sha: str) -> None:
        """Make ``sha`` present: fetched if it is not, or if the mirror is gone (deleted
        while the daemon was stopped), which there is nothing to ask before."""
        if (not self.local and not self.git_dir.exists()) or not await self.has(sha):
            await self.sync()
            if not await self.has(sha):
                raise BuildFailed(f"commit {sha[:7]} is not in {self.url}")

    async def read_file(self, sha: str, path: str) -> str | None:
        found = await self._objects.read(f"{sha}:{path}")
        if found is None or found[0] != "blob":
            return None
        return found[1].decode(errors="replace")

    async def subject(self, sha: str) -> str:
        """The first line of the commit message."""
        found = await self._objects.read(sha)
        if found is None or found[0] != "commit":
            raise GitError(f"no commit {sha[:7]} in {self.url}")
        return commit_subject(found[1])

    async def close(self) -> None:
        await self._objects.close()

    async def tree(self, sha: str, limit: int = MAX_CHECKOUT) -> Tree:
        """The tree of ``sha``, from git's objects alone, once it passed the checks of
        :mod:`branchyard.trees`; BuildFailed saying the first that fails. Nothing is written."""
        listed = await self._git("ls-tree", "-r", "-t", "-z", "--long", "--full-tree", sha)
        entries = parse_ls_tree(listed)
        why = path_refusal(entries) or size_refusal(entries, limit)
        if why is None:
            links = {e.path: await self._link(e.oid) for e in entries if e.mode == LINK}
            why = link_refusal(links)
        if why is not None:
            raise BuildFailed(why)
        commit = await self._objects.read(f"{sha}^{{commit}}")
        if commit is None:
            raise GitError(f"no commit {sha[:7]} in {self.url}")
        root = commit[1].split(b"\n", 1)[0].removeprefix(b"tree ").decode()
        return Tree(root, {entry.path: entry for entry in entries})

    async def _link(self, oid: str) -> str:
        found = await self._objects.read(oid)
        return found[1].decode(errors="surrogateescape") if found is not None else ""

    async def archive(self, sha: str, out: int) -> None:
        """Write the tar of ``sha``'s tree to the file descriptor ``out`` as git makes it,
        never held here whole (see ``runtime.unpack``, which reads it)."""
        await git("--git-dir", str(self.git_dir), "archive", "--format=tar", sha, out=out)


def commit_subject(commit: bytes) -> str:
    """The subject of a raw commit object: its message's first paragraph, on one line."""
    _, _, message = commit.partition(b"\n\n")
    paragraph = message.decode(errors="replace").strip().split("\n\n", 1)[0]
    return " ".join(line.strip() for line in paragraph.splitlines())


class Commits(Protocol):
    """What the engine and the rollouts read of one repo: a commit made present, a file
    at a commit, a commit's subject (a :class:`Source`; an in-memory one in tests)."""

    async def ensure(self, sha: str) -> None: ...

    async def read_file(self, sha: str, path: str) -> str | None: ...

    async def subject(self, sha: str) -> str: ...


class Repos(Protocol):
    """The repos the engine reads, by URL (:class:`Sources`; an in-memory one in tests)."""

    def __call__(self, url: str) -> Commits: ...

    async def drop(self, url: str) -> None: ...


class Sources:
    """One :class:`Source` per URL, created on first use."""

    def __init__(self, mirrors: Path) -> None:
        self._mirrors = mirrors
        self._sources: dict[str, Source] = {}

    async def drop(self, url: str) -> None:
        """Forget a repo; a remote repo's mirror is deleted."""
        source = self._sources.pop(url, None)
        if source is not None:
            await source.close()
            if not source.local:
                shutil.rmtree(source.git_dir, ignore_errors=True)

    async def close(self) -> None:
        for source in self._sources.values():
            await source.close()

    def __call__(self, url: str) -> Source:
        if url not in self._sources:
            self._sources[url] = Source(url, self._mirrors)
        return self._sources[url]
