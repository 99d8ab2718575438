"""Schemathesis over the daemon's own OpenAPI schema (issue 5, item 7: robustness).

One real daemon serves the whole module, with one service repo, ``app``, deployed
into the baseline ``main``, so real names exist for the fuzzer to hit. The schema
is loaded from the live ``/openapi.json`` with the token, and every operation is
fuzzed, stateless and property-based: up to ``MAX_EXAMPLES`` requests per
operation, drawn from schemathesis's positive (schema-valid) and negative
(schema-violating) strategies, one pytest subtest per operation.

Why not ``schemathesis.pytest.from_fixture`` (the documented way to take the schema
from a fixture): with pytest 9.2, schemathesis 4.32's lazy loader fails with
``'Function' object has no attribute '_nodeid'``. The schema cannot be loaded at
import time either, because the daemon is a fixture. So each operation's
``as_strategy()`` runs under Hypothesis's ``@given``. This leaves out
schemathesis's coverage phase (deterministic boundary values). ``known_values``
makes up for part of it, see below.

Each response must pass:

- ``not_a_server_error``: never a 5xx;
- ``response_schema_conformance``: where the schema declares a body for the status
  (the success answers, and 422 for a request that does not validate), the body
  fits it. The success bodies are declared as untyped objects and arrays, so this
  check is weak, but it costs nothing and gets stricter once the API has models.

``status_code_conformance`` is left out on purpose. FastAPI's generated schema
declares only the success status and 422, while the API answers 400, 401, 404 and
409 by design (``{"error", "message"}``, see branchyard.errors). Nearly every
fuzzed request would be reported as "undocumented status", which is a gap in the
schema, not a crash. Documenting those answers (``responses=`` on the routes) would
allow the check. ``content_type_conformance`` is left out for a similar reason: the
logs endpoint answers ``text/plain`` where the schema says ``application/json``.

After the module, the daemon must stop cleanly and its log must hold no
``Traceback``. That catches exceptions no status code shows, for example one
inside a stream that has already answered 200.

Generation is steered (``known_values``):

- Path parameters, ``?namespace=`` and body fields are drawn from names and
  values that exist (``main``, ``app``, the providers, revision 1, a valid env)
  as well as from generated ones, so requests get past the 404s into the engine.
- Integers also get 2**63 and -2**63-1, just outside SQLite's INTEGER.
- Body strings also get a NUL byte and a lone surrogate. Both are valid JSON that
  no path, subprocess argument or UTF-8 encoder accepts.

Operations that need care:

- ``POST /api/token/rotate`` replaces the token. It is fuzzed like the others:
  every request reads the token file again, so the test is never locked out.
- ``GET /events`` (Server-Sent Events) never ends. Those requests are sent with
  ``stream=True``: the status must not be 5xx, and a 200 stream must not break or
  end within its first ``STREAM_PROBE`` seconds. An exception in the generator
  ends the body after the 200 has gone out.
- ``GET .../logs?follow=true`` also never ends, so ``follow`` is forced to false.
  The following branch only tails the same file the other branch reads.
- DELETE operations get generated names only. Removing ``app`` or ``main:app``
  early is not a failure, but it would turn every later request into a 404 and
  hide the rest of the API from the fuzzer.
- ``POST /api/repos`` resolves a relative local path against the daemon's working
  directory. The daemon runs in the module's temp dir, so a generated ``"."`` does
  not register the project's own checkout.

Webhooks: ``POST /hooks/{provider}`` is in the schema, but the endpoint reads its
body raw, so the schema describes neither the body nor the providers' headers.
The main run sends it only empty bodies. ``test_webhooks_never_fail`` takes the
same live schema and gives that one operation a JSON body shaped like the
providers' push payloads (including the registered repo's URL) and their event and
signature headers, then fuzzes it. A signature header whose generated value is
``SIGN`` is replaced by a correct signature, so some requests get past
verification.
"""

from __future__ import annotations

import copy
import hashlib
import hmac
import json
import os
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import schemathesis
import urllib3
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import response_schema_conformance

from tests.conftest import (
    Daemon,
    git,
    start_daemon,
    stdlib_service,
    stop_cleanly,
    wait_for,
)

