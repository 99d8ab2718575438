"""Commit status: tell the forge what became of each revision of a commit.

When a provider token is configured (:func:`config_from_env`), the engine hands every
revision state change to a :class:`StatusReporter`, which posts it to the forge's
commit-status API with the environment's URL as the target, so the commit on GitHub,
GitLab or Gitea/Forgejo shows "pending" while it builds and a link to the running
environment once it is live. Without a token nothing is sent: this is off by default.

Two layers, as elsewhere: :func:`build_request` is pure (config, repo URL, sha and
state in, the exact HTTP request out) and holds every rule about the forges; the
reporter is the one place that does I/O, through a :data:`Transport`, the single
seam that tests replace with a real server on loopback. Reporting is best-effort:
a refused token or an unreachable forge becomes a one-line message for ``on_error``
and never disturbs a deploy.

A revision's state in each forge's vocabulary (``None``: nothing to report)::

    revision state    github / gitea    gitlab
    building          pending           pending
    starting          pending           running
    staged            pending           pending
    live              success           success
    failed, crashed   failure           failed
    superseded        None              None
    stopped           None              None

The requests, per the providers' documented APIs::

    github  POST {api}/repos/{owner}/{repo}/statuses/{sha}
            Authorization: Bearer TOKEN, X-GitHub-Api-Version: 2022-11-28
            {"state", "target_url", "description", "context"}
    gitlab  POST {api}/projects/{url-encoded group/sub/repo}/statuses/{sha}
            PRIVATE-TOKEN: TOKEN
            {"state", "target_url", "description", "name"}
    gitea   POST {api}/repos/{owner}/{repo}/statuses/{sha}    (Forgejo: the same)
            Authorization: token TOKEN
            {"state", "target_url", "description", "context"}

GitLab keeps one status per (sha, name) with a state machine, and answers 400 to
pending after pending or running after running. GitLab therefore gets ``running``
for ``starting`` (a step forward from ``pending``), and the reporter never repeats
what it last sent successfully for a status: for GitLab the same state, for the
others the same request.
"""

from __future__ import annotations

import asyncio
import enum
import http.client
import json
import re
import ssl
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from urllib.parse import quote, urlsplit

from branchyard.model import RevisionState

Transport = Callable[[str, str, Mapping[str, str], bytes], int]
"""``(method, url, headers, body) -> HTTP status``; raises OSError when the network fails."""

DEFAULT_CONTEXT = "branchyard"
MAX_DESCRIPTION = 140  # GitHub's limit; the others take at least as much
GITHUB_API = "https://api.github.com"
_REMEMBERED = 4096  # statuses whose last report the reporter keeps, to skip repeats


class Forge(enum.StrEnum):
    GITHUB = "github"
    GITLAB = "gitlab"
    GITEA = "gitea"  # Forgejo serves the same API


@dataclass(frozen=True)
class StatusConfig:
    forge: Forge
    token: str = field(repr=False)
    api_url: str  # "https://api.github.com", "https://gitlab.example.com/api/v4", ...


@dataclass(frozen=True)
class StatusRequest:
    method: str
    url: str
    headers: dict[str, str]
    body: bytes


_PENDING, _SUCCESS = "pending", "success"
_STATES: dict[RevisionState, tuple[str | None, str | None]] = {
    # revision state:            (github and gitea, gitlab)
    RevisionState.BUILDING: (_PENDING, _PENDING),
    RevisionState.STARTING: (_PENDING, "running"),
    RevisionState.STAGED: (_PENDING, _PENDING),
    RevisionState.LIVE: (_SUCCESS, _SUCCESS),
    RevisionState.FAILED: ("failure", "failed"),
    RevisionState.CRASHED: ("failure", "failed"),
    RevisionState.SUPERSEDED: (None, None),
    RevisionState.STOPPED: (None, None),
}
_SHA = re.compile(r"[0-9a-fA-F]{7,64}")
# scp-like syntax (git@host:team/app.git): no slash before the first colon.
_SCP = re.compile(r"(?:[^/:@]*@)?([^/:@]+):(.+)", re.DOTALL)


def forge_state(forge: Forge, state: str) -> str | None:
    """``state`` (a revision state) in ``forge``'s words, or None when there is nothing to say.

    Raises ValueError for a string that is not a revision state.
    """
    try:
        revision_state = RevisionState(state)
    except ValueError:
        known = ", ".join(s.value for s in RevisionState)
        raise ValueError(f"not a revision state: {state!r} (one of {known})") from None
    common, gitlab = _STATES[revision_state]
    return gitlab if forge is Forge.GITLAB else common


