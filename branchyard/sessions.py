"""Dashboard sessions, and what the API's token middleware asks of them.

A browser carries the API token in a session cookie instead of a header:
``POST /api/dashboard/login-code`` (token-protected; ``branchyard dashboard``
calls it) makes a one-time code valid for :data:`CODE_SECONDS`, and
``GET /login?code=...`` turns it into a session (see :mod:`branchyard.dashboard`).
A session remembers the token it was opened with, so rotating the token ends
every session. Requests that change something must also carry
:data:`CSRF_HEADER` with the session's own value. Sessions live in memory.

The API (:mod:`branchyard.api`) asks :func:`is_open`, :func:`session_token` and
:func:`refusal`; the dashboard opens and closes sessions. Neither imports the
other: this module is what they share.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from fastapi import Request, Response
from fastapi.responses import JSONResponse, RedirectResponse

CODE_SECONDS = 300.0  # a login code from `branchyard dashboard` is valid this long, once
SESSION_SECONDS = 12 * 3600.0  # a session ends this long after login
CSRF_HEADER = "X-Branchyard-CSRF"
COOKIE_PREFIX = "branchyard_session_"  # + the port the browser used, so daemons don't collide

_SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
_OPEN_PATHS = frozenset({"/login", "/logout"})


def _digest(secret: str) -> str:
    """Sessions and codes are kept by their hash: a lookup's timing tells nothing useful."""
    return hashlib.sha256(secret.encode()).hexdigest()


@dataclass
class Session:
    token: str  # the API token it was opened with
    csrf: str
    expires: float


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
        session = Session(token, secrets.token_urlsafe(24), self.clock() + SESSION_SECONDS)
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


def session_of(request: Request) -> Session | None:
    """The request's valid session, if it has one."""
    sessions = _sessions(request)
    if sessions is None:
        return None
    return sessions.get(request.cookies.get(cookie_name(request)))


def _csrf_ok(request: Request, session: Session) -> bool:
    given = request.headers.get(CSRF_HEADER, "")
    return hmac.compare_digest(session.csrf.encode(), given.encode())


# -- what the API's token middleware asks -----------------------------------------------


def is_open(request: Request) -> bool:
    """Paths anyone may reach: the login page and form, logout, the static files."""
    path = request.url.path
    return path in _OPEN_PATHS or path.startswith("/static/")


def session_token(request: Request) -> str | None:
    """The API token behind the request's dashboard session, for the middleware to compare
    with the current one (so a rotated token ends every session).

    None without a session, and for a request that changes something (not GET, HEAD or
    OPTIONS) but lacks the session's CSRF header.
    """
    session = session_of(request)
    if session is None:
        return None
    if request.method not in _SAFE_METHODS and not _csrf_ok(request, session):
        return None
    return session.token


def refusal(request: Request) -> Response | None:
    """How to refuse a request that carried no valid token, when the JSON 401 won't do:
    a page (the dashboard's, or the API's own ``/docs``) is sent to the login form; a
    session without its CSRF header gets a 403, which keeps ``/docs`` read-only."""
    path = request.url.path
    page = path in ("/", "/docs") or path.startswith("/ns/")
    if request.method == "GET" and page and "part" not in request.query_params:
        return RedirectResponse("/login", status_code=303)
    if session_of(request) is not None and request.method not in _SAFE_METHODS:
        return JSONResponse(
            {"error": "csrf", "message": f"missing or wrong {CSRF_HEADER} header"},
            status_code=403,
        )
    return None
