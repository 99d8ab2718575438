"""Settings (overlays): what a person set for a service in a namespace.

Each service's settings in a namespace live in ``NAMESPACE/SERVICE.yaml`` of a
git repository under the home, so every ``edit`` and ``env set`` is a commit
with an author, a time and a diff, and can be undone with git. The document
format is the one ``branchyard edit`` shows::

    env:
      GREETING: hi

The parsing and validation here are pure; :class:`SettingsRepo` is the side
effect, a thin layer over :func:`branchyard.git.git`.

What is current is exactly the HEAD of that repository. Changes are written one
at a time under :attr:`SettingsRepo.lock`, each as one commit; a write that
fails puts its file back as HEAD has it. What a killed daemon left uncommitted
is set aside by :meth:`SettingsRepo.open` (copied to ``HOME/settings-aside/``),
never applied and never folded into a later commit. Each change names the
version it started from, where it replaces the whole env (:func:`check_version`),
or says only what it sets and unsets.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import yaml

from branchyard.errors import GitError, InvalidSettings, StaleVersion
from branchyard.git import git
from branchyard.model import Overlay
from branchyard.naming import is_env_name

Slot = tuple[str, str]
RESERVED = ("PORT", "HOST")
RESERVED_PREFIX = "BRANCHYARD_"
SHORT_VERSION = 7  # git's shortest abbreviation; versions are compared on what both show
NAMES_IN_MESSAGE = 5  # a commit message names this many variables, then counts the rest


def _check_name(name: Any) -> str:
    if not isinstance(name, str) or not is_env_name(name):
        raise InvalidSettings(f"{name!r} is not a valid variable name (letters, digits, _)")
    if name in RESERVED or name.startswith(RESERVED_PREFIX):
        raise InvalidSettings(f"{name} is set by branchyard and cannot be changed")
    return name


def _check_value(name: str, value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        shown = "empty" if value is None else type(value).__name__
        raise InvalidSettings(f"value of {name} is {shown}; write a string (quote it)")
    text = str(value)
    if "\0" in text:
        raise InvalidSettings(f"value of {name} contains a NUL character")
    try:
        text.encode()
    except UnicodeEncodeError:
        raise InvalidSettings(f"value of {name} is not valid UTF-8 (a lone surrogate)") from None
    return text


def validate_env(env: Mapping[Any, Any]) -> dict[str, str]:
    return {_check_name(k): _check_value(k, v) for k, v in env.items()}


def parse_document(text: str) -> dict[str, str]:
    """The env of an edited document, or :class:`InvalidSettings` saying what is wrong."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise InvalidSettings("not valid YAML: " + " ".join(str(exc).split())) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise InvalidSettings("the document must be a mapping with the key `env`")
    unknown = set(data) - {"env"}
    if unknown:
        raise InvalidSettings(f"unknown keys: {', '.join(sorted(map(str, unknown)))} (only env)")
    env = data.get("env")
    if env is None:
        env = {}
    if not isinstance(env, dict):
        raise InvalidSettings("env must map variable names to values")
    return validate_env(env)


def is_blank_document(text: str) -> bool:
    """True for a document with nothing but blank lines and comments: a cancelled edit."""
    return all(not line.strip() or line.lstrip().startswith("#") for line in text.splitlines())


def check_version(given: str, current: str, what: str) -> None:
    """Refuse a change that started from another version than the current one.

    Versions are abbreviated commit ids, and git may abbreviate the same commit
    longer as the repository grows, so one is compared with the start of the other.
    """
    if given == current or (
        min(len(given), len(current)) >= SHORT_VERSION
        and (given.startswith(current) or current.startswith(given))
    ):
        return
    raise StaleVersion(
        f"the settings of {what} changed since version {given or '(none)'} "
        f"(now {current or '(none)'}); start again from the latest"
    )


