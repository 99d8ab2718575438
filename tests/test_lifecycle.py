"""Revisions come and go with commits and branches, and take nothing with them."""

from __future__ import annotations

import json
from collections.abc import Callable
from functools import partial
from pathlib import Path

import pytest

from tests.conftest import (
    Daemon,
    ServiceRepo,
    daemon_with,
    git,
    start_daemon,
    stdlib_service,
    stop_cleanly,
    wait_for,
)
from tests.githttp import GitHttpServer

pytestmark = pytest.mark.integration


def test_each_new_commit_becomes_a_new_revision_without_restarting_peers(
    daemon: Daemon, make_repo: Callable[..., ServiceRepo]
) -> None:
    app, web = make_repo("app"), make_repo("web")
    daemon.cli("repo", "add", str(app.origin))
    daemon.cli("repo", "add", str(web.origin))
    wait_for(lambda: daemon.answer("web")["env"].get("APP_URL"), 60, "web wired to app")
    web_before = daemon.answer("web")
    app_url = web_before["env"]["APP_URL"]

    for number in range(3):
        sha = app.commit({"version.txt": str(number)}, f"commit {number}")
        app.push()
        wait_for(partial(daemon.serves, "app", "main", sha), 30, f"commit {number} live")

    rows = {r["service"]: r for r in daemon.ps_json()}
    assert rows["app"]["live"]["sha"] == sha
    assert rows["app"]["state"] == "live"
    web_after = daemon.answer("web")
    assert web_after["started"] == web_before["started"], "web restarted for app's commits"
    assert web_after["env"]["APP_URL"] == app_url
    assert daemon.answer("web", path="/call/APP_URL")["env"]["BRANCHYARD_REVISION"] == sha


def test_a_deleted_branch_takes_its_service_and_empty_namespace_away(
    daemon: Daemon, make_repo: Callable[..., ServiceRepo]
) -> None:
    app = make_repo("app")
    daemon.cli("repo", "add", str(app.origin))
    app.checkout("feature/Login_Fix")
    app.push("feature/Login_Fix")
    wait_for(lambda: daemon.ps_q("feature-login-fix") == ["feature-login-fix:app"], 30, "ns")
    pid = wait_for(lambda: daemon.host_pid("app", "feature-login-fix"), 30, "answer")

    git("push", "-q", "origin", "--delete", "feature/Login_Fix", cwd=app.clone)
    wait_for(lambda: "feature-login-fix" not in daemon.cli("ns", "ls").stdout, 30, "ns gone")
    events = daemon.cli("events", "-n", "feature-login-fix").stdout.splitlines()
    assert [e for e in events if "removed" in e and "branch feature/Login_Fix was deleted" in e]
    assert daemon.ps_q("main") == ["main:app"]
    wait_for(lambda: not Path(f"/proc/{pid}").exists(), 15, "process stopped")
    status, body = daemon.get("app.feature-login-fix.localhost")
    assert status == 404
    assert b"No service answers for" in body and b"app.main.localhost" not in body
    assert not (daemon.home / "builds" / "feature-login-fix").exists()
    assert not (daemon.home / "logs" / "feature-login-fix").exists()
    assert (daemon.home / "logs" / "main" / "app").is_dir()


def test_a_repo_whose_head_names_no_branch_deploys_main_to_the_baseline_with_a_warning(
    daemon: Daemon, make_repo: Callable[..., ServiceRepo]
) -> None:
    app = make_repo("app")
    git("symbolic-ref", "HEAD", "refs/heads/master", cwd=app.origin)  # made by an older git
    daemon.cli("repo", "add", str(app.origin))
    wait_for(lambda: daemon.answer("app", "main"), 30, "app in the baseline")

    sha = app.commit({"x.txt": "1"}, "second")
    app.push()
    wait_for(lambda: daemon.serves("app", "main", sha), 30, "the second commit in the baseline")
    assert [(r["namespace"], r["service"]) for r in daemon.ps_json("-A")] == [("main", "app")]
    warnings = [e for e in daemon.cli("events").stdout.splitlines() if "  warning " in e]
    assert len(warnings) == 1, warnings  # said once, not at every push
    assert "app: HEAD names no existing branch; main deploys to the baseline" in warnings[0]


