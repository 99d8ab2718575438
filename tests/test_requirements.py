"""The local paths dependency files reference, as pure functions (see runtime.requirements)."""

from __future__ import annotations

import pytest

from branchyard.runtime.requirements import (
    Reference,
    pyproject_references,
    requirement_references,
    resolve,
)


@pytest.mark.parametrize(
    ("line", "found"),
    [
        pytest.param("requests>=2 ; python_version > '3'", [], id="a-specifier"),
        pytest.param("vlib", [Reference("vlib", certain=False)], id="a-bare-word-maybe-a-dir"),
        pytest.param("./evilpkg", [Reference("./evilpkg")], id="dot-slash"),
        pytest.param("libs/vlib  # vendored", [Reference("libs/vlib")], id="a-slash-no-dot"),
        pytest.param("../elsewhere", [Reference("../elsewhere")], id="up"),
        pytest.param("/opt/x", [Reference("/opt/x")], id="absolute"),
        pytest.param("-e ./pkg[dev]", [Reference("./pkg")], id="editable-with-extras"),
        pytest.param("--editable=./pkg", [Reference("./pkg")], id="editable-equals"),
        pytest.param("-e .", [Reference(".")], id="the-repo-itself"),
        pytest.param("-r other.txt", [Reference("other.txt", nested=True)], id="requirement"),
        pytest.param("-rother.txt", [Reference("other.txt", nested=True)], id="requirement-glued"),
        pytest.param(
            "--requirement=more.txt", [Reference("more.txt", nested=True)], id="requirement-long"
        ),
        pytest.param("-c c.txt", [Reference("c.txt", nested=True)], id="constraint"),
        pytest.param("-f ./wheels", [Reference("./wheels")], id="find-links"),
        pytest.param("--find-links https://example.com/", [], id="find-links-url"),
        pytest.param("--index-url https://pypi.org/simple", [], id="index-url"),
        pytest.param("file:./x", [Reference("./x")], id="file-url"),
        pytest.param("name @ file:./y", [Reference("./y")], id="direct-file-url"),
        pytest.param("name @ file:///abs/y", [Reference("/abs/y")], id="direct-absolute-file"),
        pytest.param("name @ https://example.com/x.whl", [], id="direct-http"),
        pytest.param("git+https://github.com/a/b", [], id="vcs"),
        pytest.param("dist/a-1.0-py3-none-any.whl", [Reference("dist/a-1.0-py3-none-any.whl")]),
        pytest.param("a-1.0-py3-none-any.whl", [Reference("a-1.0-py3-none-any.whl")], id="wheel"),
        pytest.param("# ./commented", [], id="a-comment"),
        pytest.param("./a \\\n  # continued", [Reference("./a")], id="a-continuation"),
    ],
)
def test_a_requirements_line_references_the_paths_pip_and_uv_read(
    line: str, found: list[Reference]
) -> None:
    assert requirement_references(line + "\n") == found


@pytest.mark.parametrize(
    ("text", "found"),
    [
        pytest.param(
            '[project]\ndependencies = ["a @ file:./libs/a", "b>=1", "vlib"]\n',
            [Reference("./libs/a")],
            id="dependencies-certain-only",
        ),
        pytest.param(
            '[project]\ndependencies = ["c"]\n[tool.uv.sources]\nc = { path = "./c" }\n',
            [Reference("./c")],
            id="uv-sources",
        ),
        pytest.param(
            '[tool.uv.sources]\nc = [{ path = "./c" }, { index = "x" }]\n',
            [Reference("./c")],
            id="uv-sources-list",
        ),
        pytest.param('[project]\ndynamic = ["dependencies"]\n', None, id="dynamic"),
        pytest.param("[project\n", None, id="unreadable"),
        pytest.param("", [], id="empty"),
    ],
)
def test_pyproject_references_its_dependencies_paths_or_says_nothing_when_dynamic(
    text: str, found: list[Reference] | None
) -> None:
    assert pyproject_references(text) == found


@pytest.mark.parametrize(
    ("base", "path", "resolved"),
    [
        ("", "./libs/vlib", "libs/vlib"),
        ("", ".", ""),
        ("reqs", "../libs/x", "libs/x"),
        ("reqs", "other.txt", "reqs/other.txt"),
        ("", "../x", None),
        ("", "/etc", None),
        ("a", "../..", None),
    ],
)
def test_a_reference_resolves_to_a_path_of_the_tree_or_none_outside(
    base: str, path: str, resolved: str | None
) -> None:
    assert resolve(base, path) == resolved
