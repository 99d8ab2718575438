"""Unit tests for the settings document that ``branchyard edit`` shows and reads back."""

from __future__ import annotations

from typing import Any

import hypothesis
import pytest
from hypothesis import given
from hypothesis import strategies as st

from branchyard.errors import InvalidSettings, StaleVersion, UsageError
from branchyard.settings import (
    check_version,
    describe_change,
    is_blank_document,
    parse_document,
    render_document,
    validate_env,
)


@pytest.mark.parametrize(
    ("text", "env"),
    [
        pytest.param("", {}, id="empty-document"),
        pytest.param("# nothing here\n", {}, id="only-a-comment"),
        pytest.param("env:\n", {}, id="null-env"),
        pytest.param("env: {}\n", {}, id="empty-env"),
        pytest.param("env:\n  GREETING: hi\n", {"GREETING": "hi"}, id="one"),
        pytest.param(
            "env:\n  WORKERS: 4\n  RATIO: 0.5\n", {"WORKERS": "4", "RATIO": "0.5"}, id="numbers"
        ),
        pytest.param("env:\n  FLAG: 'yes'\n", {"FLAG": "yes"}, id="quoted-yes"),
        pytest.param("env:\n  EMPTY: ''\n", {"EMPTY": ""}, id="empty-string"),
        pytest.param("env:\n  _lower_1: x\n", {"_lower_1": "x"}, id="underscore-and-lowercase"),
        pytest.param(
            "env:\n  MULTI: |\n    line one\n    line two\n",
            {"MULTI": "line one\nline two\n"},
            id="block-scalar",
        ),
        pytest.param(
            "env: {PORTAL: x, MY_PORT: y}", {"PORTAL": "x", "MY_PORT": "y"}, id="near-PORT"
        ),
    ],
)
def test_a_valid_document_gives_its_env(text: str, env: dict[str, str]) -> None:
    assert parse_document(text) == env


@pytest.mark.parametrize(
    ("text", "message"),
    [
        pytest.param("env: [unclosed", "not valid YAML: ", id="not-yaml"),
        pytest.param(
            "- env\n- x\n", "the document must be a mapping with the key `env`", id="list"
        ),
        pytest.param("GREETING=hi", "the document must be a mapping with the key `env`", id="text"),
        pytest.param("env: {}\nextra: 1\n", "unknown keys: extra (only env)", id="unknown-key"),
        pytest.param("GREETING: hi\n", "unknown keys: GREETING (only env)", id="env-forgotten"),
        pytest.param("b: 1\na: 2\n", "unknown keys: a, b (only env)", id="unknown-keys-sorted"),
        pytest.param("env: 5\n", "env must map variable names to values", id="env-number"),
        pytest.param("env: [A=b]\n", "env must map variable names to values", id="env-list"),
        pytest.param(
            "env:\n  1X: a\n",
            "'1X' is not a valid variable name (letters, digits, _)",
            id="bad-name",
        ),
        pytest.param(
            "env:\n  A-B: a\n", "'A-B' is not a valid variable name (letters, digits, _)", id="dash"
        ),
        pytest.param(
            "env:\n  5: a\n", "5 is not a valid variable name (letters, digits, _)", id="int-name"
        ),
        pytest.param(
            'env:\n  "A\\n": a\n',
            "'A\\n' is not a valid variable name (letters, digits, _)",
            id="name-with-trailing-newline",
        ),
        pytest.param(
            "env:\n  PORT: '8000'\n",
            "PORT is set by branchyard and cannot be changed",
            id="reserved-PORT",
        ),
        pytest.param(
            "env:\n  HOST: 0.0.0.0\n",
            "HOST is set by branchyard and cannot be changed",
            id="reserved-HOST",
        ),
        pytest.param(
            "env:\n  BRANCHYARD_X: a\n",
            "BRANCHYARD_X is set by branchyard and cannot be changed",
            id="reserved-prefix",
        ),
        pytest.param(
            "env:\n  A:\n", "value of A is empty; write a string (quote it)", id="null-value"
        ),
        pytest.param(
            "env:\n  A:\n    B: c\n", "value of A is dict; write a string (quote it)", id="nested"
        ),
        pytest.param(
            "env:\n  A: [1, 2]\n", "value of A is list; write a string (quote it)", id="list-value"
        ),
        pytest.param(
            "env:\n  DEBUG: yes\n", "value of DEBUG is bool; write a string (quote it)", id="bool"
        ),
        pytest.param(
            "env:\n  DEBUG: true\n", "value of DEBUG is bool; write a string (quote it)", id="true"
        ),
        pytest.param(
            'env:\n  A: "a\\0b"\n', "value of A contains a NUL character", id="nul-in-value"
        ),
    ],
)
def test_an_invalid_document_says_what_is_wrong(text: str, message: str) -> None:
    with pytest.raises(InvalidSettings) as caught:
        parse_document(text)
    assert caught.value.message.startswith(message), caught.value.message
    assert "\n" not in caught.value.message
    assert isinstance(caught.value, UsageError)
    assert (caught.value.code, caught.value.status) == ("invalid_settings", 400)