pytestmark = pytest.mark.integration

MAX_EXAMPLES = 30
REQUEST_TIMEOUT = 10.0
STREAM_PROBE = 0.3
WEBHOOK_SECRET = "fuzz-secret"
PROVIDERS = ("github", "gitlab", "gitea")
SQLITE_EDGES = (2**63, -(2**63) - 1)
KNOWN: dict[str, tuple[Any, ...]] = {
    "namespace": ("main",),
    "service": ("app",),
    "provider": PROVIDERS,
    "ordinal": (1, *SQLITE_EDGES),
    "weights": ({"1": 100}, {str(2**63): 100}),
    "env": ({"GREETING": "hello"}, {"GREETING": "\ud800"}),
    "set": ({"API_KEY": "s3cret"}, {"API_KEY": "\ud800"}),
}
CHECKS = [not_a_server_error, response_schema_conformance]
FUZZ = settings(
    max_examples=MAX_EXAMPLES,
    deadline=None,  # time is bounded by REQUEST_TIMEOUT per request and by pytest-timeout
    database=None,  # every operation runs the same inner function: stored examples would mix
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)

answers: dict[str, Counter[int | str]] = defaultdict(Counter)


def bearer(daemon: Daemon) -> dict[str, str]:
    """The Authorization header, from the token file as it is now (it may be rotated)."""
    return {"Authorization": f"Bearer {(daemon.home / 'token').read_text().strip()}"}


def api_url(daemon: Daemon) -> str:
    return str(daemon.info["api"])


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    """A daemon with ``app`` live in ``main``; afterwards, a clean stop and log."""
    base = tmp_path_factory.mktemp("schema")
    origin, clone = base / "origin" / "app.git", base / "work" / "app"
    git("init", "-q", "--bare", "-b", "main", str(origin))
    git("init", "-q", "-b", "main", str(clone))
    for name, text in stdlib_service().items():
        (clone / name).write_text(text)
    git("add", "-A", cwd=clone)
    git("commit", "-q", "-m", "first", cwd=clone)
    git("push", "-q", str(origin), "main", cwd=clone)
    sha = git("rev-parse", "HEAD", cwd=clone)

    here = Path.cwd()
    os.chdir(base)  # the daemon inherits it: relative repo paths stay in here
    try:
        daemon = start_daemon(base / "home", "--poll-interval", "1")
    finally:
        os.chdir(here)
    try:
        daemon.cli("repo", "add", "--webhook-secret", WEBHOOK_SECRET, str(origin))
        wait_for(lambda: daemon.serves("app", "main", sha), 60, "app live in main")
        yield daemon
    finally:
        stop_cleanly(daemon)


def known_values(part: str) -> Callable[[schemathesis.HookContext, Any], Any]:
    """A hook drawing each field of ``part`` from what exists as well as what was generated.

    Integers also get the first values outside SQLite's 64-bit INTEGER, and the
    strings of a body also get a NUL byte and a lone surrogate: valid JSON that
    no path, subprocess argument or UTF-8 encoder takes.
    """

    def hook(context: schemathesis.HookContext, values: Any) -> Any:
        operation = context.operation
        if operation is None or operation.method.upper() == "DELETE":
            return st.just(values)
        if not isinstance(values, dict):
            return st.just(values)
        choices = {}
        for key, value in values.items():
            known = KNOWN.get(key, ())
            if isinstance(value, int) and not isinstance(value, bool):
                known = (*known, *SQLITE_EDGES)
            elif isinstance(value, str) and part == "body":
                known = (*known, f"{value}\x00", f"\ud800{value}")
            choices[key] = st.sampled_from((*known, value))
        return st.fixed_dictionaries(choices)

    return hook


def biased(schema: schemathesis.BaseSchema) -> schemathesis.BaseSchema:
    for part in ("path_parameters", "query", "body"):
        schema.hook(f"flatmap_{part}")(known_values(part))
    return schema


@pytest.fixture(scope="module")
def api_schema(live: Daemon) -> schemathesis.BaseSchema:
    schema = schemathesis.openapi.from_url(
        f"{api_url(live)}/openapi.json", headers=bearer(live), timeout=REQUEST_TIMEOUT
    )
    schema.config.update(base_url=api_url(live))
    return biased(schema)


