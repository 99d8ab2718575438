"""The dashboard: every namespace's services at a glance, in a browser.

Role
----
Server-rendered pages on the API's app (Jinja2 templates in ``templates/``, a
little JavaScript and CSS in ``static/``; nothing is built on the user's
machine):

- ``GET /``: the overview, namespaces as rows (the baseline first), services as
  columns, each cell a state badge, the revision, its age and links;
- ``GET /ns/{namespace}/{service}``: one service: revisions, env (secrets
  masked), settings history with diffs, live logs, the build log of a failed
  build, and the actions (rollback, promote, unpin, env edit; restart once the
  API has it).

A browser reaches them, and the API calls they make, under its session's
``/d/KEY/`` (``/d/KEY/ns/main/app``); pages link and call below ``root``.

Both pages answer ``?part=live`` with just their changing part, rendered by the
same template, so there is one renderer: the page's script follows ``/events``
and swaps that part in when something happens, without a reload.

Who may look
------------
Pages need the API token, carried by a session cookie instead of a header:
``POST /api/dashboard/login-code`` (token-protected; ``branchyard dashboard``
calls it) makes a one-time code valid for :data:`CODE_SECONDS`, and
``GET /login?code=...`` turns it into a session; or a person pastes the token
into the form at ``/login``. Either sends the browser to the session's own
``/d/KEY/``, where its pages, their calls and its cookie live (``Path=/d/KEY/``,
so no other server on the host gets it, whatever its port). A session
remembers the token it was opened with, so rotating the token ends every
session. The cookie is HttpOnly and SameSite=Strict; requests that change
something must also carry :data:`CSRF_HEADER` with the session's own value,
which the page embeds.

Sessions and what the API's token middleware asks of them live in
:mod:`branchyard.sessions`; they are in memory, so a daemon restart logs
everyone out.
"""

from __future__ import annotations

import hmac
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

from fastapi import FastAPI, Request, Response
from fastapi.responses import HTMLResponse, RedirectResponse
from jinja2 import Environment, FileSystemLoader, select_autoescape
from starlette.staticfiles import StaticFiles

from branchyard import auth, readmodel
from branchyard.client import UNSANDBOXED
from branchyard.errors import NotFound
from branchyard.model import Revision, RevisionState
from branchyard.naming import BASELINE
from branchyard.planner import Slot
from branchyard.runtime import LogName
from branchyard.sessions import (
    CODE_SECONDS,
    SESSION_SECONDS,
    SessionPrefix,
    Sessions,
    cookie_name,
    session_cookie,
    session_of,
)
from branchyard.shapes import Event, LoginCode
from branchyard.text import without_escapes
from branchyard.vault import MASK
from branchyard.views import Views

LOG_TAIL_BYTES = 64 * 1024  # the most of a build log a page shows
MAX_FORM_BYTES = 4096

_HERE = Path(__file__).parent
_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'"
)
_PAGE_HEADERS = {
    "Content-Security-Policy": _CSP,
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-store",
}
# The parts of each page that change, as ``?part=live`` sends them (see templates/live.html).
_OVERVIEW_PARTS = ("grid", "events")
_SERVICE_PARTS = (
    "status",
    "actions",
    "revisions",
    "output",
    "build",
    "env",
    "history",
    "events",
)
RESTART_PATH = "/api/namespaces/{namespace}/services/{service}/restart"


# -- what a page shows ------------------------------------------------------------------

_TONES = {
    "live": "ok",
    "building": "busy",
    "starting": "busy",
    "pending": "busy",
    "restarting": "warn",
    "failed": "bad",
    "crashed": "bad",
}
_CAN_SERVE = (RevisionState.STOPPED, RevisionState.STAGED, RevisionState.CRASHED)  # promote


@dataclass(frozen=True)
class Cell:
    """One service in one namespace, as a grid cell and a detail page's header show it."""

    namespace: str
    service: str
    state: str  # the badge: live, building, starting, failed, crashed, restarting, ...
    revision: Revision | None  # the one the badge is about
    live: Revision | None  # the one that takes (most) traffic
    notes: tuple[str, ...]  # "v3 serves", "pinned v2", "v5 staged", ...
    reason: str  # why the shown revision failed
    pinned: int | None
    url: str

    @property
    def tone(self) -> str:
        return _TONES.get(self.state, "idle")

    @property
    def failing(self) -> bool:
        return self.tone == "bad"

    @property
    def since(self) -> float | None:
        return self.revision.changed_at if self.revision else None


