"""Bad input gets a clear one-line message and a non-zero exit, and loses nothing."""

from __future__ import annotations

import http.client
import json
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import Daemon, ServiceRepo, stdlib_service, wait_for

pytestmark = pytest.mark.integration


def _fails_with(done: object, *words: str) -> None:
    stderr = getattr(done, "stderr", "")
    assert getattr(done, "returncode", 0) == 1, stderr
    assert stderr.startswith("error: ") and stderr.count("\n") == 1, stderr
    for word in words:
        assert word in stderr, stderr


def test_a_path_that_is_not_a_git_repo_is_refused(daemon: Daemon, tmp_path: Path) -> None:
    plain = tmp_path / "plain"
    plain.mkdir()
    _fails_with(daemon.cli("repo", "add", str(plain), check=False), "not a git repository")
    _fails_with(daemon.cli("repo", "add", str(tmp_path / "nope"), check=False), "no such")
    assert daemon.cli("repo", "ls").stdout.count("\n") == 1


def test_a_repo_added_twice_is_refused_and_the_first_kept(
    daemon: Daemon, make_repo: Callable[..., ServiceRepo]
) -> None:
    app = make_repo("app")
    daemon.cli("repo", "add", str(app.origin))
    _fails_with(daemon.cli("repo", "add", str(app.origin), check=False), "already registered")
    _fails_with(
        daemon.cli("repo", "add", str(app.origin), "--name", "other", check=False), "already"
    )
    assert "app" in daemon.cli("repo", "ls").stdout
    wait_for(lambda: daemon.answer("app"), 30, "app still deploys")


def test_odd_branch_names_get_valid_distinct_namespaces(
    daemon: Daemon, make_repo: Callable[..., ServiceRepo]
) -> None:
    app = make_repo("app")
    daemon.cli("repo", "add", str(app.origin))
    long_name = "feature/" + "x" * 192
    for branch in (long_name, "fix/ünïcode-ß", "Fix/Unicode-SS"):
        app.checkout(branch)
        app.push(branch)
        app.checkout("main", new=False)
    wait_for(
        lambda: len(json.loads(daemon.cli("ps", "-A", "--format", "json").stdout)) == 4,
        30,
        "four namespaces",
    )
    namespaces = {r["namespace"]: r for r in daemon.ps_json("-A")}
    assert len(namespaces) == 4
    for name in namespaces:
        assert 0 < len(name) <= 63 and name == name.lower(), name
        assert all(c.isalnum() or c == "-" for c in name) and name.isascii(), name
    long_ns = next(n for n in namespaces if n.startswith("feature-x"))
    wait_for(
        lambda: daemon.answer("app", long_ns)["env"]["BRANCHYARD_BRANCH"] == long_name,
        30,
        "long branch serves",
    )


def test_a_procfile_without_web_fails_with_a_reason_in_ps(
    daemon: Daemon, make_repo: Callable[..., ServiceRepo]
) -> None:
    app = make_repo("app", {"Procfile": "worker: python w.py\n"})
    daemon.cli("repo", "add", str(app.origin))
    row = wait_for(lambda: (r := daemon.row("main", "app"))["state"] == "failed" and r, 30)
    assert "web:" in row["reason"]
    assert "web:" in daemon.cli("ps").stdout


def test_a_failing_build_keeps_the_previous_revision_serving(
    daemon: Daemon, make_repo: Callable[..., ServiceRepo]
) -> None:
    app = make_repo("app")
    daemon.cli("repo", "add", str(app.origin))
    first = wait_for(lambda: daemon.answer("app")["env"]["BRANCHYARD_REVISION"], 30)
    bad = "build:\n  - echo compiling the thing && exit 3\n"
    app.commit({"branchyard.yaml": bad}, "broken build")
    app.push()
    row = wait_for(lambda: (r := daemon.row("main", "app"))["reason"] and r, 30, "failure")
    assert "exited 3" in row["reason"]
    assert row["state"].startswith("live (v")
    assert daemon.answer("app")["env"]["BRANCHYARD_REVISION"] == first
    assert "compiling the thing" in daemon.cli("logs", "--build", "app").stdout
    command = "branchyard logs app --revision 2 --build"
    assert row["logs_command"] == command
    assert daemon.cli("ps").stdout.splitlines()[-1] == f"main:app v2 failed; see: {command}"
    assert "compiling the thing" in daemon.cli(*command.split()[1:]).stdout
    assert "compiling the thing" not in daemon.cli("logs", "app", "--revision", "v1").stdout


