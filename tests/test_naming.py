"""Unit tests for the naming rules: branch names to namespaces, services to env vars."""

from __future__ import annotations

import hashlib
import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from branchyard.naming import (
    BASELINE,
    MAX_LABEL,
    dns_label,
    env_var_for,
    is_domain,
    is_env_name,
    namespace_for_branch,
    service_name_from_url,
    short_hash,
)

DNS_1123_LABEL = re.compile(r"^[a-z0-9]([a-z0-9-]*[a-z0-9])?$")


def sha6(text: str) -> str:
    """The suffix the rules promise, computed independently of the module."""
    return hashlib.sha256(text.encode()).hexdigest()[:6]


def assert_dns_label(namespace: str) -> None:
    assert 1 <= len(namespace) <= MAX_LABEL, namespace
    assert DNS_1123_LABEL.match(namespace), namespace


@pytest.mark.parametrize(
    ("branch", "namespace"),
    [
        pytest.param("feature/Login_Fix", "feature-login-fix", id="slash-case-underscore"),
        pytest.param("fix/ünïcode", "fix-unicode", id="accents-folded"),
        pytest.param("Café/Crème", "cafe-creme", id="accents-and-case"),
        pytest.param("bugfix", "bugfix", id="already-a-label"),
        pytest.param("release/1.2.3", "release-1-2-3", id="dots"),
        pytest.param("a//b__c  d", "a-b-c-d", id="runs-collapse-to-one-dash"),
        pytest.param("--/weird--name/--", "weird-name", id="edges-stripped"),
        pytest.param("fix/修复-crash", "fix-crash", id="untranslatable-dropped"),
        pytest.param("x" * MAX_LABEL, "x" * MAX_LABEL, id="exactly-63-kept"),
    ],
)
def test_a_branch_name_becomes_a_dns_label(branch: str, namespace: str) -> None:
    assert namespace_for_branch(branch) == namespace


@pytest.mark.parametrize(
    "branch",
    [
        pytest.param("修复", id="cjk"),
        pytest.param("🚀", id="emoji"),
        pytest.param("///", id="punctuation"),
        pytest.param("", id="empty"),
    ],
)
def test_a_name_with_nothing_dns_safe_gets_b_and_a_hash(branch: str) -> None:
    assert dns_label(branch) == ""
    assert namespace_for_branch(branch) == f"b-{sha6(branch)}"


def test_the_short_hash_is_six_hex_characters_of_sha256() -> None:
    assert short_hash("feature/x") == sha6("feature/x")
    assert re.fullmatch(r"[0-9a-f]{6}", short_hash("feature/x"))


@pytest.mark.parametrize(
    ("branch", "namespace"),
    [
        pytest.param(
            "feature/" + "a" * 192,
            "feature-" + "a" * 48 + "-" + sha6("feature/" + "a" * 192),
            id="200-chars-cut-to-63",
        ),
        pytest.param(
            "x" * 55 + "/" + "y" * 100,
            "x" * 55 + "-" + sha6("x" * 55 + "/" + "y" * 100),
            id="cut-on-a-dash-leaves-no-double-dash",
        ),
        pytest.param("x" * 64, "x" * 56 + "-" + sha6("x" * 64), id="64-chars-is-one-too-many"),
    ],
)
def test_a_long_branch_name_is_cut_and_gets_a_hash(branch: str, namespace: str) -> None:
    result = namespace_for_branch(branch)
    assert result == namespace
    assert_dns_label(result)
    assert re.search(r"-[0-9a-f]{6}$", result)


def test_a_200_character_branch_gives_a_label_of_at_most_63_ending_in_its_hash() -> None:
    branch = "Feature/" + "Ab_" * 64
    assert len(branch) == 200
    result = namespace_for_branch(branch)
    assert len(result) <= MAX_LABEL
    assert result.endswith("-" + sha6(branch))
    assert_dns_label(result)


def test_two_long_branches_that_share_a_prefix_get_different_namespaces() -> None:
    first, second = "p" * 100 + "/one", "p" * 100 + "/two"
    assert namespace_for_branch(first) != namespace_for_branch(second)


@pytest.mark.parametrize(
    ("branch", "taken", "namespace"),
    [
        pytest.param(
            "feature_x", {"feature-x"}, f"feature-x-{sha6('feature_x')}", id="taken-gets-hash"
        ),
        pytest.param("feature_x", {"other"}, "feature-x", id="free-stays-plain"),
        pytest.param("main", set(), f"main-{sha6('main')}", id="main-is-the-baseline"),
        pytest.param("Main", set(), f"main-{sha6('Main')}", id="Main-folds-to-the-baseline"),
        pytest.param("MAIN/", set(), f"main-{sha6('MAIN/')}", id="MAIN-slash-too"),
        pytest.param("mainline", set(), "mainline", id="main-as-a-prefix-is-fine"),
    ],
)
def test_a_taken_label_gets_the_hashed_form(branch: str, taken: set[str], namespace: str) -> None:
    assert namespace_for_branch(branch, taken) == namespace


