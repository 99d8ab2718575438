"""What every command shares: the :class:`Context` (the home, the global ``-n`` and the
API client), the ``-n`` a command also takes after its name, and the arguments several
commands parse alike (a revision written ``4`` or ``v4``, ``KEY=VALUE`` pairs)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from branchyard.client import Client, path_of
from branchyard.errors import UsageError
from branchyard.naming import BASELINE

F = TypeVar("F", bound=Callable[..., Any])


class Context:
    def __init__(self, home: Path, namespace: str | None) -> None:
        self.home = home
        self._namespace = namespace
        self.client = Client(home)

    def namespace(self, override: str | None) -> str:
        return override or self._namespace or BASELINE

    @property
    def namespace_option(self) -> str | None:
        """The global -n, if one was given."""
        return self._namespace

    def service_path(self, ns: str | None, service: str, *more: str) -> str:
        """The API path of a service in the namespace ``ns`` (else the global -n's)."""
        return path_of("namespaces", self.namespace(ns), "services", service, *more)


pass_context = click.make_pass_decorator(Context)


def namespaced(func: F) -> F:
    """Also accept ``-n`` after the command name (``branchyard ps -n bugfix``)."""
    return click.option("-n", "--namespace", "ns", help="Namespace (default: main).")(func)


def ordinal(text: str) -> int:
    """``4``, ``v4`` or ``V4`` -> 4."""
    digits = text.lower().removeprefix("v")
    if not digits.isdigit():
        raise UsageError(f"{text!r} is not a revision (write it as 4 or v4)")
    return int(digits)


def assignments(pairs: tuple[str, ...]) -> dict[str, str]:
    """``KEY=VALUE`` arguments as a dict (a value may hold ``=``)."""
    parsed = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise UsageError(f"{pair!r} is not KEY=VALUE")
        parsed[key] = value
    return parsed