@pytest.mark.parametrize(
    ("files", "words"),
    [
        (
            {"app.py": "import sys\nprint('boom', flush=True)\nsys.exit(4)\n"},
            r"exited with code 4 before passing its health check; last output: boom",
        ),
        (
            {
                "app.py": "print('warming up', flush=True)\nimport time\ntime.sleep(600)\n",
                "branchyard.yaml": "health:\n  path: /\n  timeout: 2\n",
            },
            r"health check GET / on port \d+ did not pass within 2 s \(no answer\); "
            r"last output: warming up",
        ),
    ],
    ids=["exits-at-once", "never-answers"],
)
def test_a_service_that_dies_or_never_answers_never_takes_traffic_and_says_why(
    daemon: Daemon, make_repo: Callable[..., ServiceRepo], files: dict[str, str], words: str
) -> None:
    app = make_repo("app")
    daemon.cli("repo", "add", str(app.origin))
    first = wait_for(lambda: daemon.answer("app")["env"]["BRANCHYARD_REVISION"], 30)
    app.commit(files, "broken")
    app.push()
    row = wait_for(lambda: (r := daemon.row("main", "app"))["reason"] and r, 30, "failure")
    assert re.fullmatch(words, row["reason"]), row["reason"]
    assert daemon.answer("app")["env"]["BRANCHYARD_REVISION"] == first
    assert row["logs_command"] == "branchyard logs app --revision 2"
    said = row["reason"].rsplit("last output: ", 1)[1]
    assert said in daemon.cli("logs", "app", "--revision", "2").stdout
    assert said not in daemon.cli("logs", "app").stdout  # that is the live v1's
    assert said in daemon.page("/ns/main/app")[1]  # the service page shows why


def test_unknown_namespaces_and_services_are_named_in_the_error(
    daemon: Daemon, make_repo: Callable[..., ServiceRepo]
) -> None:
    app = make_repo("app", stdlib_service())
    daemon.cli("repo", "add", str(app.origin))
    wait_for(lambda: daemon.ps_q() == ["main:app"], 30)
    _fails_with(daemon.cli("-n", "nope", "ps", check=False), "no namespace 'nope'", "main")
    _fails_with(daemon.cli("logs", "ghost", check=False), "no service 'ghost'", "app")
    _fails_with(daemon.cli("env", "set", "ghost", "A=1", check=False), "no service 'ghost'")
    _fails_with(daemon.cli("env", "set", "app", "PORT=1", check=False), "PORT")
    _fails_with(daemon.cli("env", "set", "app", "1BAD=1", check=False), "not a valid")
    _fails_with(daemon.cli("repo", "rm", "ghost", check=False), "no repo named 'ghost'")


def test_edit_saved_unchanged_or_invalid_changes_nothing(
    daemon: Daemon, make_repo: Callable[..., ServiceRepo], tmp_path: Path
) -> None:
    app = make_repo("app")
    daemon.cli("repo", "add", str(app.origin))
    wait_for(lambda: daemon.answer("app"), 30)
    _fails_with(daemon.cli("edit", "app", env={"EDITOR": "true"}, check=False), "unchanged")

    editor = tmp_path / "editor.py"
    seen = tmp_path / "seen.txt"
    editor.write_text(
        "import sys\n"
        "path = sys.argv[1]\n"
        "text = open(path).read()\n"
        f"open({str(seen)!r}, 'a').write(text + '\\n=====\\n')\n"
        "if 'error:' not in text:\n"
        "    open(path, 'w').write('env:\\n  - not a mapping\\n')\n"
    )
    done = daemon.cli("edit", "app", env={"EDITOR": f"python3 {editor}"}, check=False)
    _fails_with(done, "unchanged")
    rounds = seen.read_text().split("=====")
    assert "# error: env must map variable names to values" in rounds[1]
    assert daemon.cli("history", "app").stdout == ""
    assert daemon.cli("env", "ls", "app").stdout == ""