def test_a_local_repo_keeps_the_default_branch_it_had_when_added_whatever_is_checked_out(
    daemon: Daemon, make_repo: Callable[..., ServiceRepo]
) -> None:
    app = make_repo("app")
    first = git("rev-parse", "HEAD", cwd=app.clone)
    added = daemon.cli("repo", "add", str(app.clone))  # a work tree, as a person's ~/src/shop
    assert added.stdout.endswith("; default branch main\n")
    wait_for(lambda: daemon.serves("app", "main", first), 30, "main in the baseline")

    app.checkout("topic")
    topic = app.commit({"x.txt": "topic"}, "on topic")
    wait_for(lambda: daemon.ps_q("topic") == ["topic:app"], 30, "topic gets a namespace")
    wait_for(lambda: daemon.serves("app", "topic", topic), 30, "topic served in topic")
    assert daemon.serves("app", "main", first)
    assert daemon.cli("repo", "ls").stdout.split("\n")[1].split()[2] == "main"

    assert daemon.cli("repo", "set", "app", "--default-branch", "topic").stdout == (
        "app: default branch topic\n"
    )
    wait_for(lambda: daemon.serves("app", "main", topic), 30, "topic in the baseline")
    namespaces = {row["branch"]: row["namespace"] for row in ns_rows(daemon)}
    assert namespaces["topic"] == "main" and namespaces["main"] != "main"
    assert daemon.cli("repo", "ls").stdout.split("\n")[1].split()[2] == "topic"

    bad = daemon.cli("repo", "set", "app", "--default-branch", "a..b", check=False)
    assert (bad.returncode, bad.stderr) == (1, "error: 'a..b' is not a valid branch name\n")
    ghost = daemon.cli("repo", "set", "ghost", "--default-branch", "main", check=False)
    assert ghost.returncode == 1 and "no repo named 'ghost'" in ghost.stderr
    nothing = daemon.cli("repo", "set", "app", check=False)
    assert nothing.returncode == 1 and "nothing to change" in nothing.stderr
    assert daemon.cli("repo", "ls").stdout.split("\n")[1].split()[2] == "topic"


def ns_rows(daemon: Daemon) -> list[dict[str, str]]:
    lines = daemon.cli("ns", "ls").stdout.splitlines()[1:]
    return [{"namespace": line.split()[0], "branch": line.split()[1]} for line in lines]


def test_rm_stops_a_service_until_the_next_push(
    daemon: Daemon, make_repo: Callable[..., ServiceRepo]
) -> None:
    app = make_repo("app")
    daemon.cli("repo", "add", str(app.origin))
    pid = wait_for(lambda: daemon.host_pid("app"), 30, "app live")
    done = daemon.cli("rm", "app")
    assert "until" in done.stdout or "next push" in done.stdout
    wait_for(lambda: daemon.get("app.main.localhost")[0] == 404, 30, "app removed")
    wait_for(lambda: not Path(f"/proc/{pid}").exists(), 15, "its process stopped")
    assert daemon.ps_json("-A") == []

    sha = app.commit({"x.txt": "1"})
    app.push()
    wait_for(lambda: daemon.serves("app", "main", sha), 30, "back after a push")


def in_main_and_bugfix(
    daemon: Daemon, make_repo: Callable[..., ServiceRepo]
) -> tuple[ServiceRepo, ServiceRepo]:
    """Repos app and web, added, each with a branch bugfix pushed."""
    app, web = make_repo("app"), make_repo("web")
    for repo in (app, web):
        daemon.cli("repo", "add", str(repo.origin))
        repo.checkout("bugfix")
        repo.push("bugfix")
    return app, web


def reached(daemon: Daemon, service: str, namespace: str, peer: str) -> str:
    """The namespace of the ``peer`` that ``service`` in ``namespace`` reaches by its URL."""
    called = daemon.answer(service, namespace, f"/call/{peer.upper()}_URL")
    return str(called["env"]["BRANCHYARD_NAMESPACE"])


