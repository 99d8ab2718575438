"""The API: token on every call, JSON errors, webhooks, events, secrets."""

from __future__ import annotations

import hashlib
import hmac
import http.client
import json
import os
import re
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import (
    Daemon,
    ServiceRepo,
    daemon_with,
    git,
    start_daemon,
    stop_cleanly,
    wait_for,
)
from tests.githttp import GitHttpServer

pytestmark = pytest.mark.integration
PAYLOADS = Path(__file__).parent / "payloads"


def call(
    daemon: Daemon, method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None
) -> tuple[int, Any]:
    port = int(daemon.info["api"].rsplit(":", 1)[1])
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        connection.request(method, path, body=body, headers=headers or {})
        response = connection.getresponse()
        raw = response.read()
        return response.status, json.loads(raw) if raw else None
    finally:
        connection.close()


def token_of(daemon: Daemon) -> str:
    return (daemon.home / "token").read_text().strip()


def test_every_api_call_needs_the_token_and_the_cli_reads_it(daemon: Daemon) -> None:
    mode = stat.S_IMODE(os.stat(daemon.home / "token").st_mode)
    assert mode == 0o600
    status, body = call(daemon, "GET", "/api/info")
    assert status == 401 and body["error"] == "unauthorized"
    status, _ = call(daemon, "GET", "/api/info", headers={"Authorization": "Bearer nope"})
    assert status == 401
    good = {"Authorization": f"Bearer {token_of(daemon)}"}
    assert call(daemon, "GET", "/api/info", headers=good)[0] == 200
    status, spec = call(daemon, "GET", "/openapi.json", headers=good)
    assert status == 200 and "/api/repos" in spec["paths"]
    assert daemon.cli("info").returncode == 0

    assert "token rotated" in daemon.cli("token", "rotate").stdout
    assert call(daemon, "GET", "/api/info", headers=good)[0] == 401
    assert daemon.cli("info").returncode == 0


def test_an_api_off_loopback_has_a_token_from_the_first_start_and_needs_it(
    tmp_path: Path,
) -> None:
    """`up --api-host 0.0.0.0` on a new home: the token is made before the API listens."""
    running = start_daemon(tmp_path / "home", "--api-host", "0.0.0.0")
    try:
        port = int(running.info["api"].rsplit(":", 1)[1])
        listening = [line.split() for line in Path("/proc/net/tcp").read_text().splitlines()[1:]]
        assert [f"00000000:{port:04X}", "0A"] in [[row[1], row[3]] for row in listening]
        assert stat.S_IMODE(os.stat(running.home / "token").st_mode) == 0o600
        status, body = call(running, "GET", "/api/info")
        assert (status, body["error"]) == (401, "unauthorized")
        good = {"Authorization": f"Bearer {token_of(running)}"}
        assert call(running, "GET", "/api/info", headers=good)[0] == 200
    finally:
        stop_cleanly(running)


def test_docs_take_the_dashboard_session_read_only_and_send_a_browser_to_log_in(
    daemon: Daemon,
) -> None:
    status, html = daemon.page("/docs")
    assert status == 200 and "swagger-ui" in html
    assert re.search(r"url: '/d/[\w-]{32}/openapi.json'", html)  # under the session's key
    assert daemon.page("/openapi.json")[0] == 200
    assert re.search(r'<a class="api-docs" href="/d/[\w-]+/docs">API docs</a>', daemon.page("/")[1])
    assert daemon.page("/docs", session=False) == (303, "/login")
    status, body = daemon.page("/api/token/rotate", method="POST")  # no CSRF header
    assert status == 403 and json.loads(body)["error"] == "csrf"
    assert daemon.cli("info").returncode == 0  # the token was not rotated


def test_errors_are_json_with_a_stable_code(daemon: Daemon) -> None:
    good = {"Authorization": f"Bearer {token_of(daemon)}"}
    status, body = call(daemon, "GET", "/api/services?namespace=nope", headers=good)
    assert status == 404
    assert body["error"] == "not_found" and "nope" in body["message"]
    status, body = call(daemon, "DELETE", "/api/repos/ghost", headers=good)
    assert (status, body["error"]) == (404, "not_found")