def _cell(views: Views, slot: Slot) -> Cell:
    said = views.status(slot)
    head = readmodel.heading(said)
    return Cell(
        slot[0],
        slot[1],
        head.state,
        head.revision,
        said.live,
        head.notes,
        said.reason,
        said.pinned,
        views.public_url(slot),
    )


@dataclass(frozen=True)
class Row:
    namespace: str
    branch: str
    cells: dict[str, Cell]

    @property
    def failing(self) -> list[str]:
        return [service for service, cell in self.cells.items() if cell.failing]


def overview(views: Views) -> tuple[list[str], list[Row]]:
    """(service columns, namespace rows with the baseline first)."""
    rows = [
        Row(
            ns["namespace"],
            ns["branch"],
            {s: _cell(views, (ns["namespace"], s)) for s in ns["services"]},
        )
        for ns in views.namespaces()
    ]
    return sorted({service for row in rows for service in row.cells}), rows


def _age(since: float | None, now: float | None = None) -> str:
    if since is None:
        return "-"
    seconds = max(0, int((now or time.time()) - since))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def _iso(at: float | None) -> str:
    if at is None:
        return ""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(at))


async def _tail(views: Views, log: LogName, size: int = LOG_TAIL_BYTES) -> str:
    """The end of a log as a page shows it: colours and other terminal escapes left out."""
    return without_escapes((await views.tail_log(log, size)).decode(errors="replace"))


def _diff_lines(diff: str) -> list[tuple[str, str]]:
    """(kind, line) of a settings diff's body: kind is add, del or ctx; headers dropped."""
    lines: list[tuple[str, str]] = []
    body = False
    for line in diff.splitlines():
        if line.startswith("@@"):
            body = True
            continue
        if not body:
            continue
        kind = {"+": "add", "-": "del"}.get(line[:1], "ctx")
        lines.append((kind, line))
    return lines


def _last_event(views: Views) -> int:
    events = views.events(limit=1)
    return events[-1]["id"] if events else 0


def _recent_events(
    views: Views, namespace: str | None = None, service: str | None = None, count: int = 8
) -> list[Event]:
    found = views.events(0, namespace, limit=200 if service else count)
    if service is not None:
        found = [e for e in found if e["service"] == service]
    return list(reversed(found[-count:]))


def _branchyard_env(revision: Revision | None, set_by_people: Iterable[str]) -> dict[str, str]:
    """What branchyard set for a revision: BRANCHYARD_*, peer URLs, PORT; not what people
    set (shown apart), and never a secret."""
    if revision is None:
        return {}
    mine = set(set_by_people)
    env = {k: v for k, v in revision.env.items() if k not in mine}
    if revision.port:
        env["PORT"] = str(revision.port)
    return dict(sorted(env.items()))


# -- the pages -----------------------------------------------------------------------