def test_rm_in_a_branch_falls_back_to_main_without_restarting_its_peers(
    daemon: Daemon, make_repo: Callable[..., ServiceRepo]
) -> None:
    in_main_and_bugfix(daemon, make_repo)
    wait_for(lambda: reached(daemon, "web", "bugfix", "app") == "bugfix", 60, "wired in bugfix")
    before, revision = daemon.answer("web", "bugfix"), daemon.row("bugfix", "web")["live"]

    daemon.cli("-n", "bugfix", "rm", "app")
    wait_for(lambda: reached(daemon, "web", "bugfix", "app") == "main", 30, "app of main reached")
    after = daemon.answer("web", "bugfix")
    assert after["started"] == before["started"], "web restarted for the fallback"
    assert after["env"] == before["env"]  # the same PORT and APP_URL: its peer port moved
    assert daemon.row("bugfix", "web")["live"] == revision
    assert daemon.ps_q("bugfix") == ["bugfix:web"]


def test_repo_rm_deletes_a_remote_repos_mirror_and_leaves_a_local_repo_alone(
    daemon: Daemon, make_repo: Callable[..., ServiceRepo]
) -> None:
    app, web = make_repo("app"), make_repo("web")
    with GitHttpServer(app.origin.parent) as server:
        daemon.cli("repo", "add", f"{server.url}/app.git")
        daemon.cli("repo", "add", str(web.origin))
        wait_for(lambda: daemon.ps_q() == ["main:app", "main:web"], 60, "both deployed")
        (mirror,) = (daemon.home / "mirrors").iterdir()  # the remote's; a local repo has none
        assert git("--git-dir", str(mirror), "rev-parse", "main") == git(
            "rev-parse", "main", cwd=app.clone
        )
        daemon.cli("repo", "rm", "app")
        daemon.cli("repo", "rm", "web")
        wait_for(lambda: daemon.ps_json("-A") == [], 30, "both removed")
    assert list((daemon.home / "mirrors").iterdir()) == []
    assert git("rev-parse", "main", cwd=web.origin) == git("rev-parse", "main", cwd=web.clone)


def test_repo_rm_removes_its_services_from_every_namespace(
    daemon: Daemon, make_repo: Callable[..., ServiceRepo]
) -> None:
    in_main_and_bugfix(daemon, make_repo)
    wait_for(lambda: len(daemon.ps_json("-A")) == 4, 30, "four services")
    listed = [line.split()[0] for line in daemon.cli("ps", "-A").stdout.splitlines()[1:]]
    assert listed == ["main:app", "main:web", "bugfix:app", "bugfix:web"]  # the baseline first
    daemon.cli("repo", "rm", "app")
    wait_for(
        lambda: (
            sorted(f"{r['namespace']}:{r['service']}" for r in daemon.ps_json("-A"))
            == ["bugfix:web", "main:web"]
        ),
        30,
        "app gone everywhere",
    )
    assert "app" not in daemon.cli("repo", "ls").stdout.split()


WORKER = """\
import json, os, time
env = {k: v for k, v in os.environ.items()
       if k.startswith("BRANCHYARD_") or k.endswith("_URL") or k in ("PORT", "GREETING")}
print("worker env", json.dumps(env), flush=True)
time.sleep(600)
"""


def test_workers_run_beside_the_web_process_with_its_env_but_no_port(
    daemon: Daemon, make_repo: Callable[..., ServiceRepo]
) -> None:
    files = stdlib_service(
        Procfile="web: python app.py\nworker: python worker.py\n",
        **{"worker.py": WORKER},
    )
    app = make_repo("app", files)
    daemon.cli("repo", "add", str(app.origin))
    web = wait_for(lambda: daemon.answer("app"), 30, "app live")["env"]
    said = wait_for(
        lambda: [x for x in daemon.cli("logs", "app").stdout.splitlines() if "worker env " in x],
        10,
        "worker started",
    )
    worker = json.loads(said[0].split("worker env ", 1)[1])
    assert "PORT" in web and "PORT" not in worker  # the same env, but no PORT
    assert worker == {k: v for k, v in web.items() if k != "PORT"}
    assert worker["BRANCHYARD_REVISION"]


