"""The JSON the API answers, as TypedDicts shared by the server and its clients.

:mod:`branchyard.api` declares its answers with these (FastAPI checks them and puts
them in the OpenAPI schema); :mod:`branchyard.client` and :mod:`branchyard.cli`
read them. They come from ``typing_extensions`` because pydantic takes no
``typing.TypedDict`` before Python 3.12; that import costs a command about 20 ms
at start-up, so the CLI imports this module for type checking only.
"""

from __future__ import annotations

from typing import NotRequired

from typing_extensions import TypedDict


class Info(TypedDict):
    """``GET /api/info``, and the daemon file the CLI finds the daemon by."""

    pid: int
    home: str
    router: str
    api: str
    sandbox: str | None  # None: pushed code runs with the daemon's rights
    limits: str | None  # what a box may use, and what is not bounded here; None: on Kubernetes
    git: str | None  # where pods fetch local repos (``up --git-listen``); None: not served


class Repo(TypedDict):
    name: str
    url: str
    default_branch: str | None  # None: whatever the repo's HEAD names


class RepoRow(Repo):
    """A line of ``repo ls``."""

    branches: int
    error: str  # why the watcher cannot read it now, "" when it can


class Removed(TypedDict):
    removed: str


class ServiceRemoved(Removed):
    until_next_push_of: str


class Namespace(TypedDict):
    namespace: str
    branch: str
    services: list[str]


class Revision(TypedDict):
    ordinal: int
    sha: str
    sha7: str
    branch: str
    state: str  # a RevisionState
    reason: str
    subject: str
    settings: str  # the settings version, "" for none
    created_at: float
    changed_at: float


class ServiceRow(TypedDict):
    """A line of ``ps``: one service in one namespace (see :mod:`branchyard.readmodel`)."""

    namespace: str
    service: str
    state: str  # "live", "live (v5 building) pinned v4, behind main (17d8b23)", ...
    reason: str  # why the newest revision failed or crashed
    live: Revision | None
    latest: Revision | None
    pinned: int | None
    weights: dict[int, int]  # ordinal -> weight of the revisions that take traffic
    restarts: int
    last_lines: list[str]  # the end of a failed or crashed revision's output
    logs_command: str  # the command that prints it
    behind: bool
    url: str
    since: float | None


class Env(TypedDict):
    env: dict[str, str]
    secrets: dict[str, str]  # name -> a mask (its value, if asked)
    version: str


class EnvSaved(TypedDict):
    env: dict[str, str]
    version: str
    changed: bool


class SecretsSaved(TypedDict):
    secrets: list[str]
    version: str


class SettingsChange(TypedDict):
    commit: str
    author: str
    date: str
    message: str
    diff: str


class Live(TypedDict):
    live: int


class Pinned(Live):
    pinned: int


class Unpinned(TypedDict):
    live: int | None
    building: bool
    branch: str
    head: str


class Weights(TypedDict):
    weights: dict[int, int]  # ordinal -> weight; in JSON the ordinals are strings


class Event(TypedDict):
    id: int
    at: float
    kind: str
    namespace: str | None
    service: str | None
    message: str


class Refusal(TypedDict):
    """Every error answer: ``error`` names its kind (``not_found``, ``bad_webhook_signature``,
    ...), ``message`` says it to a person."""

    error: str
    message: str


class Collected(TypedDict):
    """``POST /api/gc``: what was freed. Which of the last two keys comes depends on the
    runtime: the local one removes environments, the Kubernetes one deletes objects."""

    builds_bytes: int
    environments_removed: NotRequired[int]  # local
    kubernetes_objects_deleted: NotRequired[int]  # kubernetes


class HookChecking(TypedDict):
    """A push or delete webhook: the repo's branch heads are read now, not at the next poll."""

    checking: str  # the repo
    branch: str


class HookPong(TypedDict):
    """A ping webhook (a forge's test delivery) that passed verification."""

    pong: str  # the repo


class HookIgnored(TypedDict):
    """A webhook with nothing to do: another event, or a repo that is not registered."""

    ignored: str  # why


HookAnswer = HookChecking | HookPong | HookIgnored | Refusal
"""What ``POST /hooks/{provider}`` answers."""


class TokenFile(TypedDict):
    token_file: str


class LoginCode(TypedDict):
    code: str
    url: str
    expires_in: int