@pytest.mark.parametrize(
    "text",
    [
        pytest.param("1: a\nfoo: b\n", id="int-and-string-keys"),
        pytest.param("on: a\nfoo: b\n", id="bool-and-string-keys"),
        pytest.param("null: a\nfoo: b\n", id="null-and-string-keys"),
    ],
)
def test_unknown_keys_of_mixed_types_are_refused_not_crashed_on(text: str) -> None:
    with pytest.raises(InvalidSettings, match=r"^unknown keys: "):
        parse_document(text)


@pytest.mark.parametrize(
    ("env", "valid"),
    [
        pytest.param({"A": "x", "B": 2, "C": 1.5}, {"A": "x", "B": "2", "C": "1.5"}, id="ok"),
        pytest.param({}, {}, id="empty"),
    ],
)
def test_validate_env_turns_numbers_into_strings(
    env: dict[Any, Any], valid: dict[str, str]
) -> None:
    assert validate_env(env) == valid


@pytest.mark.parametrize(
    "env",
    [
        pytest.param({None: "x"}, id="none-name"),
        pytest.param({"PORT": "1"}, id="PORT"),
        pytest.param({"BRANCHYARD_NAMESPACE": "x"}, id="reserved-prefix"),
        pytest.param({"A": b"x"}, id="bytes-value"),
        pytest.param({"A": False}, id="bool-value"),
    ],
)
def test_validate_env_refuses_what_parse_document_refuses(env: dict[Any, Any]) -> None:
    with pytest.raises(InvalidSettings):
        validate_env(env)


@pytest.mark.parametrize(
    ("env", "text"),
    [
        pytest.param({}, "env: {}\n", id="empty"),
        pytest.param({"GREETING": "hi"}, "env:\n  GREETING: hi\n", id="one"),
        pytest.param({"B": "2", "A": "1"}, "env:\n  A: '1'\n  B: '2'\n", id="sorted-and-quoted"),
    ],
)
def test_a_document_is_rendered_as_env_sorted(env: dict[str, str], text: str) -> None:
    assert render_document(env) == text


@pytest.mark.parametrize(
    "env",
    [
        pytest.param({}, id="empty"),
        pytest.param({"GREETING": "hi"}, id="plain"),
        pytest.param(
            {"A": "yes", "B": "1.0", "C": "null", "D": "~", "E": "017", "F": "true"},
            id="strings-that-look-like-other-types",
        ),
        pytest.param({"A": "", "B": " padded ", "C": "a: b", "D": "#x", "E": "- x"}, id="syntax"),
        pytest.param({"A": "line one\nline two", "B": "tab\there", "C": "\r\n"}, id="whitespace"),
        pytest.param({"A": "ünïcode 修复 🚀", "B": "'\"\\"}, id="unicode-and-quotes"),
        pytest.param({"URL": "http://127.0.0.1:8000/?a=1&b=%20"}, id="url"),
    ],
)
def test_a_rendered_document_parses_back_to_the_same_env(env: dict[str, str]) -> None:
    assert parse_document(render_document(env)) == env