def probe_stream(case: schemathesis.Case[Any], daemon: Daemon) -> int:
    """A never-ending response: its status, then whether it breaks at once."""
    kwargs = case.as_transport_kwargs(headers=bearer(daemon))
    kwargs["timeout"] = (REQUEST_TIMEOUT, STREAM_PROBE)
    request = f"{case.method} {kwargs['url']} {kwargs.get('params')}"
    with requests.request(**kwargs, stream=True) as response:
        assert response.status_code < 500, f"{request}: {response.status_code}"
        if response.status_code == 200:
            try:
                first = response.raw.read(1)
            except urllib3.exceptions.ReadTimeoutError:
                first = b"-"  # nothing to send yet, and still open: as it should be
            except urllib3.exceptions.ProtocolError as exc:
                raise AssertionError(f"{request}: the stream broke: {exc}") from None
            assert first, f"{request}: the stream ended"
        return response.status_code


def operations_of(
    schema: schemathesis.BaseSchema,
) -> list[schemathesis.APIOperation[Any, Any, Any, Any]]:
    found = []
    for result in schema.get_all_operations():
        if not hasattr(result, "ok"):
            raise AssertionError(f"schemathesis cannot use the schema: {result.err()}")
        found.append(result.ok())
    return found


def fuzz(
    schema: schemathesis.BaseSchema,
    subtests: pytest.Subtests,
    send: Callable[[schemathesis.Case[Any]], int],
    tag: str = "",
) -> None:
    """Up to MAX_EXAMPLES cases, valid and invalid, per operation, a subtest each."""
    for operation in operations_of(schema):
        cases = st.one_of(
            operation.as_strategy(schemathesis.GenerationMode.POSITIVE),
            operation.as_strategy(schemathesis.GenerationMode.NEGATIVE),
        )

        @FUZZ
        @given(case=cases)
        def run(case: schemathesis.Case[Any]) -> None:
            status: int | str = "failed"
            try:
                status = send(case)
            finally:
                answers[tag + case.operation.label][status] += 1

        with subtests.test(operation.label):
            run()


def test_no_operation_answers_a_server_error(
    api_schema: schemathesis.BaseSchema, live: Daemon, subtests: pytest.Subtests
) -> None:
    def send(case: schemathesis.Case[Any]) -> int:
        if case.operation.path == "/events":
            return probe_stream(case, live)
        if case.operation.path.endswith("/logs"):
            case.query = {**(case.query or {}), "follow": "false"}
        response = case.call_and_validate(
            headers=bearer(live), checks=CHECKS, timeout=REQUEST_TIMEOUT
        )
        return response.status_code

    fuzz(api_schema, subtests, send)


SIGN = "SIGN"


def any_of(*values: str) -> dict[str, Any]:
    return {"anyOf": [{"enum": list(values)}, {"type": "string"}]}