def test_a_non_default_branch_named_main_does_not_get_the_baseline() -> None:
    assert BASELINE == "main"
    assert namespace_for_branch("main") != BASELINE
    assert namespace_for_branch("main", taken={BASELINE}) != BASELINE


@pytest.mark.parametrize(
    ("first", "second"),
    [
        pytest.param("feature/x", "feature_x", id="slash-vs-underscore"),
        pytest.param("Feature/X", "feature.x", id="case-vs-dot"),
        pytest.param("fix/ünï", "fix/uni", id="accent-vs-plain"),
        pytest.param("修复", "修正", id="two-cjk-names"),
    ],
)
def test_two_different_colliding_branches_get_different_namespaces(first: str, second: str) -> None:
    assert dns_label(first) == dns_label(second)
    taken = {BASELINE, dns_label(first)}
    assert namespace_for_branch(first, taken) != namespace_for_branch(second, taken)


@given(st.text())
def test_any_branch_name_gives_a_valid_dns_label(branch: str) -> None:
    assert_dns_label(namespace_for_branch(branch))


@given(st.text(), st.sets(st.text(max_size=70), max_size=5))
def test_any_branch_name_gives_a_valid_dns_label_whatever_is_taken(
    branch: str, taken: set[str]
) -> None:
    namespace = namespace_for_branch(branch, taken | {dns_label(branch)})
    assert_dns_label(namespace)
    assert namespace != BASELINE


@pytest.mark.parametrize(
    ("service", "variable"),
    [
        pytest.param("other_app", "OTHER_APP_URL", id="underscore-kept"),
        pytest.param("my.svc-2", "MY_SVC_2_URL", id="dot-and-dash"),
        pytest.param("app", "APP_URL", id="plain"),
        pytest.param("Web-UI", "WEB_UI_URL", id="mixed-case"),
    ],
)
def test_a_service_name_becomes_an_env_var(service: str, variable: str) -> None:
    assert env_var_for(service) == variable


@pytest.mark.parametrize(
    ("url", "service"),
    [
        pytest.param("/srv/git/app", "app", id="path"),
        pytest.param("/srv/git/other_app.git", "other_app", id="path-dot-git"),
        pytest.param("/srv/git/app/", "app", id="path-trailing-slash"),
        pytest.param("/srv/git/app.git/", "app", id="dot-git-trailing-slash"),
        pytest.param("file:///srv/git/other_app.git", "other_app", id="file-url"),
        pytest.param("https://host/team/other_app.git", "other_app", id="https"),
        pytest.param("https://host:8443/team/app.git", "app", id="https-with-port"),
        pytest.param("https://host/team/app/", "app", id="https-trailing-slash"),
        pytest.param("ssh://git@host/team/app.git", "app", id="ssh-url"),
        pytest.param("git@host:team/app.git", "app", id="scp-like"),
        pytest.param("git@host:app.git", "app", id="scp-like-no-folder"),
        pytest.param("app", "app", id="bare-name"),
    ],
)
def test_a_repo_url_gives_the_service_name(url: str, service: str) -> None:
    assert service_name_from_url(url) == service


@pytest.mark.parametrize(
    ("name", "valid"),
    [
        pytest.param("GREETING", True, id="upper"),
        pytest.param("_private", True, id="leading-underscore"),
        pytest.param("a1", True, id="digit-after-first"),
        pytest.param("1X", False, id="leading-digit"),
        pytest.param("A-B", False, id="dash"),
        pytest.param("A B", False, id="space"),
        pytest.param("", False, id="empty"),
        pytest.param("Ä", False, id="non-ascii"),
        pytest.param("A\n", False, id="trailing-newline"),
    ],
)
def test_env_names_are_letters_digits_and_underscores(name: str, valid: bool) -> None:
    assert is_env_name(name) is valid


def test_a_service_name_starting_with_a_digit_gives_a_valid_variable_name() -> None:
    assert env_var_for("2fa") == "_2FA_URL"
    assert is_env_name(env_var_for("2fa"))


@pytest.mark.parametrize(
    ("name", "valid"),
    [
        pytest.param("cluster.local", True, id="the-default"),
        pytest.param("k8s-prod.example.com", True, id="dashes-and-dots"),
        pytest.param("local", True, id="one-label"),
        pytest.param("Cluster.local", False, id="capitals"),
        pytest.param("cluster..local", False, id="an-empty-label"),
        pytest.param(".cluster.local", False, id="a-leading-dot"),
        pytest.param("cluster.local.", False, id="a-trailing-dot"),
        pytest.param("-a.local", False, id="a-leading-dash"),
        pytest.param("a" * 64 + ".local", False, id="a-label-over-63"),
        pytest.param("cluster.local\n", False, id="trailing-newline"),
        pytest.param("", False, id="empty"),
    ],
)
def test_a_domain_is_dot_separated_lowercase_dns_labels(name: str, valid: bool) -> None:
    assert is_domain(name) is valid
