"""The checks on a pushed tree, as pure functions over git's listing of it."""

from __future__ import annotations

import pytest

from branchyard.trees import (
    Entry,
    human_size,
    leaves,
    link_refusal,
    parse_ls_tree,
    path_refusal,
    size_refusal,
)

OID = "a" * 40


def blob(path: str, size: int = 1) -> Entry:
    return Entry("100644", "blob", OID, size, path)


def tree(path: str) -> Entry:
    return Entry("040000", "tree", OID, 0, path)


def symlink(path: str) -> Entry:
    return Entry("120000", "blob", OID, 5, path)


def test_ls_tree_output_is_parsed_byte_for_byte() -> None:
    raw = (
        f"040000 tree {OID}       -\tsub\0"
        f"100644 blob {OID}      12\tsub/a b\0"
        f"160000 commit {OID}       -\tvendored\0"
    ).encode() + f"120000 blob {OID}       3\tl\xff\0".encode("latin-1")
    assert parse_ls_tree(raw) == [
        Entry("040000", "tree", OID, 0, "sub"),
        Entry("100644", "blob", OID, 12, "sub/a b"),
        Entry("160000", "commit", OID, 0, "vendored"),
        Entry("120000", "blob", OID, 3, "l\udcff"),
    ]


@pytest.mark.parametrize(
    ("entries", "refused"),
    [
        pytest.param([tree("a"), blob("a/x"), blob("b")], None, id="fine"),
        pytest.param(
            [symlink("a"), tree("a"), blob("a/x")],
            "a is in the commit twice (a malformed tree, as git fsck says)",
            id="symlink-and-directory",
        ),
        pytest.param(
            [blob("x"), blob("x")],
            "x is in the commit twice (a malformed tree, as git fsck says)",
            id="blob-twice",
        ),
        pytest.param(
            [tree(".git"), blob(".git/config")],
            ".git cannot be checked out: its path holds '.git'",
            id="dot-git",
        ),
        pytest.param(
            [tree("sub"), tree("sub/.GiT")],
            "sub/.GiT cannot be checked out: its path holds '.GiT'",
            id="dot-git-any-case",
        ),
        pytest.param([blob("..")], ".. cannot be checked out: its path holds '..'", id="dot-dot"),
        pytest.param([blob("a/./b")], "a/./b cannot be checked out: its path holds '.'", id="dot"),
        pytest.param(
            [blob("a//b")], "a//b cannot be checked out: its path holds an empty name", id="empty"
        ),
        pytest.param([blob("x\ny")], None, id="a-newline-is-part-of-a-name"),
        pytest.param([tree("git"), blob(".gitignore")], None, id="git-like-names"),
    ],
)
def test_paths_twice_or_with_dot_dot_or_dot_git_are_refused_naming_them(
    entries: list[Entry], refused: str | None
) -> None:
    assert path_refusal(entries) == refused


def test_a_refused_path_is_shown_printable_and_bounded() -> None:
    refused = path_refusal([blob("x\n" + "d" * 1000), blob("x\n" + "d" * 1000)])
    assert refused is not None
    assert "\n" not in refused and "x\\x0a" in refused and len(refused) < 400


@pytest.mark.parametrize(
    ("sizes", "limit", "refused"),
    [
        pytest.param([600, 424], 1024, None, id="at-the-limit"),
        pytest.param(
            [600, 425],
            1024,
            "the commit's files add up to 1.0 KiB, over the checkout limit of 1.0 KiB "
            "(up --max-checkout-size)",
            id="one-over",
        ),
        pytest.param(
            [300 * 2**20],
            100 * 2**20,
            "the commit's files add up to 300.0 MiB, over the checkout limit of 100.0 MiB "
            "(up --max-checkout-size)",
            id="big-file",
        ),
    ],
)
def test_files_that_add_up_to_more_than_the_limit_are_refused_with_both_sizes(
    sizes: list[int], limit: int, refused: str | None
) -> None:
    entries = [blob(f"f{n}", size) for n, size in enumerate(sizes)] + [tree("t")]
    assert size_refusal(entries, limit) == refused


@pytest.mark.parametrize(
    ("links", "path", "out"),
    [
        pytest.param({"l": "/etc/passwd"}, "l", True, id="absolute"),
        pytest.param({"l": "../x"}, "l", True, id="up"),
        pytest.param({"d/l": "../x"}, "d/l", False, id="up-within"),
        pytest.param({"d/l": "../../x"}, "d/l", True, id="up-and-out"),
        pytest.param({"l": "sub/../../x"}, "l", True, id="down-and-out"),
        pytest.param({"l": "./sub/../Procfile"}, "l", False, id="down-and-back"),
        pytest.param({"s": ".", "t": "s/.."}, "t", True, id="through-a-link-to-the-top"),
        pytest.param({"s": "d/e", "t": "s/.."}, "t", False, id="through-a-link-deeper"),
        pytest.param({"s": "/", "t": "s/x"}, "t", True, id="through-an-absolute-link"),
        pytest.param({"a": "b", "b": "a", "t": "a/x"}, "t", True, id="a-loop"),
        pytest.param({"l": ""}, "l", False, id="empty-target"),
    ],
)
def test_a_link_leads_out_when_its_target_resolved_through_the_tree_s_links_does(
    links: dict[str, str], path: str, out: bool
) -> None:
    assert leaves(path, links) is out


def test_the_first_link_that_leads_out_is_named_with_its_target() -> None:
    links = {"ok": "Procfile", "z": "/etc", "leak": "../../outside"}
    assert link_refusal(links) == "symlink leak points outside the checkout (to ../../outside)"
    assert link_refusal({"ok": "Procfile"}) is None


@pytest.mark.parametrize(
    ("size", "shown"),
    [
        (0, "0 bytes"),
        (1023, "1023 bytes"),
        (1024, "1.0 KiB"),
        (1536 * 2**20, "1.5 GiB"),
        (2**40, "1024.0 GiB"),
    ],
)
def test_sizes_are_shown_in_binary_units(size: int, shown: str) -> None:
    assert human_size(size) == shown