def github_push(url: str, branch: str, sha: str, deleted: bool = False) -> bytes:
    payload = json.loads((PAYLOADS / "github_push.json").read_text())
    payload["ref"] = f"refs/heads/{branch}"
    payload["after"] = "0" * 40 if deleted else sha
    payload["deleted"] = deleted
    payload["repository"].update(clone_url=url, html_url=url.removesuffix(".git"))
    return json.dumps(payload).encode()


def signed(body: bytes, secret: str, event: str = "push") -> dict[str, str]:
    digest = hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
    return {
        "X-GitHub-Event": event,
        "X-Hub-Signature-256": f"sha256={digest}",
        "Content-Type": "application/json",
    }


def test_a_webhook_for_a_repo_without_a_secret_says_how_to_set_one_and_repo_set_does(
    daemon: Daemon, make_repo: Callable[..., ServiceRepo]
) -> None:
    app = make_repo("app")
    daemon.cli("repo", "add", str(app.origin))
    sha = git("rev-parse", "HEAD", cwd=app.clone)
    body = github_push(str(app.origin), "main", sha)

    status, answer = call(daemon, "POST", "/hooks/github", body, signed(body, "s3cret"))
    assert status == 401
    assert "`branchyard repo set app --webhook-secret -`" in answer["message"]

    done = daemon.cli("repo", "set", "app", "--webhook-secret", "s3cret")
    assert done.stdout == "app: webhook secret set\n"
    status, answer = call(daemon, "POST", "/hooks/github", body, signed(body, "s3cret"))
    assert (status, answer["checking"]) == (202, "app")
    assert "main" in daemon.cli("repo", "ls").stdout  # the default branch is kept


def added_then_pushed(running: Daemon, app: ServiceRepo, url: str) -> str:
    """Add ``app`` by ``url`` with the webhook secret ``s3cret``, wait until main serves,
    then push a commit to a new branch bugfix (which a webhook has to announce): its sha."""
    running.cli("repo", "add", url, "--webhook-secret", "s3cret")
    wait_for(lambda: running.answer("app"), 60, "app live")
    app.checkout("bugfix")
    sha = app.commit({"x": "1"}, "on bugfix")
    app.push("bugfix")
    return sha


def test_a_signed_github_push_is_deployed_without_waiting_for_the_poll(
    tmp_path: Path, make_repo: Callable[..., ServiceRepo]
) -> None:
    app = make_repo("app")
    running = start_daemon(tmp_path / "home", "--poll-interval", "3600")
    try:
        with GitHttpServer(app.origin.parent) as server:
            url = f"{server.url}/app.git"
            sha = added_then_pushed(running, app, url)
            body = github_push(url, "bugfix", sha)

            status, answer = call(running, "POST", "/hooks/github", body, signed(body, "wrong"))
            assert status == 401 and "X-Hub-Signature-256" in answer["message"]
            status, answer = call(running, "POST", "/hooks/github", body, signed(body, "s3cret"))
            assert (status, answer["checking"]) == (202, "app")
            wait_for(lambda: running.serves("app", "bugfix", sha), 30, "deployed via webhook")

            git("push", "-q", "origin", "--delete", "bugfix", cwd=app.clone)
            body = github_push(url, "bugfix", sha, deleted=True)
            assert call(running, "POST", "/hooks/github", body, signed(body, "s3cret"))[0] == 202
            wait_for(lambda: "bugfix" not in running.cli("ns", "ls").stdout, 30, "removed")

            ping = (PAYLOADS / "github_ping.json").read_bytes()
            ping_json = json.loads(ping)
            ping_json["repository"]["clone_url"] = url
            ping = json.dumps(ping_json).encode()
            assert (
                call(running, "POST", "/hooks/github", ping, signed(ping, "s3cret", "ping"))[0]
                == 200
            )

            other = github_push("http://127.0.0.1:1/else.git", "main", sha)
            assert call(running, "POST", "/hooks/github", other, signed(other, "x"))[0] == 202
            assert (
                call(running, "POST", "/hooks/github", b"{nope", signed(b"{nope", "s3"))[0] == 400
            )
            huge = b" " * (6 * 1024 * 1024)
            assert call(running, "POST", "/hooks/github", huge, signed(huge, "s3cret"))[0] == 413

        events = running.cli("events").stdout
        # Refusals before authentication: the first recorded, the rest within a minute not.
        assert "webhook rejected" in events and "does not match" in events
        assert "not a registered repo" not in events and "over the limit" not in events
        assert "github push of bugfix in app" in events and "live" in events
    finally:
        stop_cleanly(running)


