"""Faults on the home: a store that is not a database, a home that cannot be written.

A read-only home is made for real, in a way that also stops root (the tests run
as root here and in CI, and root writes through ``chmod a-w``): the daemon runs
in a mount namespace of its own (``unshare --mount``), and the test mounts a
read-only bind of the home over the home in that namespace only (``nsenter
--mount``). Files the daemon already holds open (the SQLite store) stay
writable, as they would after a read-only remount; every file it opens, creates
or renames from then on fails with EROFS. Undoing it is ``umount`` in the same
namespace, and the namespace ends with the daemon, so nothing outlives a failed
test. Without root, the same works in a user namespace (``unshare --user
--map-root-user``), which every current Linux allows by default.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shlex
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.conftest import (
    Daemon,
    ServiceRepo,
    start_daemon,
    stop_cleanly,
    wait_for,
)
from tests.test_api import call, token_of

pytestmark = pytest.mark.integration

AS_ROOT = os.geteuid() == 0
NAMESPACE = ["--mount"] if AS_ROOT else ["--user", "--map-root-user", "--mount"]


def in_namespace(daemon: Daemon, *argv: str, check: bool = True) -> int:
    enter = ["--mount"] if AS_ROOT else ["--user", "--mount", "--preserve-credentials"]
    pid = str(daemon.info["pid"])
    command = ["nsenter", "--target", pid, *enter, *argv]
    return subprocess.run(command, check=check, capture_output=True).returncode


def make_read_only(daemon: Daemon) -> None:
    home = str(daemon.home)
    in_namespace(daemon, "mount", "--bind", home, home)
    in_namespace(daemon, "mount", "-o", "remount,bind,ro", home)
    assert in_namespace(daemon, "touch", f"{home}/probe", check=False) != 0, "still writable"


def make_writable(daemon: Daemon) -> None:
    in_namespace(daemon, "umount", str(daemon.home))


def test_a_read_only_home_gives_json_errors_and_loses_nothing(
    tmp_path: Path, make_repo: Callable[..., ServiceRepo]
) -> None:
    app = make_repo("app")
    daemon = start_daemon(tmp_path / "home", wrap=["unshare", *NAMESPACE])
    try:
        daemon.cli("repo", "add", str(app.origin))
        wait_for(lambda: daemon.answer("app"), 60, "app live")
        daemon.cli("env", "set", "app", "GREETING=before")
        wait_for(lambda: daemon.answer("app")["env"].get("GREETING") == "before", 60, "rolled out")
        token = token_of(daemon)

        good = {"Authorization": f"Bearer {token}"}
        env_path = "/api/namespaces/main/services/app/env"
        version = call(daemon, "GET", env_path, b"", good)[1]["version"]
        make_read_only(daemon)
        for method, path, body in [
            ("POST", "/api/token/rotate", b""),
            ("PUT", env_path, json.dumps({"env": {"GREETING": "x"}, "version": version}).encode()),
        ]:
            headers = {**good, "Content-Type": "application/json"}
            status, answer = call(daemon, method, path, body, headers)
            assert status == 500 and answer["error"] == "home_error", (path, answer)
            assert "Read-only file system" in answer["message"], answer
            assert str(daemon.home) in answer["message"]
        refused = daemon.cli("env", "set", "app", "GREETING=during", check=False)
        assert refused.returncode == 1
        assert refused.stderr.startswith("error: Read-only file system: ")
        assert refused.stderr.count("\n") == 1
        assert daemon.cli("token", "rotate", check=False).returncode == 1
        assert token_of(daemon) == token
        assert daemon.ps_q() == ["main:app"]
        assert daemon.cli("env", "ls", "app").stdout == "GREETING=before\n"

        make_writable(daemon)
        daemon.cli("env", "set", "app", "GREETING=after")
        assert daemon.cli("env", "ls", "app").stdout == "GREETING=after\n"
        assert "token rotated" in daemon.cli("token", "rotate").stdout
    finally:
        stop_cleanly(daemon)
    assert "Read-only file system" in (tmp_path / "home-daemon.log").read_text()


def up(home: Path, read_only: bool = False) -> subprocess.CompletedProcess[str]:
    """``branchyard up`` until it exits; in a namespace where ``home`` is read-only if asked."""
    command = [sys.executable, "-m", "branchyard", "--home", str(home), "up", "--router-port", "0"]
    if read_only:
        where = shlex.quote(str(home))
        steps = f"mount --bind {where} {where} && mount -o remount,bind,ro {where} && exec "
        command = ["unshare", *NAMESPACE, "sh", "-c", steps + shlex.join(command)]
    return subprocess.run(command, capture_output=True, text=True, timeout=60)


def test_a_read_only_home_stops_the_daemon_with_one_line(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    done = up(home, read_only=True)
    assert (done.returncode, done.stderr) == (
        1,
        f"error: cannot use the home {home}: Read-only file system\n",
    )
    assert list(home.iterdir()) == []


def test_a_corrupt_store_stops_the_daemon_with_one_line_naming_it(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    store = home / "state.db"
    garbage = os.urandom(8192)
    store.write_bytes(garbage)
    done = up(home)
    assert done.returncode == 1
    assert done.stderr == (
        f"error: {store} is not a usable store (file is not a database): "
        "move it away or restore a copy\n"
    )
    assert store.read_bytes() == garbage
    assert not (home / "daemon.json").exists()


def test_a_daemon_stopped_while_its_home_is_read_only_still_stops_every_service(
    tmp_path: Path, make_repo: Callable[..., ServiceRepo]
) -> None:
    """Unsandboxed, nothing but the daemon's own stop ends its services: a home that
    went read-only must not cut that stop short."""
    app = make_repo("app")
    daemon = start_daemon(tmp_path / "home", "--no-sandbox", wrap=["unshare", *NAMESPACE])
    daemon.cli("repo", "add", str(app.origin))
    wait_for(lambda: daemon.answer("app"), 60, "app live")
    make_read_only(daemon)
    stop_cleanly(daemon)
    log = (tmp_path / "home-daemon.log").read_text()
    assert "cannot remove" in log and "daemon.json: Read-only file system" in log


@contextlib.contextmanager
def small_disk(where: Path, size: str) -> Iterator[Path]:
    """A tmpfs of ``size`` mounted at ``where`` (as root: the tests run as root), unmounted
    after, so that filling it fills nothing else of the machine."""
    where.mkdir()
    tmpfs = ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(where)]
    subprocess.run(tmpfs, check=True)
    try:
        yield where
    finally:
        subprocess.run(["umount", "--lazy", str(where)], check=True)


def fill(disk: Path) -> Path:
    """Write a file on ``disk`` until not one more byte fits; the file, to delete later."""
    filler = disk / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        for chunk in (b"\0" * (1 << 20), b"\0" * 4096, b"\0"):
            try:
                while True:
                    os.write(fd, chunk)
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
    finally:
        os.close(fd)
    return filler


def test_a_push_made_while_the_disk_is_full_deploys_once_there_is_space(
    tmp_path: Path, make_repo: Callable[..., ServiceRepo]
) -> None:
    """The push is seen (the refs moved) but the store cannot record it: it must be seen
    again, not taken as handled, and deploy once space comes back."""
    app = make_repo("app")
    with small_disk(tmp_path / "home", "64m") as home:
        daemon = start_daemon(home)
        try:
            daemon.cli("repo", "add", str(app.origin))
            wait_for(lambda: daemon.answer("app"), 60, "app live")
            filler = fill(home)
            pushed = app.commit({"pushed": "while the disk was full\n"}, "second")
            app.push()

            def refused() -> str:
                good = {"Authorization": f"Bearer {token_of(daemon)}"}
                (row,) = call(daemon, "GET", "/api/repos", b"", good)[1]
                return str(row["error"])

            error = wait_for(refused, 30, "the repo's watch error")
            assert error == "OperationalError: database or disk is full", error
            assert not daemon.serves("app", "main", pushed)
            filler.unlink()
            wait_for(lambda: daemon.serves("app", "main", pushed), 60, "the push deployed")
            wait_for(lambda: refused() == "", 10, "the error cleared")
        finally:
            stop_cleanly(daemon)
