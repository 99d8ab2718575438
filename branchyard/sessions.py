"""Dashboard sessions, and what the API's token middleware asks of them.

A browser carries the API token in a session cookie instead of a header:
``POST /api/dashboard/login-code`` (token-protected; ``branchyard dashboard``
calls it) makes a one-time code valid for :data:`CODE_SECONDS`, and
``GET /login?code=...`` turns it into a session (see :mod:`branchyard.dashboard`).
A session remembers the token it was opened with, so rotating the token ends
every session. Requests that change something must also carry
:data:`CSRF_HEADER` with the session's own value. Sessions live in memory.

Where a session lives
---------------------
Cookies are scoped by host, never by port: every server on ``localhost`` (the
router's peer ports, which lead to pushed code, among them) gets the cookies of
every other, SameSite=Strict ones included, since other ports are the same
site. The one attribute that keeps a cookie from another server is its Path.
So each session has its own random key, and lives under ``/d/KEY/``: its
cookie has ``Path=/d/KEY/``, the dashboard's pages and the API calls they make
are served there too (:class:`SessionPrefix` routes ``/d/KEY/api/...`` as
``/api/...``), and a session is accepted only under its own key. A server that
does not know the key never gets the cookie, and a cookie without its key (on
any other path, or another session's) opens nothing. A session never reads
secret values (``show_secrets``): only the token does.

The API (:mod:`branchyard.api`) asks :func:`is_open`, :func:`session_token` and
:func:`refusal`; the dashboard opens and closes sessions. Neither imports the
other: this module is what they share.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from fastapi import Request, Response
from fastapi.responses import JSONResponse, RedirectResponse
from starlette.types import ASGIApp, Receive, Scope, Send

CODE_SECONDS = 300.0  # a login code from `branchyard dashboard` is valid this long, once
SESSION_SECONDS = 12 * 3600.0  # a session ends this long after login
CSRF_HEADER = "X-Branchyard-CSRF"
COOKIE_PREFIX = "branchyard_session_"  # + the port the browser used, so daemons don't collide
SECRETS_PARAMETER = "show_secrets"  # a query a session never makes: secret values need the token

_SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
_OPEN_PATHS = frozenset({"/login", "/logout"})
_UNDER_KEY = re.compile(r"/d/([A-Za-z0-9_-]{32})(/.*)", re.DOTALL)


def _digest(secret: str) -> str:
    """Sessions and codes are kept by their hash: a lookup's timing tells nothing useful."""
    return hashlib.sha256(secret.encode()).hexdigest()


@dataclass
class Session:
    token: str  # the API token it was opened with
    csrf: str
    expires: float
    key: str  # its pages, its calls and its cookie live under /d/KEY/

    @property
    def root(self) -> str:
        """Where its pages are: links and calls start with this."""
        return f"/d/{self.key}"


def under_key(path: str) -> tuple[str, str] | None:
    """(key, path below it) of a path under a session's ``/d/KEY/``; None for others."""
    found = _UNDER_KEY.fullmatch(path)
    return (found[1], found[2]) if found else None


def cookie_values(header: str, name: str) -> list[str]:
    """Every value the Cookie header gives ``name``, in order. A browser sends several
    when another server on the host set one of the same name on a shorter path (any
    port can, as cookies ignore ports); each is tried, so such a cookie cannot log
    the dashboard out."""
    values = []
    for pair in header.split(";"):
        key, equals, value = pair.partition("=")
        if equals and key.strip() == name:
            values.append(value.strip())
    return values


@dataclass
class Sessions:
    """One-time login codes and the sessions they open, in memory."""

    clock: Callable[[], float] = time.monotonic
    codes: dict[str, tuple[str, float]] = field(default_factory=dict)  # hash -> (token, expiry)
    sessions: dict[str, Session] = field(default_factory=dict)  # hash of the id -> session

    def _sweep(self) -> None:
        now = self.clock()
        self.codes = {k: v for k, v in self.codes.items() if v[1] > now}
        self.sessions = {k: s for k, s in self.sessions.items() if s.expires > now}

    def new_code(self, token: str) -> str:
        self._sweep()
        code = secrets.token_urlsafe(24)
        self.codes[_digest(code)] = (token, self.clock() + CODE_SECONDS)
        return code

    def redeem(self, code: str) -> str | None:
        """The token a code was made with, if the code is valid; it is gone either way."""
        self._sweep()
        found = self.codes.pop(_digest(code), None)
        return found[0] if found else None

    def open(self, token: str) -> tuple[str, Session]:
        self._sweep()
        session_id = secrets.token_urlsafe(32)
        session = Session(
            token,
            secrets.token_urlsafe(24),
            self.clock() + SESSION_SECONDS,
            secrets.token_urlsafe(24),
        )
        self.sessions[_digest(session_id)] = session
        return session_id, session

    def get(self, session_id: str | None) -> Session | None:
        if not session_id:
            return None
        session = self.sessions.get(_digest(session_id))
        if session is None or session.expires <= self.clock():
            return None
        return session

    def close(self, session_id: str | None) -> None:
        if session_id:
            self.sessions.pop(_digest(session_id), None)