def forge_push(provider: str, url: str, branch: str, sha: str | None) -> bytes:
    """The example payload of GitLab's or Gitea's push webhook for ``url``'s ``branch`` at
    ``sha`` (None: the push deleted the branch), every URL it names for the repo ``url``."""
    name = {"gitlab": "gitlab_delete.json", "gitea": "gitea_push_delete.json"}
    pushed = {"gitlab": "gitlab_push.json", "gitea": "gitea_push.json"}
    payload = json.loads((PAYLOADS / (pushed if sha else name)[provider]).read_text())
    payload["ref"] = f"refs/heads/{branch}"
    payload["after"] = sha or "0" * 40
    if provider == "gitlab":
        payload["checkout_sha"] = sha
        for repository in (payload["project"], payload["repository"]):
            for key in ("git_http_url", "git_ssh_url", "http_url", "ssh_url", "url"):
                repository[key] = url
            for key in ("web_url", "homepage"):
                repository[key] = url.removesuffix(".git")
            repository["path_with_namespace"] = "app"
    else:
        payload["repository"].update(
            clone_url=url, ssh_url=url, html_url=url.removesuffix(".git"), name="app"
        )
    return json.dumps(payload).encode()


def forge_signed(provider: str, body: bytes, secret: str) -> dict[str, str]:
    """The headers GitLab (its secret token, as is) or Gitea (an HMAC-SHA256 of the body,
    in hex) sends with ``body``."""
    if provider == "gitlab":
        return {"X-Gitlab-Event": "Push Hook", "X-Gitlab-Token": secret}
    digest = hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
    return {"X-Gitea-Event": "push", "X-Gitea-Signature": digest}


@pytest.mark.parametrize(
    ("provider", "header"), [("gitlab", "X-Gitlab-Token"), ("gitea", "X-Gitea-Signature")]
)
def test_a_signed_gitlab_or_gitea_push_is_deployed_without_waiting_for_the_poll(
    tmp_path: Path, make_repo: Callable[..., ServiceRepo], provider: str, header: str
) -> None:
    app = make_repo("app")
    hook = f"/hooks/{provider}"
    with (
        GitHttpServer(app.origin.parent) as server,
        daemon_with(tmp_path / "home", "--poll-interval", "3600") as running,
    ):
        url = f"{server.url}/app.git"
        sha = added_then_pushed(running, app, url)
        body = forge_push(provider, url, "bugfix", sha)

        for wrong in ("wrong", "s3cre", "s3cretx"):
            status, answer = call(running, "POST", hook, body, forge_signed(provider, body, wrong))
            assert status == 401 and header in answer["message"], answer
        if provider == "gitea":  # GitLab sends its token as it is: it signs no body
            changed = body.replace(b"refs/heads/bugfix", b"refs/heads/bugfiy")
            headers = forge_signed(provider, body, "s3cret")
            assert call(running, "POST", hook, changed, headers)[0] == 401
        assert "bugfix" not in running.cli("ns", "ls").stdout  # none of them checked the repo
        status, answer = call(running, "POST", hook, body, forge_signed(provider, body, "s3cret"))
        assert (status, answer["checking"]) == (202, "app")
        wait_for(lambda: running.serves("app", "bugfix", sha), 30, f"deployed via {provider}")

        git("push", "-q", "origin", "--delete", "bugfix", cwd=app.clone)
        body = forge_push(provider, url, "bugfix", None)
        assert call(running, "POST", hook, body, forge_signed(provider, body, "s3cret"))[0] == 202
        wait_for(lambda: "bugfix" not in running.cli("ns", "ls").stdout, 30, "removed")
        events = running.cli("events").stdout
    assert f"{provider} push of bugfix in app" in events


