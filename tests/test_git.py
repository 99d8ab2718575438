"""The git seam against real repositories: reading objects through one cat-file process."""

from __future__ import annotations

import asyncio
import os
import subprocess
from pathlib import Path

import pytest

from branchyard.errors import BuildFailed, GitError
from branchyard.git import (
    Heads,
    Login,
    Source,
    choose_default_branch,
    commit_subject,
    ls_remote,
    parse_ls_remote,
    remote,
    split_login,
)
from tests.conftest import git, wait_for


def commit(repo: Path, files: dict[str, str], message: str) -> str:
    for name, text in files.items():
        (repo / name).write_text(text)
    git("add", ".", cwd=repo)
    git("commit", "-q", "-m", message, cwd=repo)
    return git("rev-parse", "HEAD", cwd=repo)


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    git("init", "-q", "-b", "main", cwd=tmp_path)
    return tmp_path


def cat_files() -> list[str]:
    """The pids of this process's `git cat-file --batch` children."""
    found = subprocess.run(
        ["pgrep", "-P", str(os.getpid()), "-f", "cat-file --batch"], capture_output=True, text=True
    )
    return found.stdout.split()


@pytest.mark.parametrize(
    ("raw", "subject"),
    [
        (b"tree t\nauthor a\n\nFix the login\n", "Fix the login"),
        (b"tree t\nauthor a\n\nFix the login\n\nBecause it broke.\n", "Fix the login"),
        (b"tree t\nauthor a\n\nA subject\nthat wraps\n\nbody\n", "A subject that wraps"),
        (b"tree t\nauthor a\n\n", ""),
        (b"tree t\nauthor a\n\n\xff bytes\n", "\ufffd bytes"),
    ],
)
def test_the_subject_is_the_first_paragraph_on_one_line(raw: bytes, subject: str) -> None:
    assert commit_subject(raw) == subject


A, B = "a" * 40, "b" * 40


@pytest.mark.parametrize(
    ("listed", "heads"),
    [
        pytest.param(
            f"ref: refs/heads/dev\tHEAD\n{A}\tHEAD\n{A}\trefs/heads/dev\n{B}\trefs/heads/main\n",
            Heads("dev", {"dev": A, "main": B}),
            id="head-names-the-default",
        ),
        pytest.param(
            f"{A}\trefs/heads/main\n{B}\trefs/heads/master\n",
            Heads("main", {"main": A, "master": B}, dangling_head=True),
            id="dangling-head-main-first",
        ),
        pytest.param(
            f"{B}\trefs/heads/master\n{A}\trefs/heads/x\n",
            Heads("master", {"master": B, "x": A}, dangling_head=True),
            id="dangling-head-then-master",
        ),
        pytest.param(
            f"{A}\trefs/heads/x\n", Heads(None, {"x": A}, dangling_head=True), id="nothing-to-guess"
        ),
        pytest.param(
            f"{A}\tHEAD\n{A}\trefs/heads/main\n",
            Heads("main", {"main": A}, dangling_head=True),
            id="detached-head",
        ),
        pytest.param(
            f"ref: refs/heads/gone\tHEAD\n{A}\trefs/heads/main\n",
            Heads("main", {"main": A}, dangling_head=True),
            id="head-names-a-missing-branch",
        ),
        pytest.param("", Heads(None, {}), id="empty-repo-is-not-dangling"),
    ],
)
def test_the_default_branch_is_head_s_else_main_else_master(listed: str, heads: Heads) -> None:
    assert parse_ls_remote(listed) == heads


@pytest.mark.parametrize(
    ("heads", "configured", "chosen"),
    [
        pytest.param(Heads("dev", {"dev": A, "main": B}), "trunk", "dev", id="head-first"),
        pytest.param(
            Heads("main", {"main": A, "trunk": B}, dangling_head=True),
            "trunk",
            "trunk",
            id="dangling-head-then-init-default-branch",
        ),
        pytest.param(
            Heads("main", {"main": A, "master": B}, dangling_head=True),
            "trunk",
            "main",
            id="configured-branch-missing-then-main",
        ),
        pytest.param(
            Heads("master", {"master": B, "x": A}, dangling_head=True),
            None,
            "master",
            id="then-master",
        ),
        pytest.param(
            Heads(None, {"x": A}, dangling_head=True), None, "main", id="none-of-them-main-waits"
        ),
        pytest.param(Heads(None, {}), "trunk", "trunk", id="empty-repo-init-default-branch"),
        pytest.param(Heads(None, {}), None, "main", id="empty-repo-main"),
    ],
)
def test_a_new_repo_s_default_branch_is_head_s_else_init_default_branch_else_main_else_master(
    heads: Heads, configured: str | None, chosen: str
) -> None:
    assert choose_default_branch(heads, configured) == chosen


def test_one_process_answers_every_question_and_sees_later_commits(repo: Path) -> None:
    first = commit(repo, {"Procfile": "web: python app.py\n", "a b.txt": "spaced\n"}, "First one")

    async def scenario() -> None:
        source = Source(str(repo), repo / "unused")
        assert await source.has(first)
        assert not await source.has("0" * 40)
        assert await source.read_file(first, "Procfile") == "web: python app.py\n"
        assert await source.read_file(first, "a b.txt") == "spaced\n"
        assert await source.read_file(first, "no such file") is None
        assert await source.read_file(first, ".") is None  # a tree, not a file
        assert await source.read_file(first, "x\nHEAD") is None
        assert await source.subject(first) == "First one"
        assert len(cat_files()) == 1

        second = commit(repo, {"Procfile": "web: python2 app.py\n"}, "Second\n\nwith a body")
        assert await source.has(second)
        assert await source.read_file(second, "Procfile") == "web: python2 app.py\n"
        assert await source.subject(second) == "Second"
        assert len(cat_files()) == 1

        await source.close()
        assert cat_files() == []

    asyncio.run(scenario())


