"""Commit status: the exact requests per forge, then the real transport against loopback."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from branchyard.model import RevisionState
from branchyard.status import (
    Forge,
    StatusConfig,
    StatusReporter,
    StatusRequest,
    build_request,
    config_from_env,
    forge_state,
    http_transport,
    repo_path,
)
from tests.conftest import free_port

SHA = "3f2c1ab9d8e7f6a5b4c3d2e1f0a9b8c7d6e5f4a3"
TARGET = "http://app.bugfix.localhost:7080/"
GITHUB = StatusConfig(Forge.GITHUB, "ghp_secret", "https://api.github.com")
GITLAB = StatusConfig(Forge.GITLAB, "glpat-secret", "https://gitlab.example.com/api/v4")
GITEA = StatusConfig(Forge.GITEA, "gitea-secret", "https://gitea.example.com/api/v1/")


@pytest.mark.parametrize(
    ("url", "path"),
    [
        ("https://github.com/acme/app", "acme/app"),
        ("https://github.com/acme/app.git", "acme/app"),
        ("https://github.com/acme/app/", "acme/app"),
        ("https://user:pw@gitea.example.com:3000/acme/other_app.git", "acme/other_app"),
        ("ssh://git@github.com/acme/app.git", "acme/app"),
        ("ssh://git@gitlab.example.com:2222/group/sub/app.git", "group/sub/app"),
        ("git@github.com:acme/app.git", "acme/app"),
        ("git@gitlab.example.com:group/sub/app.git", "group/sub/app"),
        ("gitlab.example.com:group/app", "group/app"),
        ("/srv/git/app.git", None),
        ("./app", None),
        ("app", None),
        ("file:///srv/git/acme/app.git", None),
        ("https://github.com/app", None),
        ("https://github.com/", None),
        ("", None),
    ],
)
def test_repo_path_reads_the_forge_path_from_remote_urls_and_none_from_local_paths(
    url: str, path: str | None
) -> None:
    assert repo_path(url) == path


# What each forge's commit status API accepts as a state, from its documentation.
FORGE_WORDS = {
    Forge.GITHUB: {"error", "failure", "pending", "success"},
    Forge.GITLAB: {"pending", "running", "success", "failed", "canceled", "skipped"},
    Forge.GITEA: {"pending", "success", "error", "failure", "warning"},
}
NOTHING_TO_SAY = {RevisionState.SUPERSEDED, RevisionState.STOPPED}  # never reported


@pytest.mark.parametrize("forge", list(Forge), ids=lambda forge: forge.value)
def test_every_revision_state_has_a_word_in_every_forge(forge: Forge) -> None:
    said = {state: forge_state(forge, state) for state in RevisionState}
    assert {state for state, word in said.items() if word is None} == NOTHING_TO_SAY
    spoken = {word for word in said.values() if word is not None}
    assert spoken <= FORGE_WORDS[forge], spoken - FORGE_WORDS[forge]


@pytest.mark.parametrize(
    ("state", "github", "gitlab", "gitea"),
    [
        ("building", "pending", "pending", "pending"),
        ("starting", "pending", "running", "pending"),
        ("staged", "pending", "pending", "pending"),
        ("live", "success", "success", "success"),
        ("failed", "failure", "failed", "failure"),
        ("crashed", "failure", "failed", "failure"),
    ],
)
def test_each_revision_state_is_sent_in_each_forges_own_words(
    state: str, github: str, gitlab: str, gitea: str
) -> None:
    for config, expected in ((GITHUB, github), (GITLAB, gitlab), (GITEA, gitea)):
        request = build_request(config, "git@host:acme/app.git", SHA, state, TARGET, "d")
        assert request is not None
        assert json.loads(request.body)["state"] == expected, config.forge


def test_a_github_status_is_a_post_with_a_bearer_token_and_the_api_version() -> None:
    request = build_request(
        GITHUB, "https://github.com/acme/app.git", SHA, "live", TARGET, "live in bugfix"
    )
    assert request == StatusRequest(
        method="POST",
        url=f"https://api.github.com/repos/acme/app/statuses/{SHA}",
        headers={
            "Content-Type": "application/json",
            "User-Agent": "branchyard",
            "Accept": "application/vnd.github+json",
            "Authorization": "Bearer ghp_secret",
            "X-GitHub-Api-Version": "2022-11-28",
        },
        body=json.dumps(
            {
                "state": "success",
                "target_url": TARGET,
                "description": "live in bugfix",
                "context": "branchyard",
            },
            separators=(",", ":"),
        ).encode(),
    )


def test_a_gitlab_status_names_the_project_by_its_encoded_path_and_uses_a_private_token() -> None:
    request = build_request(
        GITLAB,
        "git@gitlab.example.com:group/sub/app.git",
        SHA,
        "starting",
        TARGET,
        "starting in bugfix",
        context="branchyard/bugfix",
    )
    assert request is not None
    assert request.method == "POST"
    assert request.url == (
        f"https://gitlab.example.com/api/v4/projects/group%2Fsub%2Fapp/statuses/{SHA}"
    )
    assert request.headers == {
        "Content-Type": "application/json",
        "User-Agent": "branchyard",
        "Accept": "application/json",
        "PRIVATE-TOKEN": "glpat-secret",
    }
    assert json.loads(request.body) == {
        "state": "running",
        "target_url": TARGET,
        "description": "starting in bugfix",
        "name": "branchyard/bugfix",
    }


def test_a_gitlab_under_a_relative_root_drops_the_root_from_the_project_path() -> None:
    config = StatusConfig(Forge.GITLAB, "t", "https://example.com/gitlab/api/v4")
    request = build_request(
        config, "https://example.com/gitlab/group/app.git", SHA, "live", TARGET, "d"
    )
    assert request is not None
    assert request.url == f"https://example.com/gitlab/api/v4/projects/group%2Fapp/statuses/{SHA}"


def test_a_gitea_status_uses_a_token_authorization_and_the_repos_last_two_segments() -> None:
    request = build_request(
        GITEA, "https://gitea.example.com/git/acme/app.git", SHA, "failed", TARGET, "build failed"
    )
    assert request is not None
    assert request.method == "POST"
    assert request.url == f"https://gitea.example.com/api/v1/repos/acme/app/statuses/{SHA}"
    assert request.headers == {
        "Content-Type": "application/json",
        "User-Agent": "branchyard",
        "Accept": "application/json",
        "Authorization": "token gitea-secret",
    }
    assert json.loads(request.body) == {
        "state": "failure",
        "target_url": TARGET,
        "description": "build failed",
        "context": "branchyard",
    }


@pytest.mark.parametrize("state", ["superseded", "stopped"])
@pytest.mark.parametrize("config", [GITHUB, GITLAB, GITEA], ids=str)
def test_a_superseded_or_stopped_revision_has_nothing_to_report(
    config: StatusConfig, state: str
) -> None:
    assert build_request(config, "git@host:acme/app.git", SHA, state, TARGET, "d") is None


@pytest.mark.parametrize("url", ["/srv/git/app.git", "file:///srv/git/acme/app.git"])
def test_a_local_repo_has_no_forge_to_report_to(url: str) -> None:
    assert build_request(GITHUB, url, SHA, "live", TARGET, "d") is None


def test_a_long_description_is_cut_to_140_characters_and_an_empty_target_is_left_out() -> None:
    request = build_request(GITHUB, "git@host:acme/app.git", SHA, "failed", "", "x" * 500)
    assert request is not None
    payload = json.loads(request.body)
    assert "target_url" not in payload
    assert len(payload["description"]) == 140
    assert payload["description"].endswith("…")


@pytest.mark.parametrize(("state", "sha"), [("exploded", SHA), ("live", "HEAD; rm -rf")])
def test_an_unknown_state_or_a_sha_that_is_not_hex_is_refused(state: str, sha: str) -> None:
    with pytest.raises(ValueError):
        build_request(GITHUB, "git@host:acme/app.git", sha, state, TARGET, "d")


def test_the_token_never_shows_in_a_configs_repr() -> None:
    assert "ghp_secret" not in repr(GITHUB)


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, None),
        ({"BRANCHYARD_STATUS_FORGE": "github"}, None),
        ({"BRANCHYARD_STATUS_TOKEN": "t"}, None),
        ({"BRANCHYARD_STATUS_FORGE": "", "BRANCHYARD_STATUS_TOKEN": "t"}, None),
        (
            {"BRANCHYARD_STATUS_FORGE": "github", "BRANCHYARD_STATUS_TOKEN": "t"},
            StatusConfig(Forge.GITHUB, "t", "https://api.github.com"),
        ),
        (
            {
                "BRANCHYARD_STATUS_FORGE": "GitLab",
                "BRANCHYARD_STATUS_TOKEN": "t",
                "BRANCHYARD_STATUS_API": "https://gitlab.example.com/api/v4/",
            },
            StatusConfig(Forge.GITLAB, "t", "https://gitlab.example.com/api/v4"),
        ),
        (
            {
                "BRANCHYARD_STATUS_FORGE": "forgejo",
                "BRANCHYARD_STATUS_TOKEN": "t",
                "BRANCHYARD_STATUS_API": "https://codeberg.org/api/v1",
            },
            StatusConfig(Forge.GITEA, "t", "https://codeberg.org/api/v1"),
        ),
    ],
)
def test_config_from_env_is_off_unless_a_forge_and_a_token_are_set(
    env: dict[str, str], expected: StatusConfig | None
) -> None:
    assert config_from_env(env) == expected


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"BRANCHYARD_STATUS_FORGE": "bitbucket"}, "BRANCHYARD_STATUS_FORGE='bitbucket'"),
        ({"BRANCHYARD_STATUS_FORGE": "gitlab"}, "BRANCHYARD_STATUS_API is required for gitlab"),
        ({"BRANCHYARD_STATUS_FORGE": "gitea"}, "BRANCHYARD_STATUS_API is required for gitea"),
        (
            {"BRANCHYARD_STATUS_FORGE": "github", "BRANCHYARD_STATUS_API": "api.github.com"},
            "is not an http(s) URL",
        ),
    ],
)
def test_config_from_env_names_the_variable_that_cannot_work(
    env: dict[str, str], message: str
) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        config_from_env({"BRANCHYARD_STATUS_TOKEN": "t", **env})


# ---- the real transport, against a real HTTP server on loopback ----


@dataclass
class Recorded:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class Forgery:
    """An HTTP server on 127.0.0.1 that records every request and answers ``status``."""

    url: str
    requests: list[Recorded] = field(default_factory=list)
    status: int = 201


@pytest.fixture
def forge() -> Iterator[Forgery]:
    recorder = Forgery("")

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            recorder.requests.append(
                Recorded(self.command, self.path, dict(self.headers.items()), body)
            )
            answer = b'{"message":"Bad credentials"}' if recorder.status >= 400 else b"{}"
            self.send_response(recorder.status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(answer)))
            self.end_headers()
            self.wfile.write(answer)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, args=(0.01,), daemon=True)
    thread.start()
    recorder.url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        yield recorder
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def _report(
    reporter: StatusReporter,
    repo_url: str,
    state: str = "live",
    description: str = "live in bugfix",
) -> bool:
    return asyncio.run(reporter.report(repo_url, SHA, state, TARGET, description))


@pytest.mark.parametrize(
    ("forge_kind", "api_path", "repo_url", "path", "auth", "body"),
    [
        (
            Forge.GITHUB,
            "",
            "git@github.com:acme/app.git",
            f"/repos/acme/app/statuses/{SHA}",
            {
                "Authorization": "Bearer s3cret",
                "Accept": "application/vnd.github+json",
                "X-GitHub-Api-Version": "2022-11-28",
            },
            {"state": "success", "context": "branchyard"},
        ),
        (
            Forge.GITLAB,
            "/api/v4",
            "https://gitlab.example.com/group/sub/app.git",
            f"/api/v4/projects/group%2Fsub%2Fapp/statuses/{SHA}",
            {"PRIVATE-TOKEN": "s3cret", "Accept": "application/json"},
            {"state": "success", "name": "branchyard"},
        ),
        (
            Forge.GITEA,
            "/api/v1",
            "ssh://git@gitea.example.com:2222/acme/app.git",
            f"/api/v1/repos/acme/app/statuses/{SHA}",
            {"Authorization": "token s3cret", "Accept": "application/json"},
            {"state": "success", "context": "branchyard"},
        ),
    ],
    ids=["github", "gitlab", "gitea"],
)
def test_the_reporter_sends_exactly_the_forges_request_over_http(
    forge: Forgery,
    forge_kind: Forge,
    api_path: str,
    repo_url: str,
    path: str,
    auth: dict[str, str],
    body: dict[str, str],
) -> None:
    errors: list[str] = []
    config = StatusConfig(forge_kind, "s3cret", forge.url + api_path)
    reporter = StatusReporter(config, http_transport(timeout=2), errors.append)
    assert _report(reporter, repo_url) is True
    assert errors == []
    [request] = forge.requests
    assert (request.method, request.path) == ("POST", path)
    for name, value in {
        **auth,
        "Content-Type": "application/json",
        "User-Agent": "branchyard",
    }.items():
        assert request.headers[name] == value, name
    assert request.json() == {"target_url": TARGET, "description": "live in bugfix", **body}


def test_a_refused_token_calls_on_error_with_the_http_status_and_returns_false(
    forge: Forgery,
) -> None:
    forge.status = 401
    errors: list[str] = []
    config = StatusConfig(Forge.GITHUB, "wrong", forge.url)
    reporter = StatusReporter(config, http_transport(timeout=2), errors.append)
    assert _report(reporter, "git@github.com:acme/app.git") is False
    assert len(forge.requests) == 1
    [message] = errors
    assert message.startswith("github status for app@3f2c1ab: HTTP 401 (")
    assert "BRANCHYARD_STATUS_TOKEN" in message
    assert "wrong" not in message
    assert "\n" not in message


def test_an_unreachable_forge_calls_on_error_and_returns_false() -> None:
    port = free_port()  # nothing listens on it, so the connection is refused
    errors: list[str] = []
    config = StatusConfig(Forge.GITEA, "s3cret", f"http://127.0.0.1:{port}/api/v1")
    reporter = StatusReporter(config, http_transport(timeout=2), errors.append)
    assert _report(reporter, "git@gitea:acme/app.git") is False
    [message] = errors
    assert message.startswith(f"gitea status for app@3f2c1ab: cannot reach http://127.0.0.1:{port}")
    assert "\n" not in message


def test_without_a_config_nothing_is_sent(forge: Forgery) -> None:
    errors: list[str] = []
    reporter = StatusReporter(None, http_transport(timeout=2), errors.append)
    assert reporter.enabled is False
    assert _report(reporter, "git@github.com:acme/app.git") is False
    assert forge.requests == []
    assert errors == []


def test_nothing_is_sent_for_a_stopped_revision_or_a_local_repo(forge: Forgery) -> None:
    reporter = StatusReporter(StatusConfig(Forge.GITHUB, "t", forge.url), http_transport(2))
    assert _report(reporter, "git@github.com:acme/app.git", state="stopped") is False
    assert _report(reporter, "/srv/git/app.git") is False
    assert forge.requests == []


def test_the_same_report_is_not_sent_twice_but_a_changed_one_is(forge: Forgery) -> None:
    reporter = StatusReporter(StatusConfig(Forge.GITHUB, "t", forge.url), http_transport(2))
    repo = "git@github.com:acme/app.git"
    assert _report(reporter, repo, "building", "building") is True
    assert _report(reporter, repo, "building", "building") is False
    assert _report(reporter, repo, "starting", "starting") is True
    assert [r.json()["description"] for r in forge.requests] == ["building", "starting"]


def test_gitlab_never_gets_the_same_state_twice_in_a_row(forge: Forgery) -> None:
    """GitLab answers 400 to pending after pending: staged after building is not sent."""
    config = StatusConfig(Forge.GITLAB, "t", forge.url + "/api/v4")
    reporter = StatusReporter(config, http_transport(2))
    repo = "git@gitlab:group/app.git"
    assert _report(reporter, repo, "building", "building") is True
    assert _report(reporter, repo, "staged", "pinned to v3") is False
    assert _report(reporter, repo, "live", "live") is True
    assert [r.json()["state"] for r in forge.requests] == ["pending", "success"]


def test_a_failed_report_is_sent_again_next_time(forge: Forgery) -> None:
    errors: list[str] = []
    config = StatusConfig(Forge.GITHUB, "t", forge.url)
    reporter = StatusReporter(config, http_transport(2), errors.append)
    forge.status = 502
    assert _report(reporter, "git@github.com:acme/app.git") is False
    forge.status = 201
    assert _report(reporter, "git@github.com:acme/app.git") is True
    assert len(forge.requests) == 2
    assert errors == ["github status for app@3f2c1ab: HTTP 502"]


def test_a_transport_that_breaks_never_raises_out_of_report() -> None:
    def broken(method: str, url: str, headers: object, body: bytes) -> int:
        raise RuntimeError("boom")

    errors: list[str] = []
    reporter = StatusReporter(GITHUB, broken, errors.append)
    assert _report(reporter, "git@github.com:acme/app.git") is False
    assert errors == ["github status for app@3f2c1ab: RuntimeError: boom"]