def test_edit_left_empty_or_with_only_comments_cancels_and_keeps_the_env(
    daemon: Daemon, make_repo: Callable[..., ServiceRepo], tmp_path: Path
) -> None:
    app = make_repo("app")
    daemon.cli("repo", "add", str(app.origin))
    wait_for(lambda: daemon.ps_q() == ["main:app"], 30)
    daemon.cli("env", "set", "app", "GREETING=hi")
    history = daemon.cli("history", "app").stdout
    comments_only = tmp_path / "comments_only.py"
    comments_only.write_text(
        "import sys\n"
        "lines = open(sys.argv[1]).read().splitlines(keepends=True)\n"
        "open(sys.argv[1], 'w').write(''.join(l for l in lines if l.startswith('#')))\n"
    )
    for editor in ("truncate -s 0", f"python3 {comments_only}"):
        done = daemon.cli("edit", "app", env={"EDITOR": editor}, check=False)
        _fails_with(done, "the file was left empty; nothing was changed")
    assert daemon.cli("env", "ls", "app").stdout == "GREETING=hi\n"
    assert daemon.cli("history", "app").stdout == history


def test_the_cli_says_how_to_start_the_daemon_when_it_is_down(tmp_path: Path) -> None:
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-m", "branchyard", "--home", str(tmp_path), "ps"],
        capture_output=True,
        text=True,
        check=False,
    )
    _fails_with(done, "not running", "branchyard up")


def test_a_repo_that_vanishes_shows_why_in_repo_ls_and_keeps_serving(
    daemon: Daemon, make_repo: Callable[..., ServiceRepo]
) -> None:
    import shutil

    app = make_repo("app")
    daemon.cli("repo", "add", str(app.origin))
    first = wait_for(lambda: daemon.answer("app")["env"]["BRANCHYARD_REVISION"], 30)
    moved = app.origin.with_name("moved.git")
    shutil.move(app.origin, moved)

    def status() -> str:
        listing = daemon.cli("repo", "ls").stdout.splitlines()
        return next(line for line in listing if line.startswith("app ")).split("  ")[-1].strip()

    wait_for(lambda: status() != "ok", 15, "the error in repo ls")
    assert "does not appear to be a git repository" in status()
    assert daemon.answer("app")["env"]["BRANCHYARD_REVISION"] == first
    shutil.move(moved, app.origin)
    wait_for(lambda: status() == "ok", 15, "reachable again")


def test_a_url_that_looks_like_a_git_option_runs_nothing(daemon: Daemon, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    for url in (f"--upload-pack=touch {marker};:x", f"-u touch {marker}"):
        done = daemon.cli("repo", "add", "--", url, check=False)
        assert done.returncode == 1, done.stdout
    for url in (f"--upload-pack=touch {marker};:x", f"x --upload-pack=touch {marker}"):
        status, body = _post(daemon, "/api/repos", {"url": url})
        assert status == 400 and body["error"] == "bad_request", body
        assert url in body["message"] and "\n" not in body["message"], body
    assert daemon.cli("repo", "ls").stdout.count("\n") == 1
    assert not marker.exists()


def _post(daemon: Daemon, path: str, body: object) -> tuple[int, dict[str, str]]:
    """The API's status and JSON answer to ``body`` POSTed to ``path`` with the token."""
    port = int(daemon.info["api"].rsplit(":", 1)[1])
    token = (daemon.home / "token").read_text().strip()
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    try:
        connection.request("POST", path, body=json.dumps(body), headers=headers)
        response = connection.getresponse()
        return response.status, json.loads(response.read())
    finally:
        connection.close()


@pytest.mark.parametrize(
    ("flags", "said"),
    [
        (["--node-selector", "pool"], "--node-selector 'pool' is not KEY=VALUE"),
        (["--toleration", "pool:Never"], "--toleration 'pool:Never' is not KEY[=VALUE]:EFFECT"),
        (["--install-cache", "lots"], "--install-cache must be a size like 256Mi"),
        (["--install-cache-class", "fast"],
         "--install-cache-class needs --install-cache: it is that volume's class"),
        (["--install-cache-access", "ReadWriteMany"],
         "--install-cache-access needs --install-cache: it is that volume's access mode"),
        (["--install-cache", "1Gi", "--install-cache-class", "Fast_Disks"],
         "--install-cache-class 'Fast_Disks' is not a class's name"),
    ],
)  # fmt: skip
def test_up_refuses_a_node_label_taint_or_install_cache_kubernetes_would_not_take(
    tmp_path: Path, flags: list[str], said: str
) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "branchyard", "--home", str(tmp_path), "up", *flags],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode != 0
    assert done.stderr.startswith(f"error: {said}")
    assert done.stderr.count("\n") == 1
    assert not (tmp_path / "token").exists()  # nothing started