def repo_path(repo_url: str) -> str | None:
    """The repository's path on its forge, ``owner/name`` or ``group/sub/name``.

    Read from ``https://host/owner/name(.git)``, ``ssh://git@host:22/owner/name.git``
    or the scp-like ``git@host:owner/name.git``. None for a local path
    (``/srv/app.git``, ``file:///srv/app.git``, ``./app``) or a URL with fewer than
    two path segments.
    """
    text = repo_url.strip()
    if "://" in text:
        try:
            parts = urlsplit(text)
            host = parts.hostname
        except ValueError:
            return None
        if parts.scheme.lower() == "file" or not host:
            return None
        path = parts.path
    else:
        scp = _SCP.fullmatch(text)
        if scp is None:
            return None
        path = scp.group(2)
    path = path.strip("/")
    path = path.removesuffix(".git").rstrip("/")
    segments = path.split("/")
    if len(segments) < 2 or any(s in ("", ".", "..") for s in segments):
        return None
    return "/".join(segments)


def build_request(
    config: StatusConfig,
    repo_url: str,
    sha: str,
    state: str,
    target_url: str,
    description: str,
    context: str = DEFAULT_CONTEXT,
) -> StatusRequest | None:
    """The request that reports ``state`` of commit ``sha`` of ``repo_url`` to the forge.

    None when there is nothing to report (a superseded or stopped revision) or when
    the repo is not on a forge (a local path). An empty ``target_url`` is left out;
    a description over 140 characters is cut, ending in "…". Raises ValueError for a
    ``state`` that is not a revision state or a ``sha`` that is not hexadecimal.
    """
    wanted = forge_state(config.forge, state)
    if not _SHA.fullmatch(sha):
        raise ValueError(f"not a commit sha: {sha!r}")
    path = repo_path(repo_url)
    if wanted is None or path is None:
        return None
    api = config.api_url.rstrip("/")
    label = "name" if config.forge is Forge.GITLAB else "context"
    payload: dict[str, str] = {"state": wanted}
    if target_url:
        payload["target_url"] = target_url
    payload["description"] = _shorten(description)
    payload[label] = context
    headers = {"Content-Type": "application/json", "User-Agent": "branchyard"}
    if config.forge is Forge.GITLAB:
        project = quote(_within(api, path), safe="")
        url = f"{api}/projects/{project}/statuses/{sha}"
        headers |= {"Accept": "application/json", "PRIVATE-TOKEN": config.token}
    else:
        # GitHub and Gitea name a repo owner/name; a Gitea served under a sub-path
        # (https://example.com/git/owner/name) still has the repo's last two segments.
        owner, name = path.split("/")[-2:]
        url = f"{api}/repos/{quote(owner, safe='')}/{quote(name, safe='')}/statuses/{sha}"
        if config.forge is Forge.GITHUB:
            headers |= {
                "Accept": "application/vnd.github+json",
                "Authorization": f"Bearer {config.token}",
                "X-GitHub-Api-Version": "2022-11-28",
            }
        else:
            headers |= {"Accept": "application/json", "Authorization": f"token {config.token}"}
    body = json.dumps(payload, separators=(",", ":")).encode()
    return StatusRequest("POST", url, headers, body)


def _shorten(description: str) -> str:
    text = " ".join(description.split())
    if len(text) <= MAX_DESCRIPTION:
        return text
    return text[: MAX_DESCRIPTION - 1].rstrip() + "…"


def _within(api: str, path: str) -> str:
    """A GitLab project path without the instance's relative root (``/gitlab/api/v4``)."""
    root = urlsplit(api).path.strip("/").removesuffix("api/v4").strip("/")
    if root and path.startswith(root + "/"):
        return path[len(root) + 1 :]
    return path


