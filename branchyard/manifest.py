"""What a service repo says about itself: its Procfile and optional ``branchyard.yaml``.

Pure parsing: text goes in, a :class:`Manifest` or a one-line
:class:`~branchyard.errors.ManifestError` comes out. The Procfile follows the
Heroku convention (``name: command``); ``web`` is the process that gets a port
and a route, every other entry runs as a worker. ``branchyard.yaml`` may add::

    build:                 # commands run in the checkout, in order, after dependencies
      - python -m compileall -q .
    run: python app.py     # the web command, instead of the Procfile's
    health:                # or just `health: /healthz`
      path: /healthz
      timeout: 30          # seconds until the first passing check
    env:                   # default env; a person's settings override it
      GREETING: hello
    image: python:3.12-slim  # on Kubernetes, the image the service runs in (the local
                             # runtime ignores it)
    memory: 256Mi          # what each of its boxes (or pod's containers) may use (Ki, Mi,
                           # Gi or bytes); the daemon's default (`up --box-memory`) where not said
    cpu: 0.5               # cores each may keep busy (or millicores: 500m); the daemon's
                           # default (`up --box-cpu`) where not said
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

import yaml

from branchyard.errors import ManifestError
from branchyard.naming import is_env_name

PROCFILE = "Procfile"
CONFIG_FILE = "branchyard.yaml"
_PROCFILE_LINE = re.compile(r"^([A-Za-z0-9_-]+)\s*:\s*(.+)$")
_IMAGE = re.compile(r"[a-z0-9][A-Za-z0-9._/:@-]{0,254}")  # a registry/name:tag@digest
DEFAULT_HEALTH_TIMEOUT = 30.0
_SIZE = re.compile(r"([0-9]{1,15})(Ki|Mi|Gi|)")
_UNITS = {"": 1, "Ki": 1024, "Mi": 1024**2, "Gi": 1024**3}
SMALLEST_MEMORY = 16 * 1024**2  # below it, not even a Python interpreter starts
_CPU = re.compile(r"([0-9]{1,6})m|[0-9]{1,4}(\.[0-9]{1,3})?")  # millicores, or cores
SMALLEST_CPU, LARGEST_CPU = 0.01, 1024.0
T = TypeVar("T")


@dataclass(frozen=True)
class Manifest:
    web: str
    workers: tuple[tuple[str, str], ...] = ()
    build: tuple[str, ...] = ()
    health_path: str = "/"
    health_timeout: float = DEFAULT_HEALTH_TIMEOUT
    env: Mapping[str, str] = field(default_factory=dict)
    image: str | None = None  # None: the runtime's default image
    memory: int | None = None  # bytes; None: the runtime's default
    cpu: float | None = None  # cores; None: the runtime's default


def parse_procfile(text: str) -> dict[str, str]:
    """``name: command`` lines; blank lines and ``#`` comments are skipped."""
    entries: dict[str, str] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        match = _PROCFILE_LINE.match(line)
        if not match:
            raise ManifestError(f"Procfile line {number} is not `name: command`: {line[:60]!r}")
        entries[match.group(1)] = match.group(2).strip()
    return entries