def _templates() -> Environment:
    env = Environment(
        loader=FileSystemLoader(_HERE / "templates"),
        autoescape=select_autoescape(["html"]),
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["age"] = _age
    env.filters["iso"] = _iso
    env.globals["BASELINE"] = BASELINE
    return env


def _has_route(app: FastAPI, path: str, method: str) -> bool:
    return any(
        getattr(route, "path", None) == path and method in (getattr(route, "methods", None) or ())
        for route in app.routes
    )


def mount(app: FastAPI, views: Views, home: Path) -> None:
    """Add the dashboard's pages, login and static files to the API's ``app``. The pages
    only read (through ``views``); what they change, they change through the API."""
    sessions = Sessions()
    app.state.dashboard_sessions = sessions
    app.add_middleware(SessionPrefix)  # added last, so outermost: before the token check
    templates = _templates()
    app.mount("/static", StaticFiles(directory=_HERE / "static"), name="dashboard-static")

    def render(name: str, status: int = 200, **context: Any) -> HTMLResponse:
        page = templates.get_template(name).render(**context)
        return HTMLResponse(page, status_code=status, headers=_PAGE_HEADERS)

    def common(request: Request, page: str) -> dict[str, Any]:
        session = session_of(request)
        return {
            "page": page,
            "csrf": session.csrf if session else "",
            "logged_in": session is not None,
            "root": session.root if session else "",
            "router": views.home_url(),
            "last_event": _last_event(views),
            "now": time.time(),
            "unsandboxed": UNSANDBOXED if request.app.state.sandbox is None else "",
        }

    def current_token() -> str:
        return auth.read(home) or ""

    def start_session(request: Request, token: str) -> Response:
        session_id, session = sessions.open(token)
        response = RedirectResponse(f"{session.root}/", status_code=303)
        response.set_cookie(
            cookie_name(request),
            session_id,
            max_age=int(SESSION_SECONDS),
            path=f"{session.root}/",
            httponly=True,
            samesite="strict",
        )
        return response

    def login_page(request: Request, status: int = 200, problem: str = "") -> HTMLResponse:
        return render(
            "login.html",
            status,
            **common(request, "login"),
            problem=problem,
            token_file=str(home / auth.TOKEN_FILE),
        )

    @app.post("/api/dashboard/login-code", tags=["dashboard"])
    async def login_code() -> LoginCode:
        """A one-time code (valid 5 minutes) and the URL that logs a browser in with it."""
        code = sessions.new_code(current_token())
        return {
            "code": code,
            "url": f"{views.home_url()}login?code={code}",
            "expires_in": int(CODE_SECONDS),
        }

    @app.get("/login", include_in_schema=False)
    async def login(request: Request, code: str | None = None) -> Response:
        if code is None:
            return login_page(request)
        token = sessions.redeem(code)
        if token is None or not auth.matches(current_token(), token):
            return login_page(
                request,
                401,
                "This login link is not valid: it was used already, it is older than "
                f"{int(CODE_SECONDS // 60)} minutes, or the token changed since. Run "
                "`branchyard dashboard` for a new one, or paste the API token below.",
            )
        return start_session(request, token)

    @app.post("/login", include_in_schema=False)
    async def login_with_token(request: Request) -> Response:
        body = await request.body()
        given = ""
        if len(body) <= MAX_FORM_BYTES:
            given = parse_qs(body.decode(errors="replace")).get("token", [""])[0].strip()
        token = current_token()
        if not auth.matches(token, given):
            return login_page(
                request,
                401,
                "That is not this daemon's API token. It is the one line of "
                f"{home / auth.TOKEN_FILE}.",
            )
        return start_session(request, token)

    @app.post("/logout", include_in_schema=False)
    async def logout(request: Request) -> Response:
        body = await request.body()
        found = session_cookie(request)
        given = parse_qs(body.decode(errors="replace")).get("csrf", [""])[0]
        response = RedirectResponse("/login", status_code=303)
        if found is not None and hmac.compare_digest(found[1].csrf.encode(), given.encode()):
            sessions.close(found[0])
            response.delete_cookie(cookie_name(request), path=f"{found[1].root}/")
        return response

    @app.get("/", include_in_schema=False)
    async def overview_page(request: Request, part: str | None = None) -> HTMLResponse:
        services, rows = overview(views)
        context = {
            **common(request, "overview"),
            "services": services,
            "rows": rows,
            "events": _recent_events(views),
        }
        if part:
            return render(
                "live.html",
                parts_template="overview_parts.html",
                part_names=_OVERVIEW_PARTS,
                **context,
            )
        return render("overview.html", **context)

    @app.get("/ns/{namespace}/{service}", include_in_schema=False)
    async def service_page(
        request: Request, namespace: str, service: str, part: str | None = None
    ) -> HTMLResponse:
        slot = (namespace, service)
        try:
            target = views.target(namespace, service)
        except NotFound as exc:
            return render("missing.html", 404, **common(request, "missing"), problem=exc.message)
        cell = _cell(views, slot)
        history = views.revisions(slot)
        latest = history[0] if history else None
        settings = views.settings(namespace, service)
        person = dict(settings.env)
        secret_names = sorted(views.secrets(namespace, service).keys())  # never the values
        changes = await views.history(slot)
        failure = await views.failure(latest) if latest else None
        build_log = (
            await _tail(views, LogName(namespace, service, latest.ordinal, build=True))
            if latest
            else ""
        )
        context = {
            **common(request, "service"),
            "cell": cell,
            "target": target,
            "revisions": history,
            "latest": latest,
            "can_serve": _CAN_SERVE,
            "rollback_to": views.rollback_to(slot),
            "env": dict(sorted(person.items())),
            "settings_version": settings.version,
            "secrets": secret_names,
            "mask": MASK,
            "branchyard_env": _branchyard_env(cell.live or latest, [*person, *secret_names]),
            "changes": [(c, _diff_lines(c.diff)) for c in changes],
            "build_log": build_log,
            "failure": failure,
            "failed_output": await _tail(views, failure.log)
            if failure and not failure.build
            else "",
            "can_restart": _has_route(app, RESTART_PATH, "POST"),
            "events": _recent_events(views, namespace, service),
        }
        if part:
            return render(
                "live.html",
                parts_template="service_parts.html",
                part_names=_SERVICE_PARTS,
                **context,
            )
        return render("service.html", **context)
