"""Settings (overlays): what a person set for a service in a namespace.

Each service's settings in a namespace live in ``NAMESPACE/SERVICE.yaml`` of a
git repository under the home, so every ``edit`` and ``env set`` is a commit
with an author, a time and a diff, and can be undone with git. The document
format is the one ``branchyard edit`` shows::

    env:
      GREETING: hi

The parsing and validation here are pure; :class:`SettingsRepo` is the side
effect, a thin layer over :func:`branchyard.git.git`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from branchyard.errors import InvalidSettings
from branchyard.git import GitError, git
from branchyard.model import Overlay
from branchyard.naming import is_env_name

Slot = tuple[str, str]
RESERVED = ("PORT",)
RESERVED_PREFIX = "BRANCHYARD_"


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


@dataclass(frozen=True)
class Change:
    commit: str
    author: str
    date: str
    message: str
    diff: str


class SettingsRepo:
    def __init__(self, path: Path) -> None:
        self.path = path

    async def open(self) -> dict[Slot, Overlay]:
        """Create the repository if needed and read every service's settings."""
        if not (self.path / ".git").exists():
            self.path.mkdir(parents=True, exist_ok=True)
            await git("init", "--quiet", "-b", "main", str(self.path))
        # A daemon killed mid-commit leaves git's lock behind; only one daemon uses this home.
        (self.path / ".git" / "index.lock").unlink(missing_ok=True)
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
        relative = self._relative(slot)
        file = self.path / relative
        file.parent.mkdir(parents=True, exist_ok=True)
        file.write_text(render_file(env, secrets or {}))
        await self._git("add", relative)
        name, _, email = author.partition(" <")
        await self._git(
            "-c",
            f"user.name={name or 'branchyard'}",
            "-c",
            f"user.email={email.rstrip('>') or 'branchyard@localhost'}",
            "commit",
            "--quiet",
            "--allow-empty",
            "-m",
            message,
            "--",
            relative,
        )
        version = (await self._git("log", "-1", "--format=%h", "--", relative)).decode().strip()
        return Overlay(version, dict(env), dict(secrets or {}))

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