ENV_NAMES = st.from_regex(r"\A[A-Za-z_][A-Za-z0-9_]{0,12}\Z").filter(
    lambda name: name not in ("PORT", "HOST") and not name.startswith("BRANCHYARD_")
)
ENV_VALUES = st.text(st.characters(codec="utf-8", exclude_characters="\0"))


@hypothesis.settings(max_examples=40)
@given(st.dictionaries(ENV_NAMES, ENV_VALUES, max_size=4))
def test_any_valid_env_survives_a_render_and_parse(env: dict[str, str]) -> None:
    assert parse_document(render_document(env)) == env


def test_an_env_that_is_a_list_is_refused_even_when_empty() -> None:
    with pytest.raises(InvalidSettings, match="env must map"):
        parse_document("env: []\n")


@pytest.mark.parametrize(
    ("text", "blank"),
    [
        pytest.param("", True, id="empty"),
        pytest.param("\n  \n\t\n", True, id="whitespace"),
        pytest.param("# env of app in namespace main.\n# save it unchanged\n", True, id="comments"),
        pytest.param("  # indented comment\n", True, id="indented-comment"),
        pytest.param("env: {}\n", False, id="an-empty-env-said-so"),
        pytest.param("env:\n", False, id="env-key-alone"),
        pytest.param("# header\nenv:\n  A: b\n", False, id="a-document"),
    ],
)
def test_a_document_of_only_blanks_and_comments_is_blank(text: str, blank: bool) -> None:
    assert is_blank_document(text) is blank


@pytest.mark.parametrize(
    ("given", "current"),
    [
        pytest.param("", "", id="never-set"),
        pytest.param("3f2c1ab", "3f2c1ab", id="same"),
        pytest.param("3f2c1ab", "3f2c1ab9", id="git-abbreviates-longer-now"),
        pytest.param("3f2c1ab9", "3f2c1ab", id="git-abbreviated-longer-then"),
    ],
)
def test_a_change_from_the_current_version_is_accepted(given: str, current: str) -> None:
    check_version(given, current, "app in main")


@pytest.mark.parametrize(
    ("given", "current", "shown"),
    [
        pytest.param("", "3f2c1ab", "(none) (now 3f2c1ab)", id="made-from-nothing"),
        pytest.param("3f2c1ab", "9e0d4c2", "3f2c1ab (now 9e0d4c2)", id="older"),
        pytest.param("3f2c", "3f2c1ab", "3f2c (now 3f2c1ab)", id="too-short-to-compare"),
        pytest.param("3f2c1ab", "", "3f2c1ab (now (none))", id="settings-gone"),
    ],
)
def test_a_change_from_another_version_is_refused_with_409(
    given: str, current: str, shown: str
) -> None:
    with pytest.raises(StaleVersion) as caught:
        check_version(given, current, "app in main")
    assert caught.value.message == (
        f"the settings of app in main changed since version {shown}; start again from the latest"
    )
    assert (caught.value.code, caught.value.status) == ("stale_version", 409)


@pytest.mark.parametrize(
    ("old", "new", "said"),
    [
        pytest.param({}, {}, "", id="nothing"),
        pytest.param({"A": "1"}, {"A": "1"}, "", id="same"),
        pytest.param({}, {"B": "1", "A": "2"}, "set A B", id="added-sorted"),
        pytest.param({"A": "1"}, {"A": "2"}, "set A", id="changed"),
        pytest.param({"A": "1", "B": "2"}, {"B": "2"}, "unset A", id="removed"),
        pytest.param({"A": "1"}, {"B": "1"}, "set B; unset A", id="renamed"),
        pytest.param(
            {}, {f"K{i}": "x" for i in range(8)}, "set K0 K1 K2 K3 K4 and 3 more", id="many"
        ),
    ],
)
def test_a_change_is_described_by_what_it_sets_and_unsets(
    old: dict[str, str], new: dict[str, str], said: str
) -> None:
    assert describe_change(old, new) == said
