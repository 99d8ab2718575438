"""Settings changed by many clients at once, and by a daemon killed half-way: nothing lost.

Every acknowledged change must be kept exactly once, as one commit whose message
matches its content; a change sent against a stale version is refused (409);
after a crash the settings are the HEAD of the settings repo.
"""

from __future__ import annotations

import http.client
import json
import os
import subprocess
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import (
    Daemon,
    ServiceRepo,
    git,
    processes_with,
    start_daemon,
    stop_cleanly,
    wait_for,
)

pytestmark = pytest.mark.integration

ENV_PATH = "/api/namespaces/main/services/app/env"


def api(daemon: Daemon, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    port = int(daemon.info["api"].rsplit(":", 1)[1])
    token = (daemon.home / "token").read_text().strip()
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    try:
        payload = None if body is None else json.dumps(body)
        connection.request(method, path, body=payload, headers=headers)
        response = connection.getresponse()
        return response.status, json.loads(response.read())
    finally:
        connection.close()


def commits(daemon: Daemon) -> list[tuple[str, str]]:
    """(subject, the lines the commit added or removed) of each settings commit of app."""
    found = []
    for change in api(daemon, "GET", "/api/namespaces/main/services/app/history")[1]:
        lines = [
            line
            for line in change["diff"].splitlines()
            if line.startswith(("+ ", "- ")) and not line.startswith(("+++", "---"))
        ]
        found.append((change["message"], "\n".join(lines)))
    return found


def settings_status(daemon: Daemon) -> str:
    return git("status", "--porcelain", "--untracked-files=all", cwd=daemon.home / "settings")


def start_cli(daemon: Daemon, *args: str) -> subprocess.Popen[str]:
    """A CLI command started, not waited for: many run at once."""
    return subprocess.Popen(
        [sys.executable, "-m", "branchyard", "--home", str(daemon.home), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def registered(daemon: Daemon, make_repo: Callable[..., ServiceRepo]) -> None:
    daemon.cli("repo", "add", str(make_repo("app").origin))
    wait_for(lambda: daemon.ps_q() == ["main:app"], 30, "main:app")


def test_ten_env_sets_at_once_are_all_kept_each_in_its_own_commit(
    daemon: Daemon, make_repo: Callable[..., ServiceRepo]
) -> None:
    registered(daemon, make_repo)
    clients = [start_cli(daemon, "env", "set", "app", f"K{i}=v{i}") for i in range(10)]
    for client in clients:
        out, err = client.communicate(timeout=60)
        assert client.returncode == 0, err
        assert out.startswith("main:app settings "), out
    expected = {f"K{i}": f"v{i}" for i in range(10)}
    assert daemon.cli("env", "ls", "app").stdout == "".join(
        f"{k}={v}\n" for k, v in sorted(expected.items())
    )
    assert sorted(commits(daemon)) == sorted((f"env set K{i}", f"+  K{i}: v{i}") for i in range(10))
    assert settings_status(daemon) == ""


def test_ten_puts_from_one_version_one_wins_and_nine_get_409(
    daemon: Daemon, make_repo: Callable[..., ServiceRepo]
) -> None:
    registered(daemon, make_repo)
    status, start = api(daemon, "PUT", ENV_PATH, {"env": {"ONLY": "start"}, "version": ""})
    assert status == 200, start

    def put(i: int) -> tuple[int, Any]:
        body = {"env": {"ONLY": str(i)}, "version": start["version"], "message": f"put ONLY={i}"}
        return api(daemon, "PUT", ENV_PATH, body)

    with ThreadPoolExecutor(10) as pool:
        answers = list(pool.map(put, range(10)))
    won = [i for i, (status, _) in enumerate(answers) if status == 200]
    assert len(won) == 1, answers
    refused = [body for status, body in answers if status == 409]
    assert len(refused) == 9, answers
    assert {body["error"] for body in refused} == {"stale_version"}
    assert f"changed since version {start['version']}" in refused[0]["message"]
    winner = won[0]
    assert api(daemon, "GET", ENV_PATH)[1]["env"] == {"ONLY": str(winner)}
    assert commits(daemon)[0] == (f"put ONLY={winner}", f"-  ONLY: start\n+  ONLY: '{winner}'")
    assert len(commits(daemon)) == 2


def test_clients_that_start_again_after_a_409_get_every_edit_kept_once(
    daemon: Daemon, make_repo: Callable[..., ServiceRepo]
) -> None:
    registered(daemon, make_repo)

    def edit(i: int) -> int:
        """Add one variable by read, change, write with the version; again on a 409."""
        for attempt in range(1, 100):
            current = api(daemon, "GET", ENV_PATH)[1]
            env = {**current["env"], f"E{i}": str(i)}
            body = {"env": env, "version": current["version"], "message": f"add E{i}"}
            status, answer = api(daemon, "PUT", ENV_PATH, body)
            if status == 200:
                return attempt
            assert status == 409, answer
        raise AssertionError(f"E{i} never got in")

    with ThreadPoolExecutor(10) as pool:
        attempts = list(pool.map(edit, range(10)))
    assert max(attempts) > 1, "no client met a conflict: nothing was concurrent"
    assert api(daemon, "GET", ENV_PATH)[1]["env"] == {f"E{i}": str(i) for i in range(10)}
    assert sorted(commits(daemon)) == sorted((f"add E{i}", f"+  E{i}: '{i}'") for i in range(10))


def blocking_hook(settings: Path, reached: Path, release: Path) -> Path:
    """A pre-commit hook that says it was reached, holds the commit until released, fails it."""
    hook = settings / ".git" / "hooks" / "pre-commit"
    hook.parent.mkdir(exist_ok=True)
    hook.write_text(
        f"#!/bin/sh\ntouch '{reached}'\nwhile [ ! -e '{release}' ]; do sleep 0.05; done\nexit 1\n"
    )
    hook.chmod(0o755)
    return hook


def committing(marker: str) -> list[int]:
    """The pids of a killed daemon's ``git commit`` and its hook, still running."""
    found = []
    for pid in processes_with(marker):
        try:
            if b"commit" in Path(f"/proc/{pid}/cmdline").read_bytes():
                found.append(pid)
        except OSError:
            continue
    return found


def test_a_daemon_killed_mid_write_comes_back_on_head_with_the_leftover_set_aside(
    tmp_path: Path, make_repo: Callable[..., ServiceRepo]
) -> None:
    first = start_daemon(tmp_path / "home")
    try:
        registered(first, make_repo)
        for i in range(3):
            first.cli("env", "set", "app", f"KEPT{i}=yes")
        settings = first.home / "settings"
        reached, release = tmp_path / "reached", tmp_path / "release"
        hook = blocking_hook(settings, reached, release)
        writers = [start_cli(first, "env", "set", "app", f"LOST{i}=no") for i in range(5)]
        wait_for(reached.exists, 30, "a commit under way")
        first.kill()
    finally:
        release.touch()
        first.stop()
    for writer in writers:
        _, err = writer.communicate(timeout=60)
        assert writer.returncode == 1, err  # none was acknowledged
    hook.unlink()
    wait_for(lambda: not committing(first.marker), 15, "the held commit ended")
    assert "LOST" in git("diff", "--cached", cwd=settings)  # one was staged, never committed

    second = start_daemon(tmp_path / "home")
    try:
        wait_for(lambda: second.ps_q() == ["main:app"], 30, "main:app")
        kept = "KEPT0=yes\nKEPT1=yes\nKEPT2=yes\n"
        assert second.cli("env", "ls", "app").stdout == kept
        assert settings_status(second) == ""
        aside = [e for e in second.cli("events").stdout.splitlines() if "set aside" in e]
        assert len(aside) == 1, aside
        folder = Path(aside[0].split(" in ", 1)[1].split(":", 1)[0])
        assert "LOST" in (folder / "main" / "app.yaml").read_text()
        second.cli("env", "set", "app", "NEXT=1")
        assert commits(second)[0] == ("env set NEXT", "+  NEXT: '1'")
        assert second.cli("env", "ls", "app").stdout == kept + "NEXT=1\n"
    finally:
        stop_cleanly(second)
    assert os.path.isdir(folder)


CONFLICTING_EDITOR = """\
import subprocess, sys
seen, home, path = sys.argv[1:]
text = open(path).read()
open(seen, "a").write(text + "=====\\n")
if "# conflict:" not in text:
    branchyard = [sys.executable, "-m", "branchyard", "--home", home]
    subprocess.run([*branchyard, "env", "set", "app", "OTHER=1"], check=True)
    open(path, "w").write(text.replace("\\nenv: {}\\n", "\\nenv:\\n  MINE: '1'\\n"))
else:
    open(path, "w").write(text.replace("\\nenv:\\n", "\\nenv:\\n  MINE: '1'\\n"))
"""


def test_an_edit_that_lost_a_race_reopens_the_editor_on_the_latest(
    daemon: Daemon, make_repo: Callable[..., ServiceRepo], tmp_path: Path
) -> None:
    registered(daemon, make_repo)
    editor, seen = tmp_path / "editor.py", tmp_path / "seen.txt"
    editor.write_text(CONFLICTING_EDITOR)
    command = f"{sys.executable} {editor} {seen} {daemon.home}"
    done = daemon.cli("edit", "app", env={"EDITOR": command})
    assert done.stdout.startswith("main:app settings "), done.stdout
    first, second, _ = seen.read_text().split("=====\n")
    assert "# conflict:" not in first
    assert "# conflict: the settings of app in main changed since version (none)" in second
    assert "#     MINE: '1'\n" in second  # what was saved, shown but not applied
    assert "\nenv:\n  OTHER: '1'\n" in second
    assert daemon.cli("env", "ls", "app").stdout == "MINE=1\nOTHER=1\n"
    assert commits(daemon) == [
        ("edit app in main: set MINE", "+  MINE: '1'"),
        ("env set OTHER", "+  OTHER: '1'"),
    ]


REFUSING_HOOK = "#!/bin/sh\necho 'the disk said no' >&2\nexit 1\n"


def test_a_change_that_cannot_be_committed_is_not_kept_anywhere(
    daemon: Daemon, make_repo: Callable[..., ServiceRepo]
) -> None:
    registered(daemon, make_repo)
    daemon.cli("env", "set", "app", "KEPT=1")
    daemon.cli("env", "set", "--secret", "app", "TOKEN=old")
    settings = daemon.home / "settings"
    hook = settings / ".git" / "hooks" / "pre-commit"
    hook.write_text(REFUSING_HOOK)
    hook.chmod(0o755)
    before = commits(daemon)

    for args in (("--secret", "app", "TOKEN=new"), ("--secret", "app", "NEW=x"), ("app", "A=1")):
        done = daemon.cli("env", "set", *args, check=False)
        assert (done.returncode, done.stderr) == (1, "error: the disk said no\n")
    done = daemon.cli("env", "unset", "app", "TOKEN", check=False)
    assert (done.returncode, done.stderr) == (1, "error: the disk said no\n")

    assert daemon.cli("env", "ls", "--show-secrets", "app").stdout == (
        "KEPT=1\nTOKEN=old  (secret)\n"
    )
    assert json.loads((daemon.home / "secrets.json").read_text()) == {"main/app": {"TOKEN": "old"}}
    assert settings_status(daemon) == ""
    assert commits(daemon) == before
    hook.unlink()
    daemon.cli("env", "set", "app", "B=2")
    assert commits(daemon)[0] == ("env set B", "+  B: '2'")