def test_stopping_the_daemon_stops_every_service_and_port(
    tmp_path: Path, make_repo: Callable[..., ServiceRepo]
) -> None:
    app = make_repo("app")
    running = start_daemon(tmp_path / "home")
    running.cli("repo", "add", str(app.origin))
    wait_for(lambda: running.answer("app"), 30, "app live")
    port = running.router_port
    stop_cleanly(running)
    assert not (running.home / "daemon.json").exists()
    with pytest.raises(OSError):
        running.get("app.main.localhost", port=port)
    done = running.cli("ps", check=False)
    assert done.returncode == 1
    assert "branchyard up" in done.stderr


def test_a_namespace_that_goes_away_closes_its_peer_ports(
    daemon: Daemon, make_repo: Callable[..., ServiceRepo]
) -> None:
    import socket

    app, web = in_main_and_bugfix(daemon, make_repo)
    app_url = wait_for(lambda: daemon.answer("web", "bugfix")["env"]["APP_URL"], 30, "wired")
    port = int(app_url.rsplit(":", 1)[1])
    socket.create_connection(("127.0.0.1", port), timeout=2).close()
    for repo in (app, web):
        git("push", "-q", "origin", "--delete", "bugfix", cwd=repo.clone)
    wait_for(lambda: "bugfix" not in daemon.cli("ns", "ls").stdout, 30, "bugfix gone")

    def closed() -> bool:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=2).close()
        except ConnectionRefusedError:
            return True
        return False

    wait_for(closed, 10, "the peer port closed")


def test_a_restarted_daemon_brings_everything_back_with_its_settings(
    tmp_path: Path, make_repo: Callable[..., ServiceRepo]
) -> None:
    app, web = make_repo("app"), make_repo("web")
    first = start_daemon(tmp_path / "home")
    try:
        for repo in (app, web):
            first.cli("repo", "add", str(repo.origin))
        wait_for(lambda: first.answer("web")["env"].get("APP_URL"), 30, "wired")
        first.cli("env", "set", "web", "GREETING=kept")
        wait_for(lambda: first.answer("web")["env"].get("GREETING") == "kept", 30, "setting")
        ordinal = first.row("main", "web")["live"]["ordinal"]
    finally:
        stop_cleanly(first)

    second = start_daemon(tmp_path / "home")
    try:
        wait_for(lambda: second.answer("web")["env"].get("GREETING") == "kept", 30, "back")
        assert second.row("main", "web")["live"]["ordinal"] == ordinal  # the same revision, back
        assert "env set GREETING" in second.cli("history", "web").stdout
        assert second.ps_q() == ["main:app", "main:web"]
    finally:
        stop_cleanly(second)


def test_peer_ports_stay_the_same_across_daemon_restarts(
    tmp_path: Path, make_repo: Callable[..., ServiceRepo]
) -> None:
    """A peer's URL is part of a revision's env: the revisions brought back, and those
    built after the restart, reach their peers at the URLs they had."""
    app, web = make_repo("app"), make_repo("web")
    web.checkout("bugfix")
    web.push("bugfix")  # bugfix has no app: its APP_URL falls back to main's
    with daemon_with(tmp_path / "home") as first:
        for repo in (app, web):
            first.cli("repo", "add", str(repo.origin))
        for namespace in ("main", "bugfix"):
            wait_for(partial(reached_in_main, first, namespace), 60, f"web wired in {namespace}")
        urls = {ns: first.answer("web", ns)["env"]["APP_URL"] for ns in ("main", "bugfix")}

    with daemon_with(tmp_path / "home") as second:
        for namespace in ("main", "bugfix"):
            wait_for(partial(reached_in_main, second, namespace), 60, f"web back in {namespace}")
            assert second.answer("web", namespace)["env"]["APP_URL"] == urls[namespace]
        sha = web.commit({"x": "after the restart"}, "a new revision")
        web.push("bugfix")
        wait_for(lambda: second.serves("web", "bugfix", sha), 30, "the new revision live")
        assert second.answer("web", "bugfix")["env"]["APP_URL"] == urls["bugfix"]
        assert reached_in_main(second, "bugfix")


def reached_in_main(daemon: Daemon, namespace: str) -> bool:
    """Whether web in ``namespace`` reaches app in main by its APP_URL."""
    return reached(daemon, "web", namespace, "app") == "main"
