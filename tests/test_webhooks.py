"""Unit tests for the webhook layer: signatures, payloads of each provider, URL matching.

The example payloads in ``tests/payloads`` follow the providers' documented formats
(GitHub's push, delete and ping events; GitLab's Push Hook and Tag Push Hook; Gitea's
push, create and delete events), trimmed of fields branchyard does not read.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from branchyard.webhooks import (
    MAX_BODY,
    Provider,
    PushEvent,
    Refusals,
    WebhookError,
    check_size,
    event_type,
    normalize_url,
    parse,
    verify,
)

PAYLOADS = Path(__file__).parent / "payloads"
SECRET = "It's a Secret to Everybody"
ZEROS = "0" * 40

GITHUB_URLS = (
    "https://github.com/acme/app.git",
    "git@github.com:acme/app.git",
    "git://github.com/acme/app.git",
    "https://github.com/acme/app",
)
GITLAB_URLS = (
    "https://gitlab.example.com/team/app.git",
    "git@gitlab.example.com:team/app.git",
    "https://gitlab.example.com/team/app",
)
GITEA_URLS = (
    "https://git.example.com/team/app.git",
    "ssh://git@git.example.com:2222/team/app.git",
    "https://git.example.com/team/app",
)

GITHUB, GITLAB, GITEA = Provider.GITHUB, Provider.GITLAB, Provider.GITEA


def payload(name: str) -> bytes:
    return (PAYLOADS / name).read_bytes()


def signed(provider: Provider, body: bytes, secret: str = SECRET) -> dict[str, str]:
    """The headers the provider sends with ``body``, computed from its documentation."""
    digest = hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
    if provider is GITHUB:
        return {"X-GitHub-Event": "push", "X-Hub-Signature-256": f"sha256={digest}"}
    if provider is GITLAB:
        return {"X-Gitlab-Event": "Push Hook", "X-Gitlab-Token": secret}
    return {"X-Gitea-Event": "push", "X-Gitea-Signature": digest}


def rejection(call: object, *args: object, **kwargs: object) -> WebhookError:
    assert callable(call)
    with pytest.raises(WebhookError) as caught:
        call(*args, **kwargs)
    return caught.value


# --- every example payload parses to exactly what it means ------------------------------

EXAMPLES = [
    pytest.param(
        GITHUB,
        {"X-GitHub-Event": "push"},
        "github_push.json",
        PushEvent(
            GITHUB, "push", GITHUB_URLS, "app", "bugfix", "8f19f543155a7c0fa552c1ae34117768026798ff"
        ),
        id="github-push",
    ),
    pytest.param(
        GITHUB,
        {"X-GitHub-Event": "push"},
        "github_delete.json",
        PushEvent(GITHUB, "delete", GITHUB_URLS, "app", "bugfix", None),
        id="github-push-deleting-a-branch",
    ),
    pytest.param(
        GITHUB,
        {"X-GitHub-Event": "delete"},
        "github_delete_event.json",
        PushEvent(GITHUB, "delete", GITHUB_URLS, "app", "bugfix", None),
        id="github-delete-event",
    ),
    pytest.param(
        GITHUB,
        {"X-GitHub-Event": "push"},
        "github_tag.json",
        PushEvent(
            GITHUB, "tag", GITHUB_URLS, "app", None, "62e371ead38bd62b973d71e7814cf169ac0e684f"
        ),
        id="github-tag",
    ),
    pytest.param(
        GITHUB,
        {"X-GitHub-Event": "ping"},
        "github_ping.json",
        PushEvent(GITHUB, "ping", GITHUB_URLS, "app", None, None),
        id="github-ping",
    ),
    pytest.param(
        GITLAB,
        {"X-Gitlab-Event": "Push Hook"},
        "gitlab_push.json",
        PushEvent(
            GITLAB, "push", GITLAB_URLS, "app", "bugfix", "9493ab4644d65fb595dd812abc7fb7edbfc6634a"
        ),
        id="gitlab-push",
    ),
    pytest.param(
        GITLAB,
        {"X-Gitlab-Event": "Push Hook"},
        "gitlab_delete.json",
        PushEvent(GITLAB, "delete", GITLAB_URLS, "app", "bugfix", None),
        id="gitlab-push-deleting-a-branch",
    ),
    pytest.param(
        GITLAB,
        {"X-Gitlab-Event": "Tag Push Hook"},
        "gitlab_tag.json",
        PushEvent(
            GITLAB, "tag", GITLAB_URLS, "app", None, "1d9f0f02e526e7e0ce877e69649265dd7195021c"
        ),
        id="gitlab-tag",
    ),
    pytest.param(
        GITEA,
        {"X-Gitea-Event": "push"},
        "gitea_push.json",
        PushEvent(
            GITEA, "push", GITEA_URLS, "app", "bugfix", "2d460b2697286e329782d49c3b9defe3b967baec"
        ),
        id="gitea-push",
    ),
    pytest.param(
        GITEA,
        {"X-Forgejo-Event": "push"},
        "gitea_push.json",
        PushEvent(
            GITEA, "push", GITEA_URLS, "app", "bugfix", "2d460b2697286e329782d49c3b9defe3b967baec"
        ),
        id="forgejo-push",
    ),
    pytest.param(
        GITEA,
        {"X-Gitea-Event": "delete"},
        "gitea_delete.json",
        PushEvent(GITEA, "delete", GITEA_URLS, "app", "bugfix", None),
        id="gitea-delete-event",
    ),
    pytest.param(
        GITEA,
        {"X-Gitea-Event": "push"},
        "gitea_push_delete.json",
        PushEvent(GITEA, "delete", GITEA_URLS, "app", "bugfix", None),
        id="gitea-push-deleting-a-branch",
    ),
    pytest.param(
        GITEA,
        {"X-Gitea-Event": "push"},
        "gitea_tag.json",
        PushEvent(
            GITEA, "tag", GITEA_URLS, "app", None, "1540264e143dc9fb3da1c1e33d5263e4f56dd951"
        ),
        id="gitea-tag",
    ),
    pytest.param(
        GITEA,
        {"X-Gitea-Event": "create"},
        "gitea_create.json",
        PushEvent(GITEA, "other", GITEA_URLS, "app", None, None),
        id="gitea-create-is-other",
    ),
]


@pytest.mark.parametrize(("provider", "headers", "name", "expected"), EXAMPLES)
def test_each_example_payload_parses_to_the_event_it_describes(
    provider: Provider, headers: dict[str, str], name: str, expected: PushEvent
) -> None:
    assert parse(provider, headers, payload(name)) == expected


@pytest.mark.parametrize(("provider", "headers", "name", "expected"), EXAMPLES)
def test_header_names_match_in_any_case(
    provider: Provider, headers: dict[str, str], name: str, expected: PushEvent
) -> None:
    lowered = {key.lower(): value for key, value in headers.items()}
    assert parse(provider, lowered, payload(name)) == expected


@pytest.mark.parametrize(
    ("provider", "headers", "name", "kind"),
    [
        pytest.param(
            GITHUB, {"X-GitHub-Event": "issues"}, "github_ping.json", "other", id="github-issues"
        ),
        pytest.param(
            GITHUB, {"X-GitHub-Event": "create"}, "github_delete_event.json", "other", id="create"
        ),
        pytest.param(
            GITEA, {"X-Gitea-Event": "ping"}, "github_ping.json", "other", id="gitea-has-no-ping"
        ),
        pytest.param(
            GITLAB,
            {"X-Gitlab-Event": "Merge Request Hook"},
            "gitlab_push.json",
            "push",
            id="gitlab-object-kind-wins",
        ),
    ],
)
def test_the_event_type_decides_and_gitlab_reads_it_from_object_kind(
    provider: Provider, headers: dict[str, str], name: str, kind: str
) -> None:
    assert parse(provider, headers, payload(name)).kind == kind


def test_a_gitlab_payload_without_object_kind_falls_back_to_the_header() -> None:
    body = json.loads(payload("gitlab_tag.json"))
    del body["object_kind"], body["event_name"]
    event = parse(GITLAB, {"X-Gitlab-Event": "Tag Push Hook"}, json.dumps(body).encode())
    assert event.kind == "tag"


def test_a_gitlab_payload_with_only_the_legacy_repository_object_still_parses() -> None:
    body = json.loads(payload("gitlab_push.json"))
    del body["project"]
    event = parse(GITLAB, {}, json.dumps(body).encode())
    assert (event.kind, event.repo_name, event.branch) == ("push", "app", "bugfix")
    assert normalize_url("git@gitlab.example.com:team/app.git") in map(
        normalize_url, event.repo_urls
    )


def test_a_push_to_a_ref_outside_branches_and_tags_is_other() -> None:
    body = json.loads(payload("github_push.json"))
    body["ref"] = "refs/notes/commits"
    event = parse(GITHUB, {"X-GitHub-Event": "push"}, json.dumps(body).encode())
    assert (event.kind, event.branch, event.after) == ("other", None, None)


def test_a_deleted_tag_is_a_tag_event_with_no_head() -> None:
    body = json.loads(payload("github_tag.json"))
    body.update(deleted=True, after=ZEROS)
    event = parse(GITHUB, {"X-GitHub-Event": "push"}, json.dumps(body).encode())
    assert (event.kind, event.after) == ("tag", None)


def test_a_ping_from_an_organization_hook_has_no_repository_and_still_answers() -> None:
    body = json.loads(payload("github_ping.json"))
    del body["repository"]
    event = parse(GITHUB, {"X-GitHub-Event": "ping"}, json.dumps(body).encode())
    assert event == PushEvent(GITHUB, "ping", (), "", None, None)


def test_a_slashed_branch_name_is_kept_whole() -> None:
    body = json.loads(payload("gitea_push.json"))
    body["ref"] = "refs/heads/feature/Login_Fix"
    assert parse(GITEA, {"X-Gitea-Event": "push"}, json.dumps(body).encode()).branch == (
        "feature/Login_Fix"
    )


def test_an_uppercase_sha_is_reported_in_lowercase() -> None:
    body = json.loads(payload("github_push.json"))
    body["after"] = body["after"].upper()
    event = parse(GITHUB, {"X-GitHub-Event": "push"}, json.dumps(body).encode())
    assert event.after == "8f19f543155a7c0fa552c1ae34117768026798ff"


# --- event_type ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("provider", "headers", "expected"),
    [
        (GITHUB, {"X-GitHub-Event": "push"}, "push"),
        (GITHUB, {"x-github-event": " ping "}, "ping"),
        (GITLAB, {"X-GITLAB-EVENT": "Tag Push Hook"}, "Tag Push Hook"),
        (GITEA, {"X-Gitea-Event": "delete"}, "delete"),
        (GITEA, {"X-Forgejo-Event": "push"}, "push"),
        (GITEA, {"X-Gogs-Event": "create"}, "create"),
        (GITHUB, {"X-Gitea-Event": "push"}, ""),
        (GITLAB, {}, ""),
    ],
)
def test_event_type_reads_the_providers_header_in_any_case(
    provider: Provider, headers: dict[str, str], expected: str
) -> None:
    assert event_type(provider, headers) == expected


# --- signatures ------------------------------------------------------------------------

BODIES = {
    GITHUB: payload("github_push.json"),
    GITLAB: payload("gitlab_push.json"),
    GITEA: payload("gitea_push.json"),
}
SIGNATURE_HEADER = {
    GITHUB: "X-Hub-Signature-256",
    GITLAB: "X-Gitlab-Token",
    GITEA: "X-Gitea-Signature",
}


@pytest.mark.parametrize("provider", list(Provider))
def test_the_right_secret_verifies(provider: Provider) -> None:
    verify(provider, signed(provider, BODIES[provider]), BODIES[provider], SECRET)


@pytest.mark.parametrize("provider", list(Provider))
def test_the_signature_header_is_found_in_any_case(provider: Provider) -> None:
    headers = {k.lower(): v for k, v in signed(provider, BODIES[provider]).items()}
    verify(provider, headers, BODIES[provider], SECRET)


def test_forgejos_own_signature_header_verifies() -> None:
    body = BODIES[GITEA]
    digest = signed(GITEA, body)["X-Gitea-Signature"]
    verify(GITEA, {"X-Forgejo-Event": "push", "X-Forgejo-Signature": digest}, body, SECRET)


def test_an_uppercase_hex_signature_verifies() -> None:
    body = BODIES[GITHUB]
    headers = signed(GITHUB, body)
    headers["X-Hub-Signature-256"] = "sha256=" + headers["X-Hub-Signature-256"][7:].upper()
    verify(GITHUB, headers, body, SECRET)


@pytest.mark.parametrize("provider", list(Provider))
def test_a_wrong_secret_is_a_401_that_says_which_secret_to_check(provider: Provider) -> None:
    body = BODIES[provider]
    error = rejection(
        verify,
        provider,
        signed(provider, body, "not the secret"),
        body,
        SECRET,
        secret_name="the webhook secret of repo app (or the global one)",
    )
    assert (error.status, error.code) == (401, "bad_webhook_signature")
    assert error.message == (
        f"{SIGNATURE_HEADER[provider]} does not match: "
        "check the webhook secret of repo app (or the global one)"
    )


@pytest.mark.parametrize("provider", [GITHUB, GITEA])
def test_a_body_changed_after_signing_is_a_401(provider: Provider) -> None:
    body = BODIES[provider]
    error = rejection(verify, provider, signed(provider, body), body + b" ", SECRET)
    assert error.status == 401
    assert "does not match" in error.message


@pytest.mark.parametrize("provider", list(Provider))
def test_a_missing_signature_is_a_401_that_says_to_set_a_secret(provider: Provider) -> None:
    headers = signed(provider, BODIES[provider])
    del headers[SIGNATURE_HEADER[provider]]
    error = rejection(verify, provider, headers, BODIES[provider], SECRET)
    assert error.status == 401
    assert error.message.startswith(f"{SIGNATURE_HEADER[provider]} header is missing: give the")
    assert "the same as the webhook secret of this repo (or the global one)" in error.message


@pytest.mark.parametrize(
    ("provider", "header", "value"),
    [
        pytest.param(GITHUB, "X-Hub-Signature-256", "", id="github-empty"),
        pytest.param(GITHUB, "X-Hub-Signature-256", "sha1=" + "a" * 40, id="github-sha1"),
        pytest.param(GITHUB, "X-Hub-Signature-256", "a" * 64, id="github-no-prefix"),
        pytest.param(GITHUB, "X-Hub-Signature-256", "sha256=" + "g" * 64, id="github-not-hex"),
        pytest.param(GITHUB, "X-Hub-Signature-256", "sha256=" + "a" * 63, id="github-short"),
        pytest.param(GITEA, "X-Gitea-Signature", "sha256=" + "a" * 64, id="gitea-prefixed"),
        pytest.param(GITEA, "X-Gitea-Signature", "zz", id="gitea-not-hex"),
        pytest.param(GITEA, "X-Forgejo-Signature", "", id="forgejo-empty"),
    ],
)
def test_a_malformed_signature_is_a_401_that_shows_the_expected_form(
    provider: Provider, header: str, value: str
) -> None:
    error = rejection(verify, provider, {header: value}, BODIES[provider], SECRET)
    assert error.status == 401
    assert error.message.startswith(f"{header} is malformed, expected ")


@pytest.mark.parametrize("provider", list(Provider))
def test_an_empty_secret_never_verifies(provider: Provider) -> None:
    body = BODIES[provider]
    error = rejection(verify, provider, signed(provider, body, ""), body, "")
    assert error.status == 401
    assert "no webhook secret is set" in error.message


def test_a_gitlab_token_that_only_starts_like_the_secret_is_refused() -> None:
    error = rejection(verify, GITLAB, {"X-Gitlab-Token": SECRET[:-1]}, b"{}", SECRET)
    assert error.status == 401


# --- bodies that are not a usable payload -----------------------------------------------


@pytest.mark.parametrize("provider", list(Provider))
@pytest.mark.parametrize(
    ("body", "words"),
    [
        pytest.param(b"", "not JSON", id="empty"),
        pytest.param(b'{"ref": ', "not JSON", id="truncated"),
        pytest.param(b"[1, 2]", "a JSON array, not an object", id="list"),
        pytest.param(b'"push"', "a JSON string, not an object", id="string"),
        pytest.param(b"null", "a JSON null, not an object", id="null"),
        pytest.param(b"payload=%7B%22ref%22%7D", "form-encoded", id="form-encoded"),
        pytest.param(b'{"ref": "\xff"}', "not UTF-8 JSON", id="not-utf8"),
        pytest.param(b"[" * 100_000, "nested too deeply", id="deep"),
        pytest.param(b"1" * 5000, "not usable JSON", id="huge-int"),
    ],
)
def test_a_body_that_is_not_a_json_object_is_a_400(
    provider: Provider, body: bytes, words: str
) -> None:
    headers = {"X-GitHub-Event": "push", "X-Gitlab-Event": "Push Hook", "X-Gitea-Event": "push"}
    error = rejection(parse, provider, headers, body)
    assert (error.status, error.code) == (400, "bad_webhook_payload")
    assert words in error.message
    assert "\n" not in error.message


def test_a_form_encoded_body_is_told_to_switch_to_json() -> None:
    error = rejection(parse, GITHUB, {"X-GitHub-Event": "push"}, b"payload=%7B%7D")
    assert error.message == (
        "body is form-encoded: set the webhook's content type to application/json"
    )


@pytest.mark.parametrize(
    ("provider", "headers", "name", "change", "words"),
    [
        pytest.param(
            GITHUB, {"X-GitHub-Event": "push"}, "github_push.json", {"ref": None}, 'no "ref"'
        ),
        pytest.param(
            GITHUB,
            {"X-GitHub-Event": "push"},
            "github_push.json",
            {"repository": None},
            'no "repository" object',
        ),
        pytest.param(
            GITLAB, {}, "gitlab_push.json", {"project": None, "repository": None}, '"project"'
        ),
        pytest.param(
            GITEA,
            {"X-Gitea-Event": "push"},
            "gitea_push.json",
            {"after": None},
            'no "after" commit sha',
        ),
        pytest.param(
            GITEA,
            {"X-Gitea-Event": "push"},
            "gitea_push.json",
            {"after": "HEAD~1"},
            "not a commit sha",
        ),
        pytest.param(
            GITHUB,
            {"X-GitHub-Event": "push"},
            "github_push.json",
            {"ref": "refs/heads/-x"},
            "which git does not accept",
        ),
        pytest.param(
            GITHUB,
            {"X-GitHub-Event": "push"},
            "github_push.json",
            {"ref": "refs/heads/a..b"},
            "which git does not accept",
        ),
        pytest.param(
            GITEA,
            {"X-Gitea-Event": "delete"},
            "gitea_delete.json",
            {"ref": None},
            'delete payload has no "ref"',
        ),
        pytest.param(
            GITHUB,
            {"X-GitHub-Event": "push"},
            "github_push.json",
            {"ref": "refs/heads/a\\b"},
            "which git does not accept",
        ),
        pytest.param(
            GITHUB,
            {"X-GitHub-Event": "push"},
            "github_push.json",
            {"ref": "refs/heads/fix\ud800"},
            'no "ref"',
        ),
    ],
)
def test_a_push_without_what_the_engine_needs_is_a_400_naming_the_field(
    provider: Provider,
    headers: dict[str, str],
    name: str,
    change: dict[str, object],
    words: str,
) -> None:
    body = json.loads(payload(name))
    for key, value in change.items():
        if value is None:
            body.pop(key, None)
        else:
            body[key] = value
    error = rejection(parse, provider, headers, json.dumps(body).encode())
    assert error.status == 400
    assert words in error.message


@pytest.mark.parametrize(
    ("provider", "header"), [(GITHUB, "X-GitHub-Event"), (GITEA, "X-Gitea-Event")]
)
def test_a_request_without_an_event_type_is_a_400(provider: Provider, header: str) -> None:
    error = rejection(parse, provider, {}, payload(f"{provider.value}_push.json"))
    assert error.status == 400
    assert error.message.startswith(f"{header} header is missing: is this request from a")


def test_a_gitlab_request_with_neither_header_nor_object_kind_is_a_400() -> None:
    error = rejection(parse, GITLAB, {}, b"{}")
    assert error.status == 400
    assert "no X-Gitlab-Event header and no object_kind" in error.message


# --- size ------------------------------------------------------------------------------


def test_a_body_over_the_limit_is_a_413_for_parse_and_verify() -> None:
    body = b" " * (MAX_BODY + 1)
    for error in (
        rejection(parse, GITHUB, {"X-GitHub-Event": "push"}, body),
        rejection(verify, GITHUB, signed(GITHUB, body), body, SECRET),
        rejection(check_size, MAX_BODY + 1),
    ):
        assert (error.status, error.code) == (413, "webhook_too_large")
        assert f"over the limit of {MAX_BODY}" in error.message


def test_a_body_at_the_limit_is_accepted_by_check_size() -> None:
    check_size(MAX_BODY)


# --- URL matching ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("git@host:team/app.git", "host/team/app"),
        ("ssh://git@host/team/app.git", "host/team/app"),
        ("https://host/team/app", "host/team/app"),
        ("https://Host.EXAMPLE.com/Team/App", "host.example.com/Team/App"),
        ("https://host/team/app.git/", "host/team/app"),
        ("https://host/team/app/", "host/team/app"),
        ("https://user:token@host/team/app.git", "host/team/app"),
        ("ssh://git@git.example.com:2222/team/app.git", "git.example.com/team/app"),
        ("http://localhost:3000/team/app.git", "localhost/team/app"),
        ("git://github.com/acme/app.git", "github.com/acme/app"),
        ("git@GitHub.com:acme/app", "github.com/acme/app"),
        ("github.com:acme/app.git", "github.com/acme/app"),
        ("https://host/group/subgroup/app.git", "host/group/subgroup/app"),
        ("  https://host/team/app.git\n", "host/team/app"),
        ("https://host/team/app?ref=main#readme", "host/team/app"),
        ("https://[::1]:8080/team/app.git", "::1/team/app"),
        ("/srv/git/app.git", "/srv/git/app"),
        ("file:///srv/git/app.git", "/srv/git/app"),
        ("host/team/app", "host/team/app"),
        ("", ""),
    ],
)
def test_normalize_url_gives_one_form_for_every_way_of_writing_a_repo(
    url: str, expected: str
) -> None:
    assert normalize_url(url) == expected
    assert normalize_url(expected) == expected


@pytest.mark.parametrize(("provider", "headers", "name", "expected"), EXAMPLES)
def test_a_repo_registered_by_any_of_its_urls_is_found_in_the_payload(
    provider: Provider, headers: dict[str, str], name: str, expected: PushEvent
) -> None:
    named = {normalize_url(url) for url in parse(provider, headers, payload(name)).repo_urls}
    for registered in expected.repo_urls:
        assert normalize_url(registered) in named


# --- nothing a sender can put in a request makes these raise anything else ---------------

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4)
    ),
    max_leaves=12,
)
KNOWN_KEYS = st.sampled_from(
    [
        "ref",
        "after",
        "before",
        "deleted",
        "ref_type",
        "repository",
        "project",
        "object_kind",
        "event_name",
        "name",
        "path_with_namespace",
        "clone_url",
        "ssh_url",
        "git_http_url",
    ]
)
JSON_OBJECTS = st.dictionaries(KNOWN_KEYS | st.text(max_size=12), JSON, max_size=8)
EVENT_HEADERS = st.fixed_dictionaries(
    {},
    optional={
        "X-GitHub-Event": st.sampled_from(["push", "ping", "delete", "create", "issues", ""]),
        "X-Gitlab-Event": st.sampled_from(["Push Hook", "Tag Push Hook", "System Hook", "x"]),
        "X-Gitea-Event": st.sampled_from(["push", "delete", "create", "ping"]),
    },
)
ANY_HEADERS = st.dictionaries(st.text(max_size=24), st.text(max_size=80), max_size=6)
# Few examples each, so the whole file stays under a few seconds; CI runs it on every push.
FAST = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
NESTED = settings(FAST, max_examples=40)


def assert_only_webhook_errors(
    call: object, *args: object, statuses: tuple[int, ...] = (400, 401)
) -> None:
    assert callable(call)
    try:
        call(*args)
    except WebhookError as error:
        assert error.status in statuses
        assert error.message and "\n" not in error.message


@FAST
@given(provider=st.sampled_from(Provider), headers=ANY_HEADERS | EVENT_HEADERS, body=st.binary())
def test_parse_raises_nothing_but_a_webhook_error_for_any_bytes_and_headers(
    provider: Provider, headers: dict[str, str], body: bytes
) -> None:
    assert_only_webhook_errors(parse, provider, headers, body)


@FAST
@given(
    provider=st.sampled_from(Provider),
    headers=ANY_HEADERS,
    signature=st.none() | st.text(max_size=80),
    body=st.binary(),
    secret=st.text(max_size=40),
)
def test_verify_raises_nothing_but_a_401_for_any_bytes_headers_and_secret(
    provider: Provider, headers: dict[str, str], signature: str | None, body: bytes, secret: str
) -> None:
    if signature is not None:
        headers = {**headers, SIGNATURE_HEADER[provider]: signature}
    assert_only_webhook_errors(verify, provider, headers, body, secret, statuses=(401,))


@NESTED
@given(provider=st.sampled_from(Provider), headers=EVENT_HEADERS, body=JSON_OBJECTS)
def test_parse_raises_nothing_but_a_400_for_any_json_object(
    provider: Provider, headers: dict[str, str], body: dict[str, object]
) -> None:
    assert_only_webhook_errors(parse, provider, headers, json.dumps(body).encode(), statuses=(400,))


@NESTED
@given(
    provider=st.sampled_from([GITHUB, GITEA]),
    event=st.sampled_from(["issues", "create", "star", "release", "pull_request"]),
    body=JSON_OBJECTS,
)
def test_parse_never_raises_for_an_event_it_does_not_act_on(
    provider: Provider, event: str, body: dict[str, object]
) -> None:
    headers = {"X-GitHub-Event": event, "X-Gitea-Event": event}
    assert parse(provider, headers, json.dumps(body).encode()).kind == "other"


REQUESTS = [(param.values[0], param.values[1], param.values[2]) for param in EXAMPLES]


@NESTED
@given(request=st.sampled_from(REQUESTS), data=st.data())
def test_a_real_payload_with_any_field_replaced_parses_or_is_a_400(
    request: tuple[Provider, dict[str, str], str], data: st.DataObject
) -> None:
    provider, headers, name = request
    body = json.loads(payload(name))
    inner = [
        (outer, key)
        for outer in ("repository", "project")
        if isinstance(body.get(outer), dict)
        for key in body[outer]
    ]
    target = data.draw(st.sampled_from([(None, key) for key in body] + inner))
    value = data.draw(JSON)
    outer, key = target
    (body if outer is None else body[outer])[key] = value
    assert_only_webhook_errors(parse, provider, headers, json.dumps(body).encode(), statuses=(400,))


@FAST
@given(provider=st.sampled_from(Provider), body=st.binary(), secret=st.text(min_size=1))
def test_what_the_provider_signs_verifies_and_nothing_else_does(
    provider: Provider, body: bytes, secret: str
) -> None:
    verify(provider, signed(provider, body, secret), body, secret)
    other = secret + "x"
    error = rejection(verify, provider, signed(provider, body, other), body, secret)
    assert error.status == 401


@FAST
@given(url=st.text())
def test_normalize_url_never_raises(url: str) -> None:
    assert isinstance(normalize_url(url), str)


SEGMENT = st.from_regex(r"[a-z0-9][a-z0-9_.-]{0,10}[a-z0-9_]", fullmatch=True).filter(
    lambda s: not s.endswith(".git")
)


@NESTED
@given(
    host=st.from_regex(r"[a-z0-9]([a-z0-9-]{0,10}[a-z0-9])?(\.[a-z]{2,5}){0,2}", fullmatch=True),
    path=st.lists(SEGMENT, min_size=1, max_size=4).map("/".join),
)
def test_scp_ssh_and_https_forms_of_one_repo_normalize_alike(host: str, path: str) -> None:
    forms = {
        f"git@{host}:{path}.git",
        f"ssh://git@{host}/{path}.git",
        f"ssh://git@{host}:2222/{path}",
        f"https://{host.upper()}/{path}",
        f"https://{host}/{path}.git/",
        f"git://{host}/{path}.git",
    }
    assert {normalize_url(form) for form in forms} == {f"{host}/{path}"}


@pytest.mark.parametrize(
    ("times", "recorded"),
    [
        ([0.0], {0.0: "refused 1"}),
        ([0.0, 1.0, 59.9], {0.0: "refused 1"}),  # within a minute of the one recorded
        (
            [0.0, 1.0, 2.0, 61.0],
            {
                0.0: "refused 1",
                61.0: "refused 4 (and 2 more unauthenticated webhooks refused "
                "in the last 61 s, not recorded one by one)",
            },
        ),
        ([0.0, 60.0, 200.0], {0.0: "refused 1", 60.0: "refused 2", 200.0: "refused 3"}),
        (
            [10.0, *[10.0 + n / 1000 for n in range(1, 10_001)], 130.0],
            {
                10.0: "refused 1",
                130.0: "refused 10002 (and 10000 more unauthenticated webhooks refused "
                "in the last 120 s, not recorded one by one)",
            },
        ),
    ],
    ids=["one", "a burst", "counted", "slow ones", "a flood"],
)
def test_refused_webhooks_are_recorded_at_most_once_a_minute_with_a_count(
    times: list[float], recorded: dict[float, str]
) -> None:
    refusals = Refusals()
    told = {}
    for number, now in enumerate(times, 1):
        event = refusals.refused(f"refused {number}", now)
        if event is not None:
            told[now] = event
    assert told == recorded
