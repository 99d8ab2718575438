"""What a service's dependency files reference inside its repo: the paths an install reads.

An environment is keyed by everything that goes into it (see ``venvs``), and a
``requirements.txt`` line such as ``./libs/vlib`` brings in a whole directory
whose content the file's bytes do not show. These pure functions list such
references, as pip and uv read them: ``-r``/``-c`` files (whose own references
count too), ``-e`` and plain paths, ``file:`` URLs (``name @ file:./x``),
``--find-links`` directories, and in ``pyproject.toml`` the project's
dependencies and ``[tool.uv.sources]`` paths. A bare word (``vlib``) may be a
directory of the repo as well as a package name: it is listed as *maybe*, and
counts only if the tree has it. A ``pyproject.toml`` whose dependencies are
``dynamic`` (or that cannot be read) says nothing certain: None.
"""

from __future__ import annotations

import posixpath
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

_ARCHIVES = (".whl", ".tar.gz", ".zip", ".tar.bz2", ".tgz")
# The options that name a file or a directory: whether it is a file of requirements.
_OPTIONS = {
    **dict.fromkeys(("-r", "--requirement", "-c", "--constraint"), True),
    **dict.fromkeys(("-e", "--editable", "-f", "--find-links"), False),
}


@dataclass(frozen=True)
class Reference:
    path: str  # as written (a ``file:`` URL's path)
    nested: bool = False  # a file of requirements: its own references count too
    certain: bool = True  # written as a path: it must be found inside the tree


def _local(target: str) -> str | None:
    """The path a requirement target names on this machine, or None for a URL or a name."""
    if target.startswith("file:"):
        rest = target.removeprefix("file:")
        return "/" + rest.removeprefix("//").split("/", 1)[1] if rest.startswith("//") else rest
    if "://" in target or target.startswith("git+"):
        return None
    return target


def _logical_lines(text: str) -> Iterator[str]:
    """Lines without comments, continuations joined (``\\`` at the end)."""
    pending = ""
    for raw in text.splitlines():
        line = raw if raw.startswith("#") else raw.split(" #", 1)[0]
        line = "" if line.lstrip().startswith("#") else line
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        yield (pending + line).strip()
        pending = ""
    if pending.strip():
        yield pending.strip()


def requirement_references(text: str) -> list[Reference]:
    """The local paths a requirements file names (see the module's docstring)."""
    found: list[Reference] = []
    for line in _logical_lines(text):
        words = line.split()
        if not words:
            continue
        if not words[0].startswith("-"):
            found.extend(_requirement(line))
            continue
        name, equals, value = words[0].partition("=")
        if not equals:
            if name[:2] in _OPTIONS and len(name) > 2 and not name.startswith("--"):
                name, value = name[:2], name[2:]  # -rother.txt
            else:
                value = words[1] if len(words) > 1 else ""
        path = _local(_without_extras(value)) if name in _OPTIONS else None
        if path:
            found.append(Reference(path, nested=_OPTIONS[name]))
    return found


def _without_extras(target: str) -> str:
    """``./pkg[dev]`` as ``./pkg``."""
    return target.split("[", 1)[0] if target.endswith("]") else target


def _requirement(line: str) -> list[Reference]:
    """The reference of one requirement line (``name @ URL``, a path, or a bare word)."""
    if " @ " in line or line.split()[0].endswith("@"):
        target = line.split("@", 1)[1].split(";", 1)[0].strip()
        path = _local(target)
        return [Reference(path)] if path and target.startswith("file:") else []
    word = _without_extras(line.split(";", 1)[0].split()[0])
    path = _local(word)
    if path is None:
        return []
    if word.startswith((".", "/", "file:")) or "/" in word or word.endswith(_ARCHIVES):
        return [Reference(path)]
    bare = word.replace("-", "").replace("_", "").replace(".", "").isalnum()
    return [Reference(word, certain=False)] if bare else []


def pyproject_references(text: str) -> list[Reference] | None:
    """The local paths ``pyproject.toml``'s dependencies name, or None if its dependencies
    are ``dynamic`` (made by its build backend: nothing here says what they are) or it
    cannot be read."""
    try:
        data: dict[str, Any] = tomllib.loads(text)
    except tomllib.TOMLDecodeError:
        return None
    project = data.get("project", {})
    if not isinstance(project, dict) or "dependencies" in project.get("dynamic", []):
        return None
    found: list[Reference] = []
    for dependency in project.get("dependencies", []):
        if isinstance(dependency, str) and dependency.strip():
            found.extend(r for r in _requirement(dependency.strip()) if r.certain)
    sources = data.get("tool", {}).get("uv", {}).get("sources", {})
    for source in sources.values() if isinstance(sources, dict) else []:
        for entry in source if isinstance(source, list) else [source]:
            if isinstance(entry, dict) and isinstance(entry.get("path"), str):
                found.append(Reference(entry["path"]))
    return found


def resolve(base: str, path: str) -> str | None:
    """``path`` (relative to the directory ``base`` of the tree) as a path of the tree,
    "" for its root; None if it is absolute or leads out of it."""
    if path.startswith("/"):
        return None
    joined = posixpath.normpath(posixpath.join(base, path))
    if joined == ".":
        return ""
    return None if joined == ".." or joined.startswith("../") else joined