def _load_config(text: str) -> dict[str, Any]:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ManifestError(f"{CONFIG_FILE} is not valid YAML: {_first_line(exc)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ManifestError(f"{CONFIG_FILE} must be a mapping, not {type(data).__name__}")
    unknown = set(data) - {"build", "run", "health", "env", "image", "memory", "cpu"}
    if unknown:
        names = ", ".join(sorted(map(str, unknown)))
        raise ManifestError(f"{CONFIG_FILE} has unknown keys: {names}")
    return data


def _first_line(exc: Exception) -> str:
    return " ".join(str(exc).split())


def _build_steps(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(s, str) and s.strip() for s in value):
        raise ManifestError(f"{CONFIG_FILE}: build must be a command or a list of commands")
    return tuple(value)


def _health(value: Any) -> tuple[str, float]:
    if value is None:
        return "/", DEFAULT_HEALTH_TIMEOUT
    if isinstance(value, str):
        value = {"path": value}
    if not isinstance(value, dict):
        raise ManifestError(f"{CONFIG_FILE}: health must be a path or a mapping")
    path = value.get("path", "/")
    timeout = value.get("timeout", DEFAULT_HEALTH_TIMEOUT)
    if not isinstance(path, str) or not path.startswith("/"):
        raise ManifestError(f"{CONFIG_FILE}: health path must start with /")
    unknown = set(value) - {"path", "timeout"}
    if unknown:
        names = ", ".join(sorted(map(str, unknown)))
        raise ManifestError(f"{CONFIG_FILE}: health has unknown keys: {names}")
    if isinstance(timeout, bool) or not isinstance(timeout, int | float) or not 0 < timeout <= 600:
        raise ManifestError(f"{CONFIG_FILE}: health timeout must be more than 0 and at most 600 s")
    return path, float(timeout)


def _env(value: Any) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ManifestError(f"{CONFIG_FILE}: env must map names to values")
    env: dict[str, str] = {}
    for key, item in value.items():
        if not isinstance(key, str) or not is_env_name(key):
            raise ManifestError(f"{CONFIG_FILE}: {key!r} is not a valid variable name")
        if isinstance(item, bool) or not isinstance(item, str | int | float):
            raise ManifestError(f"{CONFIG_FILE}: env {key} must be a string or a number")
        env[key] = str(item)
    return env


def _image(value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not _IMAGE.fullmatch(value):
        raise ManifestError(f"{CONFIG_FILE}: image must be an image reference, like python:3.12")
    return value


def parse_size(value: object) -> int:
    """Bytes from ``256Mi``, ``1Gi``, ``512Ki`` or a plain number of bytes; ValueError
    saying what is expected for anything else, or for less than :data:`SMALLEST_MEMORY`."""
    plain = isinstance(value, int | str) and not isinstance(value, bool)
    text = str(value).strip() if plain else ""
    match = _SIZE.fullmatch(text)
    if match is None:
        raise ValueError("must be a size like 256Mi (a number of bytes, or with Ki, Mi or Gi)")
    size = int(match.group(1)) * _UNITS[match.group(2)]
    if size < SMALLEST_MEMORY:
        raise ValueError(f"must be at least {SMALLEST_MEMORY // _UNITS['Mi']}Mi")
    return size


def parse_cpu(value: object) -> float:
    """Cores from ``0.5``, ``2`` or ``500m`` (millicores, as Kubernetes writes them);
    ValueError saying what is expected for anything else, or for less than
    :data:`SMALLEST_CPU` or more than :data:`LARGEST_CPU` cores."""
    plain = isinstance(value, int | float | str) and not isinstance(value, bool)
    text = str(value).strip() if plain else ""
    match = _CPU.fullmatch(text)
    if match is None:
        raise ValueError("must be a number of cores like 0.5, or millicores like 500m")
    cores = int(match.group(1)) / 1000 if match.group(1) else float(text)
    if not SMALLEST_CPU <= cores <= LARGEST_CPU:
        raise ValueError(f"must be at least {SMALLEST_CPU:g} and at most {LARGEST_CPU:g} cores")
    return cores


def _limit(settings: Mapping[str, Any], key: str, parse: Callable[[object], T]) -> T | None:
    """``settings[key]`` parsed (None if unsaid); a ManifestError that says why not."""
    value = settings.get(key)
    if value is None:
        return None
    try:
        return parse(value)
    except ValueError as exc:
        raise ManifestError(f"{CONFIG_FILE}: {key} {exc}") from None


def parse_manifest(procfile: str | None, config: str | None) -> Manifest:
    """Combine the Procfile and ``branchyard.yaml`` (either may be missing)."""
    processes = parse_procfile(procfile) if procfile is not None else {}
    settings = _load_config(config) if config is not None else {}
    run = settings.get("run")
    if run is not None and (not isinstance(run, str) or not run.strip()):
        raise ManifestError(f"{CONFIG_FILE}: run must be a command")
    web = run or processes.get("web")
    if not web:
        where = "Procfile has no `web:` line" if procfile is not None else "no Procfile"
        raise ManifestError(f"{where} and {CONFIG_FILE} sets no `run:` command")
    health_path, health_timeout = _health(settings.get("health"))
    return Manifest(
        web=web,
        workers=tuple(sorted((n, c) for n, c in processes.items() if n != "web")),
        build=_build_steps(settings.get("build")),
        health_path=health_path,
        health_timeout=health_timeout,
        env=_env(settings.get("env")),
        image=_image(settings.get("image")),
        memory=_limit(settings, "memory", parse_size),
        cpu=_limit(settings, "cpu", parse_cpu),
    )