def test_secrets_are_given_to_the_service_and_never_shown(
    daemon: Daemon, make_repo: Callable[..., ServiceRepo]
) -> None:
    app = make_repo("app")
    daemon.cli("repo", "add", str(app.origin))
    wait_for(lambda: daemon.answer("app"), 30, "app live")
    daemon.cli("env", "set", "--secret", "app", "GREETING=hunter2-secret")
    wait_for(
        lambda: daemon.answer("app")["env"].get("GREETING") == "hunter2-secret",
        30,
        "the service sees it",
    )

    listing = daemon.cli("env", "ls", "app").stdout
    assert "GREETING=********  (secret)" in listing
    assert "hunter2" in daemon.cli("env", "ls", "--show-secrets", "app").stdout
    history = daemon.cli("history", "app").stdout
    assert "set secret GREETING" in history and "hunter2" not in history
    for text in (
        daemon.cli("ps", "--format", "json").stdout,
        daemon.cli("revisions", "app", "--format", "json").stdout,
        daemon.cli("events").stdout,
    ):
        assert "hunter2" not in text
    assert b"hunter2" not in (daemon.home / "state.db").read_bytes()
    settings = b"".join(
        p.read_bytes() for p in (daemon.home / "settings").rglob("*") if p.is_file()
    )
    assert b"hunter2" not in settings
    assert stat.S_IMODE(os.stat(daemon.home / "secrets.json").st_mode) == 0o600

    daemon.cli("env", "unset", "app", "GREETING")
    wait_for(lambda: "GREETING" not in daemon.answer("app")["env"], 30, "unset")
    assert "secret" not in daemon.cli("env", "ls", "app").stdout


def test_events_stream_as_server_sent_events(
    daemon: Daemon, make_repo: Callable[..., ServiceRepo]
) -> None:
    port = int(daemon.info["api"].rsplit(":", 1)[1])
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    connection.request("GET", "/events", headers={"Authorization": f"Bearer {token_of(daemon)}"})
    response = connection.getresponse()
    assert response.getheader("content-type", "").startswith("text/event-stream")
    app = make_repo("app")
    daemon.cli("repo", "add", str(app.origin))
    events: list[dict[str, str]] = []  # each event's fields, as they come
    fields: dict[str, str] = {}
    while not events or events[-1].get("event") != "live":
        line = response.readline().decode()
        assert line, f"the stream ended before a live event, after {events}"
        if line == "\n":
            events.append(fields)
            fields = {}
        else:
            name, _, value = line.rstrip("\n").partition(": ")
            fields[name] = value
    connection.close()
    live = json.loads(events[-1]["data"])
    assert (live["kind"], live["namespace"], live["service"]) == ("live", "main", "app")
    ids = [int(event["id"]) for event in events]
    assert ids == sorted(set(ids)) and live["id"] == ids[-1]  # each once, in order


class StatusRecorder:
    """A loopback stand-in for the forge's API that records every request."""

    def __init__(self) -> None:
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        self.requests: list[tuple[str, dict[str, str], dict[str, Any]]] = []
        recorder = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                recorder.requests.append((self.path, dict(self.headers), json.loads(body)))
                self.send_response(201)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"{}")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"


def test_revision_states_are_reported_as_github_commit_statuses(
    tmp_path: Path, make_repo: Callable[..., ServiceRepo], monkeypatch: pytest.MonkeyPatch
) -> None:
    app = make_repo("app")
    served = tmp_path / "srv"
    served.mkdir()
    (served / "acme").symlink_to(app.origin.parent)
    forge = StatusRecorder()
    monkeypatch.setenv("BRANCHYARD_STATUS_FORGE", "github")
    monkeypatch.setenv("BRANCHYARD_STATUS_TOKEN", "forge-token")
    monkeypatch.setenv("BRANCHYARD_STATUS_API", forge.url)
    with GitHttpServer(served) as server:
        running = start_daemon(tmp_path / "home", "--poll-interval", "1")
        try:
            running.cli("repo", "add", f"{server.url}/acme/app.git")
            sha = wait_for(lambda: running.answer("app")["env"]["BRANCHYARD_REVISION"], 60)
            wait_for(
                lambda: any(b["state"] == "success" for _, _, b in forge.requests),
                15,
                "a success status",
            )
        finally:
            stop_cleanly(running)
    forge.server.shutdown()
    path, headers, body = next(r for r in forge.requests if r[2]["state"] == "success")
    assert path == f"/repos/acme/app/statuses/{sha}"
    assert headers["Authorization"] == "Bearer forge-token"
    assert body["context"] == "branchyard/main"
    assert body["target_url"] == f"http://app.main.localhost:{running.router_port}/"
    assert forge.requests[0][2]["state"] == "pending"