def _names(names: list[str]) -> str:
    shown = " ".join(names[:NAMES_IN_MESSAGE])
    rest = len(names) - NAMES_IN_MESSAGE
    return f"{shown} and {rest} more" if rest > 0 else shown


def describe_change(old: Mapping[str, str], new: Mapping[str, str]) -> str:
    """What a commit from ``old`` to ``new`` does, in a few words ("" for nothing)."""
    changed = sorted(k for k, v in new.items() if old.get(k) != v)
    removed = sorted(k for k in old if k not in new)
    parts = [f"set {_names(changed)}"] if changed else []
    if removed:
        parts.append(f"unset {_names(removed)}")
    return "; ".join(parts)


def render_document(env: Mapping[str, str]) -> str:
    return yaml.safe_dump({"env": dict(env)}, default_flow_style=False, sort_keys=True)


def render_file(env: Mapping[str, str], secrets: Mapping[str, str]) -> str:
    """The stored form: the env, and for each secret only when it last changed."""
    data: dict[str, object] = {"env": dict(env)}
    if secrets:
        data["secrets"] = dict(secrets)
    return yaml.safe_dump(data, default_flow_style=False, sort_keys=True)


def parse_file(text: str) -> tuple[dict[str, str], dict[str, str]]:
    """(env, secret marks) of a stored settings file."""
    data = yaml.safe_load(text) or {}
    if not isinstance(data, dict):
        raise InvalidSettings("a settings file must be a mapping")
    secrets = data.pop("secrets", None) or {}
    return parse_document(yaml.safe_dump(data)), {str(k): str(v) for k, v in secrets.items()}


def _status_paths(porcelain: str) -> list[str]:
    """The paths of ``git status --porcelain -z`` (a rename's old path follows its new one)."""
    paths = []
    entries = iter(porcelain.split("\0"))
    for entry in entries:
        if len(entry) > 3:
            paths.append(entry[3:])
            if "R" in entry[:2] or "C" in entry[:2]:
                paths.append(next(entries, ""))
    return [p for p in paths if p]


@dataclass(frozen=True)
class Change:
    commit: str
    author: str
    date: str
    message: str
    diff: str


class Settings(Protocol):
    """What the engine and the pages use of the settings (:class:`SettingsRepo`; an
    in-memory stand-in in tests of the engine)."""

    @property
    def lock(self) -> asyncio.Lock:
        """Held from reading the current settings to their commit."""
        ...

    @property
    def set_aside(self) -> str:
        """What :meth:`open` found uncommitted and set aside, said in one line."""
        ...

    async def open(self) -> dict[Slot, Overlay]: ...

    async def write(
        self,
        slot: Slot,
        env: Mapping[str, str],
        author: str,
        message: str,
        secrets: Mapping[str, str] | None = None,
    ) -> Overlay: ...

    async def history(self, slot: Slot) -> list[Change]: ...


