"""Checkouts: the tree checked from git's objects, then unpacked in a box as its user.

The exploit of issue 18 is built here with git plumbing, as a push brings it: a
tree whose entries repeat names (a symlink and a directory both named ``a``) and
a chain of long directory names, which ``git archive`` turns into the tar of
CVE-2025-4517. Extracted with ``tarfile``'s data filter on Python 3.11.7 it wrote
a file into the home and a ``.pth`` into the daemon's own venv.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import zlib
from collections.abc import Callable
from pathlib import Path

import pytest

from branchyard.errors import BuildFailed
from branchyard.git import Source
from branchyard.runtime.logs import Appender
from branchyard.runtime.sandbox import BOX_USER, detect
from branchyard.runtime.unpack import check_out
from tests.conftest import ServiceRepo, git, start_daemon, stop_cleanly, wait_for
from tests.test_failed_deploys import revisions

STEPS = "abcdefghijklmnop"


def put(repo: Path, kind: str, data: bytes) -> str:
    """Write an object as it is (``--literally``: no check of what a tree holds)."""
    done = subprocess.run(
        ["git", "hash-object", "-w", "--literally", "-t", kind, "--stdin"],
        cwd=repo,
        input=data,
        capture_output=True,
        check=True,
    )
    return done.stdout.decode().strip()


def tree(repo: Path, entries: list[tuple[str, str, str]]) -> str:
    """A tree of ``(mode, name, oid)`` entries, in the order given, repeated names kept."""
    raw = b"".join(
        f"{mode} {name}".encode() + b"\0" + bytes.fromhex(oid) for mode, name, oid in entries
    )
    return put(repo, "tree", raw)


def link(repo: Path, target: str) -> str:
    return put(repo, "blob", target.encode())


def malicious_tree(repo: Path, dest_length: int) -> str:
    """CVE-2025-4517's archive as a git tree, for a checkout at a path of ``dest_length``
    characters four levels below the home: ``escape/pwned`` lands in the home and
    ``site/owned.pth`` in this interpreter's site-packages, through links that realpath()
    cannot expand (their expansion passes PATH_MAX) and the data filter so lets by."""
    component = "d" * ((os.pathconf("/", "PC_PATH_MAX") - dest_length - 1) // (len(STEPS) + 1))
    # The chain of real directories, deepest first (not empty: git archive leaves those out),
    # a link to the next at each level.
    real = tree(repo, [("100644", "kept", put(repo, "blob", b""))])
    for step in reversed(STEPS[1:]):
        real = tree(repo, [("40000", component, real), ("120000", step, link(repo, component))])
    up_to_top = "/".join([".."] * len(STEPS))
    through = tree(repo, [("120000", "l" * 254, link(repo, up_to_top))])
    for step in reversed(STEPS[1:]):
        through = tree(repo, [("40000", step, through)])
    linkpath = "/".join([*STEPS, "l" * 254])
    site = Path(sys.prefix, "lib", f"python{sys.version_info[0]}.{sys.version_info[1]}")
    to_root = "/".join([".."] * (len(STEPS) + 1))  # as deep as the links go: still "inside"
    pwned = put(repo, "blob", b"written outside the checkout\n")
    pth = put(repo, "blob", b"# written into the daemon's venv by a push\n")
    return tree(
        repo,
        [
            ("100644", "Procfile", put(repo, "blob", b"web: python3 -m http.server $PORT\n")),
            ("40000", component, real),
            ("120000", "a", link(repo, component)),
            ("40000", "a", through),
            ("120000", "escape", link(repo, f"{linkpath}/../../../..")),
            ("40000", "escape", tree(repo, [("100644", "pwned", pwned)])),
            (
                "120000",
                "site",
                link(repo, f"{linkpath}/{to_root}{site}/site-packages"),
            ),
            ("40000", "site", tree(repo, [("100644", "owned.pth", pth)])),
        ],
    )


def commit_tree(repo: ServiceRepo, root: str, message: str) -> str:
    parent = git("rev-parse", "HEAD", cwd=repo.clone)
    sha = git("commit-tree", root, "-p", parent, "-m", message, cwd=repo.clone)
    git("update-ref", "refs/heads/main", sha, cwd=repo.clone)
    return sha


class Unrecorded:
    """A registry for boxes started outside a daemon."""

    def add_process(self, pgid: int, started: str, what: str) -> None:
        return None

    def remove_process(self, pgid: int) -> None:
        return None


def checked_out(repo: Path, sha: str, dest: Path, limit: int = 1 << 30) -> None:
    async def scenario() -> None:
        source = Source(str(repo), repo / "unused")
        try:
            with Appender(dest.parent / "build.log") as log:
                await check_out(source, sha, dest, limit, log, Unrecorded(), detect())
        finally:
            await source.close()

    asyncio.run(scenario())


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    git("init", "-q", "-b", "main", str(tmp_path / "repo"))
    return tmp_path / "repo"


def commit(repo: Path, files: dict[str, str]) -> str:
    for name, text in files.items():
        (repo / name).parent.mkdir(parents=True, exist_ok=True)
        (repo / name).write_text(text)
    git("add", "-A", cwd=repo)
    git("commit", "-q", "-m", "files", cwd=repo)
    return git("rev-parse", "HEAD", cwd=repo)


def test_a_checkout_is_written_by_the_box_user_and_holds_the_tree(
    repo: Path, tmp_path: Path
) -> None:
    (repo / "link").symlink_to("sub/file")
    sha = commit(repo, {"Procfile": "web: x\n", "sub/file": "inside\n"})
    dest = tmp_path / "checkout"
    checked_out(repo, sha, dest)
    assert (dest / "link").read_text() == "inside\n"
    owner = BOX_USER if os.geteuid() == 0 else os.geteuid()
    for path in [dest, *dest.rglob("*")]:
        assert path.lstat().st_uid == owner, path


def test_a_name_tar_cannot_write_fails_the_checkout_in_one_line_and_leaves_nothing(
    repo: Path, tmp_path: Path
) -> None:
    long = [("100644", "x" * 300, put(repo, "blob", b"a name no file system takes\n"))]
    sha = git("commit-tree", tree(repo, long), "-m", "a long name", cwd=repo)
    dest = tmp_path / "checkout"
    with pytest.raises(BuildFailed) as caught:
        checked_out(repo, sha, dest)
    assert caught.value.message.startswith(f"cannot check out {sha[:7]}: tar: "), caught.value
    assert "File name too long" in caught.value.message
    assert not dest.exists()


def test_a_git_archive_that_fails_fails_the_checkout_saying_so_and_leaves_nothing(
    repo: Path, tmp_path: Path
) -> None:
    sha = commit(repo, {"Procfile": "web: x\n", "big": "0123456789" * 10000})
    blob = git("rev-parse", f"{sha}:big", cwd=repo)
    loose = repo / ".git" / "objects" / blob[:2] / blob[2:]
    whole = zlib.compress(f"blob {100000}\0".encode() + b"0123456789" * 10000)
    loose.chmod(0o644)
    loose.write_bytes(whole[:64])  # its header reads, its content does not
    dest = tmp_path / "checkout"
    with pytest.raises(BuildFailed) as caught:
        checked_out(repo, sha, dest)
    assert caught.value.message.startswith(f"cannot check out {sha[:7]}: "), caught.value
    assert "git archive: " in caught.value.message
    assert "\n" not in caught.value.message
    assert not dest.exists()


def test_a_commit_over_the_size_limit_is_refused_before_anything_is_written(
    repo: Path, tmp_path: Path
) -> None:
    sha = commit(repo, {"Procfile": "web: x\n", "data": "x" * 5000})
    dest = tmp_path / "checkout"
    with pytest.raises(BuildFailed) as caught:
        checked_out(repo, sha, dest, limit=4096)
    assert caught.value.message == (
        "the commit's files add up to 4.9 KiB, over the checkout limit of 4.0 KiB "
        "(up --max-checkout-size)"
    )
    assert not dest.exists()


def site_files() -> set[Path]:
    return set(Path(sys.prefix).glob("lib/python3*/site-packages/*.pth"))


def test_the_cve_2025_4517_tree_is_refused_naming_the_path_and_writes_nothing_outside(
    tmp_path: Path, make_repo: Callable[..., ServiceRepo]
) -> None:
    app = make_repo("app")
    daemon = start_daemon(tmp_path / "home")
    pth_before = site_files()
    try:
        daemon.cli("repo", "add", str(app.origin))
        first = wait_for(lambda: daemon.answer("app")["env"]["BRANCHYARD_REVISION"], 30, "v1")
        dest = daemon.home.resolve() / "builds" / "main" / "app" / "v2-0000000"
        sha = commit_tree(app, malicious_tree(app.clone, len(str(dest))), "CVE-2025-4517")
        app.push("main")
        wait_for(lambda: revisions(daemon, "app")[0] == (2, "failed"), 60, "v2 failed")
        why = "a is in the commit twice (a malformed tree, as git fsck says)"
        assert daemon.row("main", "app")["reason"] == why
        assert not (daemon.home / "pwned").exists()
        assert site_files() == pth_before
        assert not list(dest.parent.glob(f"v2-{sha[:7]}*"))
        assert daemon.answer("app")["env"]["BRANCHYARD_REVISION"] == first
    finally:
        for written in site_files() - pth_before:
            written.unlink()  # what the exploit wrote where it worked, not to run again
        stop_cleanly(daemon)


def peak_memory(pid: int) -> int:
    """The most resident memory ``pid`` has had, in bytes (VmHWM)."""
    status = Path(f"/proc/{pid}/status").read_text()
    (line,) = (line for line in status.splitlines() if line.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024


BIG = 300 * 2**20


def commit_big_file(app: ServiceRepo) -> str:
    """A 300 MiB file of zeros: a push of well under a megabyte."""
    subprocess.run(["truncate", "-s", str(BIG), str(app.clone / "big")], check=True)
    return app.commit({}, "a big file")


def test_a_commit_over_the_checkout_limit_fails_its_revision_with_both_sizes(
    tmp_path: Path, make_repo: Callable[..., ServiceRepo]
) -> None:
    app = make_repo("app")
    daemon = start_daemon(tmp_path / "home", "--max-checkout-size", str(100 * 2**20))
    try:
        daemon.cli("repo", "add", str(app.origin))
        first = wait_for(lambda: daemon.answer("app")["env"]["BRANCHYARD_REVISION"], 30, "v1")
        commit_big_file(app)
        app.push()
        wait_for(lambda: revisions(daemon, "app")[0] == (2, "failed"), 60, "v2 failed")
        assert daemon.row("main", "app")["reason"] == (
            "the commit's files add up to 300.0 MiB, over the checkout limit of 100.0 MiB "
            "(up --max-checkout-size)"
        )
        assert daemon.answer("app")["env"]["BRANCHYARD_REVISION"] == first
    finally:
        stop_cleanly(daemon)


def test_a_big_checkout_streams_through_the_daemon_which_never_holds_it(
    tmp_path: Path, make_repo: Callable[..., ServiceRepo]
) -> None:
    app = make_repo("app")
    daemon = start_daemon(tmp_path / "home")
    try:
        daemon.cli("repo", "add", str(app.origin))
        wait_for(lambda: daemon.answer("app"), 30, "v1 live")
        before = peak_memory(daemon.process.pid)
        sha = commit_big_file(app)
        app.push()
        wait_for(lambda: daemon.serves("app", "main", sha), 120, "the big commit live")
        (checkout,) = (daemon.home / "builds" / "main" / "app").glob(f"v2-{sha[:7]}")
        assert (checkout / "big").stat().st_size == BIG
        grown = peak_memory(daemon.process.pid) - before
        assert grown < BIG // 3, f"the daemon's peak grew by {grown} bytes"
    finally:
        stop_cleanly(daemon)
