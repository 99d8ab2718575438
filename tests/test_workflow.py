"""The seed workflow of DESIGN.md, end to end, against the real daemon."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import Daemon, ServiceRepo, git, wait_for

pytestmark = pytest.mark.integration

EDITOR = """\
import sys
path = sys.argv[1]
text = open(path).read()
open(path, "w").write(text.replace("env: {}", "env:\\n  GREETING: hi from bugfix"))
"""


def test_three_repos_branched_into_bugfix_become_one_wired_namespace(
    daemon: Daemon, make_repo: Callable[..., ServiceRepo], tmp_path: Path
) -> None:
    repos = {name: make_repo(name) for name in ("app", "other_app", "web")}
    for repo in repos.values():
        daemon.cli("repo", "add", str(repo.origin))
    wait_for(lambda: daemon.ps_q() == ["main:app", "main:other_app", "main:web"], 60, "baseline")

    expected: list[str] = []
    for name, repo in repos.items():
        repo.checkout("bugfix")
        repo.push("bugfix")
        expected.append(f"bugfix:{name}")
        wait_for(lambda: daemon.ps_q("bugfix") == expected, 30, f"ps -q {expected}")

    sha = {name: repo.commit({}, "noop") for name, repo in repos.items()}
    for repo in repos.values():
        repo.push("bugfix")
    wait_for(lambda: all(daemon.serves(n, "bugfix", sha[n]) for n in repos), 60, "all live")

    web = daemon.answer("web", "bugfix")["env"]
    assert web["BRANCHYARD_NAMESPACE"] == "bugfix"
    assert web["BRANCHYARD_BRANCH"] == "bugfix"
    assert web["APP_URL"].startswith("http://127.0.0.1:")
    assert set(web) >= {"APP_URL", "OTHER_APP_URL", "PORT", "BRANCHYARD_SERVICE"}
    reached = daemon.answer("web", "bugfix", "/call/OTHER_APP_URL")["env"]
    assert reached["BRANCHYARD_NAMESPACE"] == "bugfix"
    assert reached["BRANCHYARD_SERVICE"] == "other_app"

    editor = tmp_path / "editor.py"
    editor.write_text(EDITOR)
    done = daemon.cli("-n", "bugfix", "edit", "web", env={"EDITOR": f"{sys.executable} {editor}"})
    assert "bugfix:web settings" in done.stdout
    wait_for(
        lambda: daemon.answer("web", "bugfix")["env"].get("GREETING") == "hi from bugfix",
        60,
        "web with the new env",
    )
    assert "GREETING" not in daemon.answer("web", "main")["env"]
    history = daemon.cli("-n", "bugfix", "history", "web").stdout
    assert "edit web in bugfix" in history
    assert "+  GREETING: hi from bugfix" in history
    assert "Tess Ter" in history
    assert daemon.cli("-n", "bugfix", "env", "ls", "web").stdout == "GREETING=hi from bugfix\n"

    code_change = repos["web"].commit({"extra.txt": "x"}, "code change")
    repos["web"].push("bugfix")
    wait_for(lambda: daemon.serves("web", "bugfix", code_change), 60, "web's new commit")
    assert daemon.answer("web", "bugfix")["env"]["GREETING"] == "hi from bugfix"


def test_a_repo_with_a_work_tree_runs_each_commit_made_in_it(
    daemon: Daemon, make_repo: Callable[..., ServiceRepo]
) -> None:
    repo = make_repo("solo")
    daemon.cli("repo", "add", str(repo.clone))
    first = git("rev-parse", "HEAD", cwd=repo.clone)
    wait_for(lambda: daemon.serves("solo", "main", first), 60, "the first commit live")

    second = repo.commit({}, "Made in the work tree, never pushed")
    wait_for(lambda: daemon.serves("solo", "main", second), 60, "the new commit live")
    revisions = daemon.cli("revisions", "solo").stdout
    assert "Made in the work tree, never pushed" in revisions