def dead(pid: int) -> bool:
    """Whether the process ``pid`` has ended (a zombie not yet reaped, or gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] in ("Z", "X")


def test_a_reader_that_died_is_started_again(repo: Path) -> None:
    sha = commit(repo, {"Procfile": "web: x\n"}, "only")

    async def scenario() -> None:
        source = Source(str(repo), repo / "unused")
        assert await source.subject(sha) == "only"
        (pid,) = cat_files()
        os.kill(int(pid), 9)
        wait_for(lambda: dead(int(pid)), 10, "the reader to die")  # its pipes closed with it
        with pytest.raises(GitError, match="cannot read"):
            await source.subject(sha)  # the question it was asked when it died
        assert await source.subject(sha) == "only"
        (restarted,) = cat_files()
        assert restarted != pid
        await source.close()

    asyncio.run(scenario())


def test_a_question_cancelled_half_way_does_not_answer_the_next_one(repo: Path) -> None:
    sha = commit(repo, {"Procfile": "web: x\n", "branchyard.yaml": "run: y\n"}, "both")

    async def scenario() -> None:
        source = Source(str(repo), repo / "unused")
        for step in range(40):
            asked = asyncio.create_task(source.read_file(sha, "Procfile"))
            for _ in range(step % 8):
                await asyncio.sleep(0)
            await asyncio.sleep(0.0002 * (step // 8))
            asked.cancel()
            await asyncio.gather(asked, return_exceptions=True)
            assert await source.read_file(sha, "branchyard.yaml") == "run: y\n", step
        await source.close()

    asyncio.run(scenario())
    wait_for(lambda: cat_files() == [], 10, "every cat-file to end (those cancelled were killed)")


@pytest.mark.parametrize(
    ("target", "refused"),
    [
        ("/etc/passwd", "symlink leak points outside the checkout (to /etc/passwd)"),
        ("../../outside", "symlink leak points outside the checkout (to ../../outside)"),
        ("sub/../../x", "symlink leak points outside the checkout (to sub/../../x)"),
        ("Procfile", None),
        ("./sub/../Procfile", None),
    ],
)
def test_a_tree_with_a_link_that_leads_out_of_it_is_refused_from_git_s_objects(
    repo: Path, target: str, refused: str | None
) -> None:
    (repo / "leak").symlink_to(target)
    sha = commit(repo, {"Procfile": "web: x\n"}, "a link")

    async def scenario() -> None:
        source = Source(str(repo), repo / "unused")
        try:
            if refused is None:
                checked = await source.tree(sha)
                assert checked.entries["leak"].mode == "120000"
                assert checked.root == git("rev-parse", f"{sha}^{{tree}}", cwd=repo)
            else:
                with pytest.raises(BuildFailed) as caught:
                    await source.tree(sha)
                assert caught.value.message == refused
        finally:
            await source.close()

    asyncio.run(scenario())


def test_a_git_command_that_hangs_is_killed_when_it_is_cancelled() -> None:
    """A remote that accepts and never answers: cancelling the ls-remote ends git at once."""

    async def scenario() -> None:
        asked = asyncio.Event()
        silent = await asyncio.start_server(lambda r, w: asked.set(), "127.0.0.1", 0)
        port = silent.sockets[0].getsockname()[1]
        url = f"http://127.0.0.1:{port}/never.git"
        asking = asyncio.create_task(ls_remote(url))
        async with asyncio.timeout(10):
            await asked.wait()  # git's http helper is connected, waiting for an answer
        assert len(processes_with(url)) >= 2  # git and its helper
        asking.cancel()
        with pytest.raises(asyncio.CancelledError):
            await asking
        async with asyncio.timeout(5):
            while processes_with(url):
                await asyncio.sleep(0.02)
        silent.close()

    asyncio.run(scenario())


def processes_with(text: str) -> list[int]:
    """Pids of live processes whose command line holds ``text``."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if text.encode() in cmdline.read_bytes():
                found.append(int(cmdline.parent.name))
        except OSError:
            continue
    return found


@pytest.mark.parametrize(
    ("url", "given", "credentials"),
    [
        ("https://user:TOKEN@h/app.git", "https://h/app.git", ("user", "TOKEN")),
        ("http://u:p%40ss%3A@127.0.0.1:8080/a", "http://127.0.0.1:8080/a", ("u", "p@ss:")),
        ("https://TOKEN@h/app.git", "https://h/app.git", ("TOKEN", "")),
        ("HTTPS://u:p@h", "HTTPS://h", ("u", "p")),
        ("https://h/app.git", "https://h/app.git", None),
        ("ssh://git@h/app.git", "ssh://git@h/app.git", None),
        ("git@h:team/app.git", "git@h:team/app.git", None),
        ("/srv/git/app.git", "/srv/git/app.git", None),
    ],
)
def test_credentials_in_a_url_reach_git_through_its_environment_not_its_argv(
    url: str, given: str, credentials: tuple[str, str] | None
) -> None:
    assert split_login(url) == (given, Login(*credentials) if credentials else None)
    found = remote(url)
    assert found.url == given
    handed = (found.env.get("BRANCHYARD_GIT_USERNAME"), found.env.get("BRANCHYARD_GIT_PASSWORD"))
    assert handed == (credentials or (None, None))
    keys = {found.env.get(f"GIT_CONFIG_KEY_{n}") for n in (0, 1)}
    assert keys == ({"credential.helper"} if credentials is not None else {None})
