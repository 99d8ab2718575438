"""Webhooks from GitHub, GitLab and Gitea/Forgejo: check the signature, read the push.

The pure layer behind ``POST /hooks/github``, ``/hooks/gitlab`` and ``/hooks/gitea``
(Forgejo sends the Gitea format). No I/O and no clock: the HTTP API hands over the
headers, the raw body and the secret it holds for the repo, and gets back a
:class:`PushEvent`, or a :class:`WebhookError` whose ``status`` is the HTTP answer
(400, 401 or 413) and whose message tells a person what to fix.

A caller goes: :func:`check_size` on the Content-Length (and while reading), then
:func:`parse` to learn which repo the payload is about, then :func:`verify` with that
repo's secret (or the global one), and only then acts. Parsing before verifying is
safe because parsing does nothing but read.

Verification is each provider's own mechanism:

    github  X-Hub-Signature-256   "sha256=" + hex HMAC-SHA256(secret, body)
    gitlab  X-Gitlab-Token        the secret itself
    gitea   X-Gitea-Signature     hex HMAC-SHA256(secret, body)
            (or X-Forgejo-Signature)

What a payload means, per the providers' documented formats:

    PushEvent.kind   GitHub, Gitea/Forgejo               GitLab
    push             push, ref refs/heads/B              push, ref refs/heads/B
    delete           push with deleted true or after     push with after all zeros
                     all zeros; a delete event with
                     ref_type branch (ref is B)
    tag              push, ref refs/tags/T; a delete     tag_push
                     event with ref_type tag
    ping             GitHub ping                         -
    other            anything else                       anything else

The event type comes from X-GitHub-Event / X-Gitea-Event (X-Forgejo-Event), and for
GitLab from the body's ``object_kind`` (X-Gitlab-Event when that is absent).

A payload is untrusted input, so it is read field by field with type checks rather
than cast to a TypedDict. A push that lacks what the engine needs (ref, repository
name, a commit sha) is a 400 naming the field; any other event is read best-effort
and never rejected for its shape.

The repository is reported by every URL the payload gives for it (https, ssh,
scp-like, web), so the caller can match a registered repo whichever form it was
registered with, comparing both sides through :func:`normalize_url`.

Anyone who reaches the API can send a webhook. Those refused before they were
authenticated (malformed, too large, naming no registered repo, unsigned or
wrongly signed) are told to the event log through :class:`Refusals`: at most
one a minute, with a count of the rest, so a flood of them cannot push real
events out of the log.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Literal
from urllib.parse import urlsplit

from branchyard.errors import BranchyardError

MAX_BODY = 5 * 1024 * 1024
REFUSALS_INTERVAL = 60.0  # seconds between two refused webhooks recorded as events

Kind = Literal["push", "delete", "tag", "ping", "other"]


class Provider(enum.StrEnum):
    GITHUB = "github"
    GITLAB = "gitlab"
    GITEA = "gitea"


class WebhookError(BranchyardError):
    """A webhook request refused: ``status`` is the HTTP answer, ``code`` a stable name.

    Permanent: the same delivery is refused again. The webhook endpoints answer
    providers, not the CLI, and turn this into their response in one place.
    """

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code


class Refusals:
    """Which refused webhooks are recorded: the first at once, then at most one per
    ``interval`` seconds, saying how many were refused since the one recorded before.

    Pure: the caller says when each refusal came and records what it is given."""

    def __init__(self, interval: float = REFUSALS_INTERVAL) -> None:
        self._interval = interval
        self._told_at: float | None = None
        self._untold = 0

    def refused(self, message: str, now: float) -> str | None:
        """The event to record for a refusal that ``message`` describes, or None when one
        was recorded less than ``interval`` seconds before ``now`` (this one is counted)."""
        last = self._told_at
        if last is not None and now - last < self._interval:
            self._untold += 1
            return None
        untold, self._untold, self._told_at = self._untold, 0, now
        if last is None or not untold:
            return message
        return (
            f"{message} (and {untold} more unauthenticated webhooks refused "
            f"in the last {now - last:.0f} s, not recorded one by one)"
        )


@dataclass(frozen=True)
class PushEvent:
    """What a webhook says happened, reduced to what the engine acts on.

    ``repo_urls`` holds every URL the payload names for the repository, as given;
    ``branch`` is set for ``push`` and ``delete``; ``after`` (the new head, lowercase
    hex) for ``push`` and for a pushed tag.
    """

    provider: Provider
    kind: Kind
    repo_urls: tuple[str, ...]
    repo_name: str
    branch: str | None
    after: str | None


_TITLE = {Provider.GITHUB: "GitHub", Provider.GITLAB: "GitLab", Provider.GITEA: "Gitea"}
_EVENT_HEADERS = {
    Provider.GITHUB: ("X-GitHub-Event",),
    Provider.GITLAB: ("X-Gitlab-Event",),
    Provider.GITEA: ("X-Gitea-Event", "X-Forgejo-Event", "X-Gogs-Event"),
}
_SIGNATURE_HEADERS = {
    Provider.GITHUB: ("X-Hub-Signature-256",),
    Provider.GITLAB: ("X-Gitlab-Token",),
    Provider.GITEA: ("X-Gitea-Signature", "X-Forgejo-Signature"),
}
_SECRET_NOUN = {
    Provider.GITHUB: "secret",
    Provider.GITLAB: "secret token",
    Provider.GITEA: "secret",
}
_URL_KEYS = {
    Provider.GITHUB: ("clone_url", "ssh_url", "git_url", "html_url", "svn_url"),
    Provider.GITLAB: (
        "git_http_url",
        "git_ssh_url",
        "http_url",
        "ssh_url",
        "url",
        "web_url",
        "homepage",
    ),
    Provider.GITEA: ("clone_url", "ssh_url", "html_url"),
}
_JSON_TYPE = {
    "list": "array",
    "str": "string",
    "int": "number",
    "float": "number",
    "bool": "boolean",
    "NoneType": "null",
}
_GITLAB_KINDS = {"push hook": "push", "tag push hook": "tag_push"}
_DEFAULT_SECRET_NAME = "the webhook secret of this repo (or the global one)"
_HEX64 = re.compile(r"[0-9a-fA-F]{64}")
_SHA = re.compile(r"[0-9a-f]{40}|[0-9a-f]{64}")
# What `git check-ref-format --branch` refuses; such a name never reaches git from here.
_BAD_BRANCH = re.compile(r"[\x00-\x20\x7f~^:?*\[\\]|\.\.|@\{|//|^[-/.]|/\.|[/.]$|\.lock(/|$)")
# scp-like syntax (git@host:team/app.git): no slash before the first colon.
_SCP = re.compile(r"(?:[^/:@]*@)?([^/:@]+):(.*)", re.DOTALL)


def event_type(provider: Provider, headers: Mapping[str, str]) -> str:
    """The event type header's value (``push``, ``Push Hook``...), or "" when absent.

    Header names are matched case-insensitively; for Gitea, Forgejo's and Gogs'
    names of the header are read too.
    """
    found = _header(headers, _EVENT_HEADERS[provider])
    return found[1].strip() if found else ""


def check_size(size: int) -> None:
    """Refuse (413) a body of ``size`` bytes when it is over :data:`MAX_BODY`."""
    if size > MAX_BODY:
        raise WebhookError(
            413,
            "webhook_too_large",
            f"webhook body has {size} bytes, over the limit of {MAX_BODY}: "
            "subscribe the webhook to push events only",
        )


def verify(
    provider: Provider,
    headers: Mapping[str, str],
    body: bytes,
    secret: str,
    *,
    secret_name: str = _DEFAULT_SECRET_NAME,
) -> None:
    """Raise a 401 unless the request carries ``provider``'s proof of ``secret``.

    ``secret_name`` says in the messages which secret was tried, e.g. "the webhook
    secret of repo app". Comparisons take constant time. An empty secret never
    verifies anything.
    """
    check_size(len(body))
    title = _TITLE[provider]
    if not secret:
        raise _unauthorized(
            f"no webhook secret is set to check this {title} webhook against: "
            "set one for the repo (repo add --webhook-secret) or a global one"
        )
    found = _header(headers, _SIGNATURE_HEADERS[provider])
    if found is None:
        header = _SIGNATURE_HEADERS[provider][0]
        raise _unauthorized(
            f"{header} header is missing: give the {title} webhook a "
            f"{_SECRET_NOUN[provider]}, the same as {secret_name}"
        )
    header, sent = found
    key = _utf8(secret)
    if provider is Provider.GITLAB:
        matches = hmac.compare_digest(_utf8(sent), key)
    else:
        digest = sent.strip()
        if provider is Provider.GITHUB:
            scheme, _, digest = digest.partition("=")
            well_formed = scheme.strip().lower() == "sha256" and _HEX64.fullmatch(digest)
            expected_form = "sha256=<64 hex digits>"
        else:
            well_formed = _HEX64.fullmatch(digest)
            expected_form = "64 hex digits"
        if not well_formed:
            raise _unauthorized(
                f"{header} is malformed, expected {expected_form}: "
                f"is this request from a {title} webhook?"
            )
        expected = hmac.new(key, body, hashlib.sha256).hexdigest()
        matches = hmac.compare_digest(digest.lower().encode(), expected.encode())
    if not matches:
        raise _unauthorized(f"{header} does not match: check {secret_name}")


def parse(provider: Provider, headers: Mapping[str, str], body: bytes) -> PushEvent:
    """Read a webhook request into a :class:`PushEvent`.

    Raises a 400 for a body that is not a JSON object, a missing event type, or a
    push without the fields the engine needs; a 413 for a body over the limit.
    """
    check_size(len(body))
    payload = _load(provider, body)
    if provider is Provider.GITLAB:
        return _parse_gitlab(headers, payload)
    event = event_type(provider, headers).lower()
    title = _TITLE[provider]
    if not event:
        header = _EVENT_HEADERS[provider][0]
        raise _malformed(
            f"{header} header is missing: is this request from a {title} webhook? "
            f"(/hooks/{provider.value} takes {title}'s format)"
        )
    repository = _object(payload, "repository")
    if event == "push":
        deleted = payload.get("deleted") is True
        return _from_push(provider, payload, [repository], deleted=deleted)
    urls, name = _repo_of(provider, [repository])
    if event == "ping" and provider is Provider.GITHUB:
        return PushEvent(provider, "ping", urls, name, None, None)
    if event == "delete":
        ref_type = payload.get("ref_type")
        if ref_type == "tag":
            return PushEvent(provider, "tag", urls, name, None, None)
        if ref_type == "branch":
            ref = _text(payload, "ref")
            if not ref:
                raise _missing(provider, "delete", '"ref"')
            # Gitea and GitHub send the short name here; accept a full one too.
            branch = _branch(provider, "refs/heads/" + ref.removeprefix("refs/heads/"))
            _need_name(provider, "delete", name)
            return PushEvent(provider, "delete", urls, name, branch, None)
    return PushEvent(provider, "other", urls, name, None, None)


def normalize_url(url: str) -> str:
    """A form of a repo URL for comparing: ``host/team/app``.

    ``https://Host/team/app``, ``ssh://git@host:22/team/app.git`` and the scp-like
    ``git@host:team/app.git`` all give ``host/team/app``: scheme, user, password,
    port, query and a trailing ``.git`` or ``/`` are dropped and the host is
    lowercased; the path keeps its case. A local path (``/srv/app.git``,
    ``file:///srv/app.git``) gives the path (``/srv/app``).
    """
    text = url.strip()
    if "://" in text:
        try:
            parts = urlsplit(text)
            host = parts.hostname or ""
        except ValueError:
            return _trim(text)
        return _join(host, parts.path)
    scp = _SCP.fullmatch(text)
    if scp:
        return _join(scp.group(1).lower(), scp.group(2))
    return _trim(text)


def _parse_gitlab(headers: Mapping[str, str], payload: Mapping[str, object]) -> PushEvent:
    provider = Provider.GITLAB
    kind = _text(payload, "object_kind") or _text(payload, "event_name")
    if kind is None:
        header = event_type(provider, headers).lower()
        if not header:
            raise _malformed(
                "no X-Gitlab-Event header and no object_kind: is this request from a "
                "GitLab webhook? (/hooks/gitlab takes GitLab's format)"
            )
        kind = _GITLAB_KINDS.get(header, header)
    project = _object(payload, "project")
    # "repository" is GitLab's older, deprecated name for "project".
    repositories = [project, _object(payload, "repository")]
    if kind in ("push", "tag_push"):
        return _from_push(provider, payload, repositories)
    urls, name = _repo_of(provider, repositories)
    return PushEvent(provider, "other", urls, name, None, None)


def _from_push(
    provider: Provider,
    payload: Mapping[str, object],
    repositories: list[Mapping[str, object] | None],
    *,
    deleted: bool = False,
) -> PushEvent:
    """A push event: to a branch, deleting one, or of a tag."""
    ref = _text(payload, "ref")
    if not ref:
        raise _missing(provider, "push", '"ref"')
    if not any(repositories):
        field = "project" if provider is Provider.GITLAB else "repository"
        raise _missing(provider, "push", f'"{field}" object')
    urls, name = _repo_of(provider, repositories)
    _need_name(provider, "push", name)
    after = _text(payload, "after")
    gone = deleted or (after is not None and after != "" and set(after) == {"0"})
    if after is not None and not gone and not _SHA.fullmatch(after.lower()):
        raise _malformed(f'{_TITLE[provider]} push has "after" {after[:80]!r}, not a commit sha')
    head = None if gone or not after else after.lower()
    if ref.startswith("refs/tags/"):
        return PushEvent(provider, "tag", urls, name, None, head)
    if not ref.startswith("refs/heads/"):
        return PushEvent(provider, "other", urls, name, None, None)
    branch = _branch(provider, ref)
    if gone:
        return PushEvent(provider, "delete", urls, name, branch, None)
    if head is None:
        raise _missing(provider, "push", '"after" commit sha')
    return PushEvent(provider, "push", urls, name, branch, head)


def _repo_of(
    provider: Provider, objects: Iterable[Mapping[str, object] | None]
) -> tuple[tuple[str, ...], str]:
    """Every URL of the repository and its name, from whichever objects describe it."""
    urls: dict[str, None] = {}
    name = ""
    for repository in objects:
        if repository is None:
            continue
        for key in _URL_KEYS[provider]:
            value = _text(repository, key)
            if value and value.strip():
                urls[value] = None
        if not name:
            name = _name_of(provider, repository)
    return tuple(urls), name


def _name_of(provider: Provider, repository: Mapping[str, object]) -> str:
    if provider is Provider.GITLAB:
        # GitLab's "name" is a display name ("My App"); the repo's name is its path's tail.
        for key in ("path_with_namespace", "git_http_url", "git_ssh_url", "web_url"):
            tail = _trim(_text(repository, key) or "").rsplit("/", 1)[-1].rsplit(":", 1)[-1]
            if tail:
                return tail
    return _text(repository, "name") or ""


def _need_name(provider: Provider, event: str, name: str) -> None:
    if not name:
        field = "project" if provider is Provider.GITLAB else "repository"
        raise _missing(provider, event, f'{field} "name"')


def _branch(provider: Provider, ref: str) -> str:
    branch = ref.removeprefix("refs/heads/")
    if not branch or branch == "@" or _BAD_BRANCH.search(branch):
        raise _malformed(
            f"{_TITLE[provider]} webhook names branch {branch[:80]!r}, which git does not accept"
        )
    return branch


def _load(provider: Provider, body: bytes) -> Mapping[str, object]:
    hint = "set the webhook's content type to application/json"
    if body.startswith(b"payload="):
        raise _malformed(f"body is form-encoded: {hint}")
    try:
        payload = json.loads(body)
    except json.JSONDecodeError as error:
        raise _malformed(
            f"body is not JSON ({error.msg} at line {error.lineno} column {error.colno}): {hint}"
        ) from None
    except UnicodeDecodeError:
        raise _malformed(f"body is not UTF-8 JSON: {hint}") from None
    except (ValueError, RecursionError) as error:
        reason = "nested too deeply" if isinstance(error, RecursionError) else str(error)
        raise _malformed(f"body is not usable JSON ({reason[:120]}): {hint}") from None
    if not isinstance(payload, dict):
        what = _JSON_TYPE.get(type(payload).__name__, "value")
        raise _malformed(
            f"body is a JSON {what}, not an object: is this request from a "
            f"{_TITLE[provider]} webhook?"
        )
    return payload


def _header(headers: Mapping[str, str], names: Iterable[str]) -> tuple[str, str] | None:
    """The first of ``names`` present in ``headers`` (any case), with its value."""
    lowered = {str(key).lower(): value for key, value in headers.items()}
    for name in names:
        value = lowered.get(name.lower())
        if isinstance(value, str):
            return name, value
    return None


def _text(obj: Mapping[str, object], key: str) -> str | None:
    """``obj[key]`` if it is a string that can be stored (no lone surrogates)."""
    value = obj.get(key)
    if not isinstance(value, str):
        return None
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return None
    return value


def _object(obj: Mapping[str, object], key: str) -> Mapping[str, object] | None:
    value = obj.get(key)
    return value if isinstance(value, dict) else None


def _utf8(text: str) -> bytes:
    return text.encode("utf-8", "surrogatepass")


def _join(host: str, path: str) -> str:
    path = _trim(path.strip("/"))
    return f"{host}/{path}" if path else host


def _trim(path: str) -> str:
    """Drop trailing slashes and ``.git`` suffixes."""
    while True:
        trimmed = path.rstrip("/").removesuffix(".git")
        if trimmed == path:
            return path
        path = trimmed


def _malformed(message: str) -> WebhookError:
    return WebhookError(400, "bad_webhook_payload", message)


def _unauthorized(message: str) -> WebhookError:
    return WebhookError(401, "bad_webhook_signature", message)


def _missing(provider: Provider, event: str, what: str) -> WebhookError:
    title = _TITLE[provider]
    return _malformed(
        f"{title} {event} payload has no {what}: is this request from a {title} webhook? "
        f"(/hooks/{provider.value} takes {title}'s format)"
    )