class SettingsRepo:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.aside = path.parent / "settings-aside"
        self.lock = asyncio.Lock()  # held from reading the current settings to their commit
        self.set_aside = ""  # what open() found uncommitted and set aside, said in one line

    async def open(self) -> dict[Slot, Overlay]:
        """Create the repository if needed, set aside what was never committed, read HEAD."""
        if not (self.path / ".git").exists():
            self.path.mkdir(parents=True, exist_ok=True)
            await git("init", "--quiet", "-b", "main", str(self.path))
        # A daemon killed mid-commit leaves git's locks behind; only one daemon uses this home.
        dot_git = self.path / ".git"
        for lock in [*dot_git.glob("*.lock"), *(dot_git / "refs").rglob("*.lock")]:
            lock.unlink(missing_ok=True)
        self.set_aside = await self._set_aside_leftovers()
        versions: dict[str, str] = {}
        log = b""
        if await self._has_commits():
            log = await self._git("log", "--format=@%h", "--name-only")
        commit = ""
        for line in log.decode().splitlines():
            if line.startswith("@"):
                commit = line[1:]
            elif line and line not in versions:
                versions[line] = commit
        overlays: dict[Slot, Overlay] = {}
        for relative, version in versions.items():
            file = self.path / relative
            if file.is_file() and relative.endswith(".yaml") and relative.count("/") == 1:
                namespace, name = relative.removesuffix(".yaml").split("/")
                env, secrets = parse_file(file.read_text())
                overlays[(namespace, name)] = Overlay(version, env, secrets)
        return overlays

    async def _set_aside_leftovers(self) -> str:
        """Move whatever differs from HEAD out of the repository; say what, or ""."""
        status = await self._git("status", "--porcelain", "-z", "--untracked-files=all")
        paths = _status_paths(status.decode())
        if not paths:
            return ""
        self.aside.mkdir(exist_ok=True)
        stamp = time.strftime("%Y%m%dT%H%M%SZ-", time.gmtime())
        folder = Path(tempfile.mkdtemp(prefix=stamp, dir=self.aside))
        for relative in paths:
            if (self.path / relative).is_file():
                (folder / relative).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(self.path / relative, folder / relative)
        if await self._has_commits():
            await self._git("reset", "--hard", "--quiet", "HEAD")
        else:
            (self.path / ".git" / "index").unlink(missing_ok=True)
        await self._git("clean", "-d", "--force", "--quiet")
        return (
            f"set aside uncommitted settings in {folder}: {', '.join(sorted(paths))} "
            "(a daemon stopped before committing them; they were never applied)"
        )

    async def _has_commits(self) -> bool:
        try:
            await self._git("rev-parse", "--verify", "--quiet", "HEAD")
        except GitError:
            return False
        return True

    async def _git(self, *args: str) -> bytes:
        return await git("-C", str(self.path), *args)

    def _relative(self, slot: Slot) -> str:
        return f"{slot[0]}/{slot[1]}.yaml"

    async def write(
        self,
        slot: Slot,
        env: Mapping[str, str],
        author: str,
        message: str,
        secrets: Mapping[str, str] | None = None,
    ) -> Overlay:
        """Commit a slot's settings as one commit; hold :attr:`lock` while calling this.

        If it fails, the file is put back as HEAD has it: nothing of the change
        stays behind to be read or committed later.
        """
        relative = self._relative(slot)
        file = self.path / relative
        name, _, email = author.partition(" <")
        try:
            file.parent.mkdir(parents=True, exist_ok=True)
            file.write_text(render_file(env, secrets or {}))
            await self._git("add", relative)
            await self._git(
                "-c",
                f"user.name={name or 'branchyard'}",
                "-c",
                f"user.email={email.rstrip('>') or 'branchyard@localhost'}",
                "commit",
                "--quiet",
                "-m",
                message,
                "--",
                relative,
            )
        except (GitError, OSError):
            await self._discard(relative)
            raise
        version = (await self._git("rev-parse", "--short", "HEAD")).decode().strip()
        return Overlay(version, dict(env), dict(secrets or {}))

    async def _discard(self, relative: str) -> None:
        """Put one file back, in the index and the work tree, as HEAD has it."""
        with contextlib.suppress(GitError, OSError):
            await self._git("reset", "--quiet", "--", relative)
            try:
                await self._git("checkout", "--quiet", "--", relative)
            except GitError:  # HEAD has no such file
                (self.path / relative).unlink(missing_ok=True)

    async def history(self, slot: Slot) -> list[Change]:
        if not await self._has_commits():
            return []
        relative = self._relative(slot)
        sep = "\x1e"
        out = await self._git(
            "log", f"--format={sep}%h%x1f%an <%ae>%x1f%aI%x1f%s", "-p", "--", relative
        )
        changes = []
        for chunk in out.decode().split(sep)[1:]:
            header, _, diff = chunk.partition("\n")
            commit, author, date, message = header.split("\x1f", 3)
            changes.append(Change(commit, author, date, message, diff.strip("\n")))
        return changes
