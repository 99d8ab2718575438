"""The HTTP API: everything the CLI does goes through here.

JSON in and out under ``/api``. Errors are ``{"error": CODE, "message": TEXT}``
with the status of the :mod:`branchyard.errors` class, turned into a response
in exactly one place (:func:`_error`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Annotated, Any

from fastapi import FastAPI, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import AfterValidator, BaseModel

from branchyard import auth, readmodel, sessions, shapes, webhooks
from branchyard.client import WARNING
from branchyard.engine import Engine
from branchyard.errors import BranchyardError, HomeError, UsageError
from branchyard.model import Overlay, Repo
from branchyard.settings import validate_env
from branchyard.text import redacted_url, shown
from branchyard.vault import masked
from branchyard.views import Views

log = logging.getLogger(__name__)

FOLLOW_INTERVAL = 0.2
MAX_EVENT_ID = 2**63 - 1  # SQLite's INTEGER

WEBHOOK_BODY_SECONDS = 10.0
"""How long a webhook body may take to arrive, from its head on; then it is cut with a
408 (GitHub itself gives up on a delivery after 10 s)."""

WEBHOOK_BODIES_BYTES = 16 * 1024 * 1024
"""Bytes of webhook bodies held at once, all deliveries together (three of the largest,
``webhooks.MAX_BODY``, or hundreds of usual ones): a body that would take more is
refused at once with a 503 and Retry-After, so unauthenticated senders cannot make the
daemon hold more. A body's bytes count from its Content-Length, or as they arrive."""


class _Bodies:
    """The bytes of webhook bodies being held, under :data:`WEBHOOK_BODIES_BYTES`."""

    def __init__(self) -> None:
        self.held = 0

    def take(self, size: int) -> None:
        if self.held + size > WEBHOOK_BODIES_BYTES:
            raise webhooks.WebhookError(
                503,
                "webhooks_busy",
                f"webhook bodies of {self.held} bytes are being read, the most is "
                f"{WEBHOOK_BODIES_BYTES}: retry",
            )
        self.held += size

    @contextlib.asynccontextmanager
    async def read(self, request: Request) -> AsyncIterator[bytes]:
        """The request body, held while the block runs; 413 as soon as it passes the
        webhook limit, 503 when the bodies held are at their most, 408 when it takes
        longer than :data:`WEBHOOK_BODY_SECONDS`."""
        declared = request.headers.get("content-length", "")
        taken = 0
        try:
            if declared.isdigit():
                webhooks.check_size(int(declared))
                self.take(int(declared))
                taken = int(declared)
            body = bytearray()
            try:
                async with asyncio.timeout(WEBHOOK_BODY_SECONDS):
                    async for chunk in request.stream():
                        body += chunk
                        webhooks.check_size(len(body))
                        if len(body) > taken:
                            self.take(len(body) - taken)
                            taken = len(body)
            except TimeoutError:
                raise webhooks.WebhookError(
                    408,
                    "webhook_body_timeout",
                    f"webhook body not complete after {WEBHOOK_BODY_SECONDS:g} s: cut",
                ) from None
            yield bytes(body)
        finally:
            self.held -= taken


# A body that trickles is cut: its connection is closed. One refused for its size or for
# the budget is not: uvicorn discards the rest of it unread, so its sender reads the answer.
_CUT = {"Connection": "close"}
_RETRY = {"Retry-After": "1"}


def _text(value: str) -> str:
    """Refuse what no path, subprocess argument or UTF-8 encoder takes."""
    if "\0" in value:
        raise ValueError("contains a NUL character")
    try:
        value.encode()
    except UnicodeEncodeError:
        raise ValueError("is not valid UTF-8 (a lone surrogate)") from None
    return value


Text = Annotated[str, AfterValidator(_text)]
EventId = Annotated[int, Query(ge=0, le=MAX_EVENT_ID)]


class RepoIn(BaseModel):
    url: Text
    name: Text | None = None
    default_branch: Text | None = None
    webhook_secret: Text = ""


class RepoChangeIn(BaseModel):
    default_branch: Text | None = None
    webhook_secret: Text | None = None  # "": use the global one


class SecretsIn(BaseModel):
    set: dict[Text, Text] = {}
    unset: list[Text] = []
    author: Text = "branchyard"


class RevisionIn(BaseModel):
    ordinal: int | None = None


class WeightsIn(BaseModel):
    weights: dict[int, int]


class EnvIn(BaseModel):
    env: dict[Text, Any]
    version: Text  # the version the new env was made from ("" for a service with none)
    author: Text = "branchyard"
    message: Text = ""


class EnvChangeIn(BaseModel):
    set: dict[Text, Any] = {}
    unset: list[Text] = []
    author: Text = "branchyard"