class StatusReporter:
    """Reports revision states to the configured forge; does nothing without a config."""

    def __init__(
        self,
        config: StatusConfig | None,
        transport: Transport | None = None,
        on_error: Callable[[str], None] = lambda message: None,
    ) -> None:
        self.config = config
        self.transport = transport if transport is not None else http_transport()
        self.on_error = on_error
        # (url, context) -> what was last reported successfully there
        self._sent: OrderedDict[tuple[str, str], str] = OrderedDict()

    @property
    def enabled(self) -> bool:
        return self.config is not None

    async def report(
        self,
        repo_url: str,
        sha: str,
        state: str,
        target_url: str,
        description: str,
        context: str = DEFAULT_CONTEXT,
    ) -> bool:
        """Send ``state`` of ``sha`` to the forge; True when the forge accepted it.

        False, without sending, when reporting is off, the state says nothing new
        (superseded, stopped, or what was last sent for this status) or the repo is
        local. False, after ``on_error`` got a one-line message, when the forge
        refuses the request or cannot be reached. Never raises.
        """
        config = self.config
        if config is None:
            return False
        what = f"{config.forge} status for {_service(repo_url)}@{sha[:7]}"
        try:
            request = build_request(config, repo_url, sha, state, target_url, description, context)
        except ValueError as exc:
            self.on_error(f"{what}: {exc}")
            return False
        if request is None:
            return False
        key = (request.url, context)
        sent = _state_of(request) if config.forge is Forge.GITLAB else request.body.decode()
        if self._sent.get(key) == sent:
            return False
        try:
            status = await asyncio.to_thread(
                self.transport, request.method, request.url, request.headers, request.body
            )
        except (OSError, ValueError) as exc:
            self.on_error(f"{what}: cannot reach {config.api_url}: {_one_line(exc)}")
            return False
        except Exception as exc:  # a transport bug must not stop a deploy either
            self.on_error(f"{what}: {type(exc).__name__}: {_one_line(exc)}")
            return False
        if not 200 <= status < 300:
            self.on_error(f"{what}: HTTP {status}{_hint(status, config)}")
            return False
        self._sent[key] = sent
        self._sent.move_to_end(key)
        while len(self._sent) > _REMEMBERED:
            self._sent.popitem(last=False)
        return True


def _service(repo_url: str) -> str:
    path = repo_path(repo_url)
    name = path.rsplit("/", 1)[-1] if path else repo_url.rstrip("/").rsplit("/", 1)[-1]
    return name.removesuffix(".git") or repo_url


def _state_of(request: StatusRequest) -> str:
    payload: dict[str, str] = json.loads(request.body)
    return payload["state"]


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def _hint(status: int, config: StatusConfig) -> str:
    if status == 401:
        return " (the forge refused the token: check BRANCHYARD_STATUS_TOKEN)"
    if status == 403:
        return " (the token may not set commit statuses on this repository)"
    if status == 404:
        return f" (no such repository or commit at {config.api_url}, or the token cannot see it)"
    return ""


def config_from_env(env: Mapping[str, str]) -> StatusConfig | None:
    """The status config from ``BRANCHYARD_STATUS_FORGE``, ``_TOKEN`` and ``_API``.

    None (reporting off) when the forge or the token is unset or empty. The API URL
    defaults to https://api.github.com for GitHub; GitLab and Gitea have no public
    default, so it is required there. ``forgejo`` is accepted for ``gitea``.
    Raises ValueError, naming the variable, for a forge or API URL that cannot work.
    """
    forge_name = env.get("BRANCHYARD_STATUS_FORGE", "").strip().lower()
    token = env.get("BRANCHYARD_STATUS_TOKEN", "").strip()
    if not forge_name or not token:
        return None
    if forge_name == "forgejo":
        forge_name = Forge.GITEA.value
    try:
        forge = Forge(forge_name)
    except ValueError:
        known = ", ".join([*(f.value for f in Forge), "forgejo"])
        raise ValueError(
            f"BRANCHYARD_STATUS_FORGE={forge_name!r} is not a known forge (one of {known})"
        ) from None
    api_url = env.get("BRANCHYARD_STATUS_API", "").strip()
    if not api_url:
        if forge is not Forge.GITHUB:
            example = "/api/v4" if forge is Forge.GITLAB else "/api/v1"
            raise ValueError(
                f"BRANCHYARD_STATUS_API is required for {forge} "
                f"(e.g. https://{forge}.example.com{example})"
            )
        api_url = GITHUB_API
    parts = urlsplit(api_url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"BRANCHYARD_STATUS_API={api_url!r} is not an http(s) URL")
    return StatusConfig(forge, token, api_url.rstrip("/"))


def http_transport(timeout: float = 10.0) -> Transport:
    """The real transport: one request with http.client, no redirects, TLS verified.

    Returns the HTTP status of the answer; raises OSError when the network fails
    (refused, timed out, TLS, a broken answer) and ValueError for a URL that is not
    http(s).
    """
    tls = ssl.create_default_context()

    def send(method: str, url: str, headers: Mapping[str, str], body: bytes) -> int:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {url}")
        target = parts.path or "/"
        if parts.query:
            target += f"?{parts.query}"
        connection: http.client.HTTPConnection
        if parts.scheme == "https":
            connection = http.client.HTTPSConnection(parts.netloc, timeout=timeout, context=tls)
        else:
            connection = http.client.HTTPConnection(parts.netloc, timeout=timeout)
        try:
            connection.request(method, target, body=body, headers=dict(headers))
            response = connection.getresponse()
            response.read(64 * 1024)  # the answer is not needed, only its status
            return response.status
        except http.client.HTTPException as exc:
            raise OSError(f"bad answer from {parts.netloc}: {_one_line(exc)}") from exc
        finally:
            connection.close()

    return send