def with_webhook_payloads(raw: dict[str, Any], repo_url: str) -> dict[str, Any]:
    """The live schema, cut to the webhook operation, with what the endpoint reads."""
    spec = copy.deepcopy(raw)
    hook = spec["paths"]["/hooks/{provider}"]["post"]
    spec["paths"] = {"/hooks/{provider}": {"post": hook}}
    urls = any_of(repo_url, f"file://{repo_url}", f"{repo_url}/")
    repository = {
        "type": "object",
        "properties": {
            key: urls
            for key in (
                "clone_url",
                "ssh_url",
                "git_url",
                "html_url",
                "git_http_url",
                "git_ssh_url",
                "http_url",
                "url",
                "web_url",
                "homepage",
            )
        }
        | {"name": any_of("app"), "full_name": any_of("team/app")},
    }
    sha = {"anyOf": [{"type": "string", "pattern": "^[0-9a-f]{40}$"}, {"type": "string"}]}
    hook["requestBody"] = {
        "required": True,
        "content": {
            "application/json": {
                "schema": {
                    "type": "object",
                    "properties": {
                        "ref": any_of("refs/heads/main", "refs/heads/feature/x", "refs/tags/v1"),
                        "before": sha,
                        "after": {"anyOf": [sha, {"enum": ["0" * 40]}]},
                        "checkout_sha": sha,
                        "deleted": {"type": "boolean"},
                        "created": {"type": "boolean"},
                        "ref_type": any_of("branch", "tag"),
                        "object_kind": any_of("push", "tag_push", "merge_request"),
                        "zen": {"type": "string"},
                        "repository": repository,
                        "project": repository,
                        "commits": {"type": "array"},
                    },
                }
            }
        },
    }
    headers = {
        "X-GitHub-Event": any_of("push", "ping", "delete", "create", "issues"),
        "X-Gitlab-Event": any_of("Push Hook", "Tag Push Hook", "System Hook"),
        "X-Gitea-Event": any_of("push", "delete", "create"),
        "X-Forgejo-Event": any_of("push", "delete"),
        "X-Hub-Signature-256": any_of(SIGN, "sha256=" + "0" * 64),
        "X-Gitlab-Token": any_of(SIGN, WEBHOOK_SECRET),
        "X-Gitea-Signature": any_of(SIGN, "0" * 64),
        "X-Forgejo-Signature": any_of(SIGN),
    }
    hook["parameters"] = [p for p in hook.get("parameters", []) if p["in"] != "header"] + [
        {"name": name, "in": "header", "required": False, "schema": schema}
        for name, schema in headers.items()
    ]
    return spec


@pytest.fixture(scope="module")
def hooks_schema(live: Daemon, api_schema: schemathesis.BaseSchema) -> schemathesis.BaseSchema:
    repo_url = next(r["url"] for r in requests_json(live, "/api/repos") if r["name"] == "app")
    schema = schemathesis.openapi.from_dict(with_webhook_payloads(api_schema.raw_schema, repo_url))
    schema.config.update(base_url=api_url(live))
    return biased(schema)


def requests_json(daemon: Daemon, path: str) -> Any:
    answer = requests.get(f"{api_url(daemon)}{path}", headers=bearer(daemon), timeout=10)
    answer.raise_for_status()
    return answer.json()


def signed(body: bytes, headers: dict[str, str]) -> dict[str, str]:
    """``headers`` with each SIGN value replaced by the right proof for ``body``."""
    digest = hmac.new(WEBHOOK_SECRET.encode(), body, hashlib.sha256).hexdigest()
    proof = {
        "x-hub-signature-256": f"sha256={digest}",
        "x-gitlab-token": WEBHOOK_SECRET,
        "x-gitea-signature": digest,
        "x-forgejo-signature": digest,
    }
    return {
        name: proof.get(name.lower(), value) if value == SIGN else value
        for name, value in headers.items()
    }


def test_webhooks_never_fail(
    hooks_schema: schemathesis.BaseSchema, live: Daemon, subtests: pytest.Subtests
) -> None:
    def send(case: schemathesis.Case[Any]) -> int:
        kwargs = case.as_transport_kwargs()
        if "json" in kwargs:
            kwargs["data"] = json.dumps(kwargs.pop("json")).encode()
        kwargs["headers"] = signed(kwargs.get("data") or b"", dict(kwargs.get("headers") or {}))
        response = requests.request(**kwargs, timeout=REQUEST_TIMEOUT)
        case.validate_response(response, checks=[not_a_server_error], headers=kwargs["headers"])
        return response.status_code

    fuzz(hooks_schema, subtests, send, tag="signed payloads: ")


def test_every_operation_was_fuzzed(api_schema: schemathesis.BaseSchema) -> None:
    """Runs last in this file: every operation got requests (printed with ``-s``)."""
    if not answers:
        pytest.skip("the fuzzing tests did not run in this session")
    paths = api_schema.raw_schema["paths"]
    labels = [f"{method.upper()} {path}" for path, methods in paths.items() for method in methods]
    missing = [label for label in labels if not answers[label]]
    assert not missing, f"never fuzzed: {missing}"
    total = sum(sum(statuses.values()) for statuses in answers.values())
    print(f"\n{total} requests; answers by operation:")
    for label, statuses in sorted(answers.items()):
        print(f"  {label}: {dict(sorted(statuses.items(), key=str))}")