def cookie_name(request: Request) -> str:
    return f"{COOKIE_PREFIX}{request.url.port or 80}"


def _sessions(request: Request) -> Sessions | None:
    found = getattr(request.app.state, "dashboard_sessions", None)
    return found if isinstance(found, Sessions) else None


class SessionPrefix:
    """ASGI middleware: serves the app under every session's ``/d/KEY/`` as well, so
    that a page's links and calls, and the cookie's Path, all stay under the key.
    ``/d/KEY/rest`` is routed as ``/rest``, with ``/d/KEY`` as its root path (as a
    proxy mounting the app there would say; the API docs follow it)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        found = under_key(scope["path"]) if scope["type"] == "http" else None
        if found is not None:
            scope = {**scope, "root_path": f"/d/{found[0]}"}
        await self.app(scope, receive, send)


def route_path(request: Request) -> str:
    """The request's path below its session key, if it has one: what routes see."""
    path: str = request.scope["path"]
    found = under_key(path)
    return found[1] if found else path


def session_cookie(request: Request) -> tuple[str, Session] | None:
    """(cookie value, session) of the request's valid session: only a cookie of a
    session whose own key the path is under counts."""
    sessions = _sessions(request)
    found = under_key(request.scope["path"])
    if sessions is None or found is None:
        return None
    key = found[0].encode()
    header = "; ".join(request.headers.getlist("cookie"))
    for value in cookie_values(header, cookie_name(request)):
        session = sessions.get(value)
        if session is not None and hmac.compare_digest(session.key.encode(), key):
            return value, session
    return None


def session_of(request: Request) -> Session | None:
    """The request's valid session, if it has one."""
    found = session_cookie(request)
    return found[1] if found else None


def _csrf_ok(request: Request, session: Session) -> bool:
    given = request.headers.get(CSRF_HEADER, "")
    return hmac.compare_digest(session.csrf.encode(), given.encode())


# -- what the API's token middleware asks -----------------------------------------------


def is_open(request: Request) -> bool:
    """Paths anyone may reach: the login page and form, logout, the static files."""
    path = route_path(request)
    return path in _OPEN_PATHS or path.startswith("/static/")


def session_token(request: Request) -> str | None:
    """The API token behind the request's dashboard session, for the middleware to compare
    with the current one (so a rotated token ends every session).

    None without a session (see :func:`session_cookie`), for a request that asks for
    secret values, and for one that changes something (not GET, HEAD or OPTIONS) but
    lacks the session's CSRF header.
    """
    session = session_of(request)
    if session is None or SECRETS_PARAMETER in request.query_params:
        return None
    if request.method not in _SAFE_METHODS and not _csrf_ok(request, session):
        return None
    return session.token


def refusal(request: Request) -> Response | None:
    """How to refuse a request that carried no valid token, when the JSON 401 won't do:
    a session asking for secret values gets a 403; a page (the dashboard's, or the API's
    own ``/docs``) is sent to the login form; a session without its CSRF header gets a
    403, which keeps ``/docs`` read-only."""
    session = session_of(request)
    if session is not None and SECRETS_PARAMETER in request.query_params:
        message = "a dashboard session never reads secret values; the API token does"
        return JSONResponse({"error": "forbidden", "message": message}, status_code=403)
    path = route_path(request)
    page = path in ("/", "/docs") or path.startswith("/ns/")
    if request.method == "GET" and page and "part" not in request.query_params:
        return RedirectResponse("/login", status_code=303)
    if session is not None and request.method not in _SAFE_METHODS:
        return JSONResponse(
            {"error": "csrf", "message": f"missing or wrong {CSRF_HEADER} header"},
            status_code=403,
        )
    return None