def _env_answer(settings: Overlay, changed: bool) -> shapes.EnvSaved:
    return {"env": dict(settings.env), "version": settings.version, "changed": changed}


def _home_error(exc: OSError | sqlite3.Error, home: Path) -> HomeError:
    """What a failed read or write under the home means, in one line."""
    if isinstance(exc, sqlite3.Error):
        return HomeError(f"the store {home / 'state.db'} failed: {exc}")
    where = f": {exc.filename}" if exc.filename else ""
    return HomeError(f"{exc.strerror or exc}{where} (is the home {home} writable, with space?)")


def _repo_answer(repo: Repo) -> shapes.Repo:
    """A repo as the API shows it: its URL without credentials."""
    return {"name": repo.name, "url": redacted_url(repo.url), "default_branch": repo.default_branch}


def create_app(engine: Engine, views: Views, info: shapes.Info, home: Path) -> FastAPI:
    """The API's app: commands go to ``engine``, reads to ``views``."""
    app = FastAPI(title="branchyard", version="0.1.0")
    # Set by the daemon when it stops: streams that never end on their own (events, logs -f)
    # end then; uvicorn would otherwise wait for them (an open dashboard tab: forever).
    app.state.stopping = stopping = asyncio.Event()
    app.state.sandbox = info["sandbox"]  # None: pushed code runs unsandboxed
    token = [auth.load_or_create(home)]
    refusals = webhooks.Refusals()  # webhooks refused before they were authenticated
    bodies = _Bodies()

    @app.middleware("http")
    async def require_token(
        request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        given = auth.bearer(request.headers.get("authorization"))
        if (
            request.url.path.startswith("/hooks/")
            or sessions.is_open(request)
            or auth.matches(token[0], given)
            or auth.matches(token[0], sessions.session_token(request))
        ):
            return await call_next(request)
        return sessions.refusal(request) or JSONResponse(
            {"error": "unauthorized", "message": f"missing or wrong API token (see {home}/token)"},
            status_code=401,
        )

    @app.post("/api/token/rotate")
    async def rotate_token() -> shapes.TokenFile:
        token[0] = auth.rotate(home)
        engine.note("token", "API token rotated")
        return {"token_file": str(home / auth.TOKEN_FILE)}

    @app.exception_handler(BranchyardError)
    async def _error(request: Request, exc: BranchyardError) -> JSONResponse:
        return JSONResponse({"error": exc.code, "message": exc.message}, status_code=exc.status)

    @app.exception_handler(OSError)
    @app.exception_handler(sqlite3.Error)
    async def _home_fault(request: Request, exc: OSError | sqlite3.Error) -> JSONResponse:
        error = _home_error(exc, home)
        log.warning("%s %s: %s", request.method, request.url.path, error.message)
        return await _error(request, error)

    @app.exception_handler(Exception)
    async def _bug(request: Request, exc: Exception) -> JSONResponse:
        # Logged with its traceback by the server: this is a bug, not a user's mistake.
        message = f"internal error ({type(exc).__name__}); the daemon's output has the details"
        return JSONResponse({"error": "internal_error", "message": message}, status_code=500)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        message = problems.encode(errors="backslashreplace").decode()  # never echo the input
        return JSONResponse({"error": "invalid_request", "message": message}, status_code=422)

    @app.get("/api/info")
    async def get_info() -> shapes.Info:
        return info

    @app.get("/api/repos")
    async def list_repos() -> list[shapes.RepoRow]:
        return views.repo_rows()

    @app.post("/api/repos", status_code=201)
    async def add_repo(body: RepoIn) -> shapes.Repo:
        repo = await engine.add_repo(body.url, body.name, body.default_branch, body.webhook_secret)
        return _repo_answer(repo)

    @app.patch("/api/repos/{name}")
    async def change_repo(name: str, body: RepoChangeIn) -> shapes.Repo:
        repo = await engine.change_repo(name, body.default_branch, body.webhook_secret)
        return _repo_answer(repo)

    @app.delete("/api/repos/{name}")
    async def remove_repo(name: str) -> shapes.Removed:
        await engine.remove_repo(name)
        return {"removed": name}

    @app.get("/api/namespaces")
    async def list_namespaces() -> list[shapes.Namespace]:
        return views.namespaces()

    @app.get("/api/services")
    async def list_services(namespace: str | None = None) -> list[shapes.ServiceRow]:
        return await views.rows(namespace)

    @app.get("/api/namespaces/{namespace}/services/{service}")
    async def get_service(namespace: str, service: str) -> shapes.ServiceRow:
        views.target(namespace, service)
        return await views.row((namespace, service))

    @app.delete("/api/namespaces/{namespace}/services/{service}")
    async def remove_service(namespace: str, service: str) -> shapes.ServiceRemoved:
        target = engine.remove_service(namespace, service)
        return {"removed": f"{namespace}:{service}", "until_next_push_of": target.branch}

    @app.get("/api/namespaces/{namespace}/services/{service}/env")
    async def get_env(namespace: str, service: str, show_secrets: bool = False) -> shapes.Env:
        settings = views.settings(namespace, service)
        secrets = views.secrets(namespace, service)
        return {
            "env": dict(settings.env),
            "secrets": secrets if show_secrets else masked(list(secrets)),
            "version": settings.version,
        }

    @app.put("/api/namespaces/{namespace}/services/{service}/secrets")
    async def put_secrets(namespace: str, service: str, body: SecretsIn) -> shapes.SecretsSaved:
        changes: dict[str, str | None] = {**body.set, **dict.fromkeys(body.unset)}
        if not changes:
            raise UsageError("nothing to change: give secrets to set or unset")
        overlay = await engine.set_secrets(namespace, service, changes, body.author)
        return {"secrets": sorted(overlay.secrets), "version": overlay.version}

    @app.put("/api/namespaces/{namespace}/services/{service}/env")
    async def put_env(namespace: str, service: str, body: EnvIn) -> shapes.EnvSaved:
        env = validate_env(body.env)
        saved = await engine.set_env(
            namespace, service, env, body.version, body.author, body.message
        )
        return _env_answer(*saved)

    @app.patch("/api/namespaces/{namespace}/services/{service}/env")
    async def change_env(namespace: str, service: str, body: EnvChangeIn) -> shapes.EnvSaved:
        assign = validate_env(body.set)
        saved = await engine.change_env(namespace, service, assign, body.unset, body.author)
        return _env_answer(*saved)

    @app.get("/api/namespaces/{namespace}/services/{service}/history")
    async def history(namespace: str, service: str) -> list[shapes.SettingsChange]:
        views.target(namespace, service)
        changes = await views.history((namespace, service))
        return [
            {
                "commit": c.commit,
                "author": c.author,
                "date": c.date,
                "message": c.message,
                "diff": c.diff,
            }
            for c in changes
        ]

    @app.get("/api/namespaces/{namespace}/services/{service}/logs", response_model=None)
    async def logs(
        namespace: str,
        service: str,
        build: bool = False,
        follow: bool = False,
        tail: Annotated[int | None, Query(ge=0)] = None,
        revision: Annotated[int | None, Query(ge=1, le=MAX_EVENT_ID)] = None,
    ) -> StreamingResponse:
        """The live revision's output (else the newest's); ``build``: the newest's build
        log; ``revision``: that revision's output or build log."""
        views.target(namespace, service)
        log = views.log_of((namespace, service), build, revision)
        await views.readable(log)
        if not follow:
            return StreamingResponse(views.read_log(log, tail), media_type="text/plain")
        followed = views.read_log(log, tail, lambda: _pause(stopping))
        return StreamingResponse(followed, media_type="text/plain")

    @app.get("/api/namespaces/{namespace}/services/{service}/revisions")
    async def revisions(namespace: str, service: str) -> list[shapes.Revision]:
        views.target(namespace, service)
        return [readmodel.revision_json(r) for r in views.revisions((namespace, service))]

    @app.get("/api/namespaces/{namespace}/services/{service}/kubernetes")
    async def kubernetes(namespace: str, service: str) -> PlainTextResponse:
        """The Kubernetes objects of the newest revision, as YAML (``k8s render``)."""
        reviewed = await views.kubernetes((namespace, service))
        answer = PlainTextResponse(reviewed.text, media_type="text/yaml")
        for warning in reviewed.warnings:  # one header each; the CLI prints them on stderr
            # escaped: a value (an env value a person set) may hold what a header cannot
            answer.headers.append(WARNING, warning.encode("unicode_escape").decode("ascii"))
        return answer

    @app.post("/api/namespaces/{namespace}/services/{service}/rollback")
    async def rollback(namespace: str, service: str, body: RevisionIn) -> shapes.Pinned:
        revision = await engine.rollback(namespace, service, body.ordinal)
        return {"live": revision.ordinal, "pinned": revision.ordinal}

    @app.post("/api/namespaces/{namespace}/services/{service}/promote")
    async def promote(namespace: str, service: str, body: RevisionIn) -> shapes.Pinned:
        if body.ordinal is None:
            raise UsageError("promote needs a revision (for example: promote web 4)")
        revision = await engine.promote(namespace, service, body.ordinal)
        return {"live": revision.ordinal, "pinned": revision.ordinal}

    @app.post("/api/namespaces/{namespace}/services/{service}/restart")
    async def restart(namespace: str, service: str) -> shapes.Live:
        revision = await engine.restart(namespace, service)
        return {"live": revision.ordinal}

    @app.post("/api/namespaces/{namespace}/services/{service}/unpin")
    async def unpin(namespace: str, service: str) -> shapes.Unpinned:
        revision, building = await engine.unpin(namespace, service)
        target = views.target(namespace, service)
        return {
            "live": revision.ordinal if revision else None,
            "building": building,
            "branch": target.branch,
            "head": target.sha,
        }

    @app.put("/api/namespaces/{namespace}/services/{service}/weights")
    async def weights(namespace: str, service: str, body: WeightsIn) -> shapes.Weights:
        await engine.weight(namespace, service, body.weights)
        return {"weights": views.weights((namespace, service))}

    @app.post(
        "/hooks/{provider}",
        status_code=202,
        responses={
            200: {"model": shapes.HookPong | shapes.HookIgnored},
            202: {"model": shapes.HookChecking | shapes.HookIgnored},
        },
    )
    async def hook(provider: str, request: Request) -> JSONResponse:
        def refused(message: str) -> None:
            told = refusals.refused(message, engine.clock.now())
            if told is not None:
                engine.note("webhook", told)

        try:
            kind = webhooks.Provider(provider)
        except ValueError:
            missing = {"error": "not_found", "message": f"no webhook endpoint for {provider!r}"}
            return JSONResponse(missing, 404)
        try:
            async with bodies.read(request) as body:
                return JSONResponse(*_webhook(engine, views, kind, request, body, refused))
        except webhooks.WebhookError as exc:
            refused(f"{provider} webhook rejected: {exc.message}")
            refusal: shapes.Refusal = {"error": exc.code, "message": exc.message}
            headers = {503: _RETRY, 408: _CUT}.get(exc.status)
            return JSONResponse(refusal, exc.status, headers)

    @app.get("/api/events")
    async def list_events(after: EventId = 0, namespace: str | None = None) -> list[shapes.Event]:
        return views.events(after, namespace)

    @app.get("/events", response_model=None)
    async def stream_events(namespace: str | None = None, after: EventId = 0) -> StreamingResponse:
        return StreamingResponse(
            _event_stream(views, namespace, after, stopping), media_type="text/event-stream"
        )

    @app.post("/api/gc", response_model=shapes.Collected)  # checked and ordered as it says
    async def gc() -> dict[str, int]:
        return await engine.gc()

    return app


def _webhook(
    engine: Engine,
    views: Views,
    provider: webhooks.Provider,
    request: Request,
    body: bytes,
    refused: Callable[[str], None],
) -> tuple[shapes.HookAnswer, int]:
    """(answer, status) for one webhook delivery; WebhookError for the refusals. What is
    refused before it is authenticated is only told to ``refused``, which records few."""
    name = provider.value
    headers = dict(request.headers)
    event = webhooks.parse(provider, headers, body)
    wanted = {webhooks.normalize_url(url) for url in event.repo_urls}
    repo = next((r for r in views.repos() if webhooks.normalize_url(r.url) in wanted), None)
    if repo is None:
        named = event.repo_urls[0] if event.repo_urls else event.repo_name
        message = f"{name} webhook for {shown(named)}, which is not a registered repo: ignored"
        refused(message)
        return {"ignored": message}, 202
    secret = views.webhook_secret(repo)
    if not secret:
        raise webhooks.WebhookError(
            401,
            "bad_webhook_signature",
            f"no webhook secret is set for repo {repo.name}: set it with "
            f"`branchyard repo set {repo.name} --webhook-secret -` (reads it from stdin) "
            "or set BRANCHYARD_WEBHOOK_SECRET for the daemon",
        )
    webhooks.verify(
        provider,
        headers,
        body,
        secret,
        secret_name=f"the webhook secret of repo {repo.name} (or the global one)",
    )
    if event.kind == "ping":
        return {"pong": repo.name}, 200
    if event.kind in ("push", "delete") and event.branch is not None:  # set for both
        engine.poke(repo.name)
        engine.note("webhook", f"{name} {event.kind} of {event.branch} in {repo.name}")
        return {"checking": repo.name, "branch": event.branch}, 202
    return {"ignored": f"{event.kind} event"}, 200


async def _pause(stopping: asyncio.Event) -> bool:
    """Wait one follow interval; False once the daemon is stopping."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(FOLLOW_INTERVAL):
            await stopping.wait()
    return not stopping.is_set()


async def _event_stream(
    views: Views, namespace: str | None, after: int, stopping: asyncio.Event
) -> AsyncIterator[bytes]:
    """Server-sent events: every stored event after ``after``, then new ones as they come."""
    last = after
    while True:
        for event in views.events(last, namespace):
            last = event["id"]
            yield f"id: {last}\nevent: {event['kind']}\ndata: {json.dumps(event)}\n\n".encode()
        if not await _pause(stopping):
            return
