"""Python dependencies go into an environment cached by the hash of the dependency files."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from importlib.util import cache_from_source
from pathlib import Path

import pytest

from bench.services import Wheels, wheel
from tests.conftest import Daemon, ServiceRepo, stdlib_service, wait_for

pytestmark = pytest.mark.integration

APP = """\
import json, os, tinydep
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

class Handler(BaseHTTPRequestHandler):
    def do_GET(self):
        body = json.dumps({"env": {"BRANCHYARD_REVISION": os.environ["BRANCHYARD_REVISION"]},
                           "tinydep": tinydep.VALUE}).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

ThreadingHTTPServer(("127.0.0.1", int(os.environ["PORT"])), Handler).serve_forever()
"""


def test_a_code_only_commit_installs_nothing_and_a_dependency_change_installs(
    wheel_daemon: Daemon, make_repo: Callable[..., ServiceRepo], tmp_path: Path, wheels: Wheels
) -> None:
    daemon = wheel_daemon
    first = wheels.requirement(wheel(tmp_path / "wheels", "1.0"))
    app = make_repo("app", stdlib_service(**{"app.py": APP, "requirements.txt": f"{first}\n"}))
    daemon.cli("repo", "add", str(app.origin))
    assert wait_for(lambda: daemon.answer("app")["tinydep"], 60, "app with tinydep") == "1.0"
    assert "install" in daemon.cli("logs", "--build", "app").stdout

    code_only = app.commit({"README": "docs only"}, "code only")
    app.push()
    wait_for(lambda: daemon.serves("app", "main", code_only), 30, "code-only commit")
    build_log = daemon.cli("logs", "--build", "app").stdout
    assert "reusing environment" in build_log
    assert "install" not in build_log

    second = wheels.requirement(wheel(tmp_path / "wheels", "2.0"))
    app.commit({"requirements.txt": f"{second}\n"}, "bump tinydep")
    app.push()
    assert wait_for(lambda: daemon.answer("app")["tinydep"] == "2.0", 60, "tinydep 2.0")
    assert "install" in daemon.cli("logs", "--build", "app").stdout


def test_a_dependency_that_cannot_be_installed_fails_the_build_with_a_reason(
    daemon: Daemon, make_repo: Callable[..., ServiceRepo], tmp_path: Path
) -> None:
    app = make_repo("app", stdlib_service(**{"requirements.txt": f"{tmp_path}/missing.whl\n"}))
    daemon.cli("repo", "add", str(app.origin))
    row = wait_for(lambda: (r := daemon.row("main", "app"))["reason"] and r, 60, "failure")
    assert "installing requirements.txt failed" in row["reason"]
    assert "missing.whl" in daemon.cli("logs", "--build", "app").stdout


@pytest.fixture(autouse=True)
def no_bytecode_written(monkeypatch: pytest.MonkeyPatch) -> None:
    """As on many CI machines and container images (and the daemon inherits it)."""
    monkeypatch.setenv("PYTHONDONTWRITEBYTECODE", "1")


def test_an_environment_holds_the_bytecode_of_what_it_installs_so_services_start_from_it(
    wheel_daemon: Daemon, make_repo: Callable[..., ServiceRepo], tmp_path: Path, wheels: Wheels
) -> None:
    daemon = wheel_daemon
    requirement = wheels.requirement(wheel(tmp_path / "wheels", "1.0"))
    app = make_repo(
        "app", stdlib_service(**{"app.py": APP, "requirements.txt": f"{requirement}\n"})
    )
    daemon.cli("repo", "add", str(app.origin))
    wait_for(lambda: daemon.answer("app")["tinydep"], 60, "app with tinydep")

    (venv,) = (daemon.home / "venvs").iterdir()
    imported = subprocess.run(
        [str(venv / "bin" / "python"), "-v", "-c", "import tinydep"],
        capture_output=True,
        text=True,
        check=True,
    )
    (source,) = venv.glob("lib/python3*/site-packages/tinydep/__init__.py")
    assert f"code object from '{cache_from_source(str(source))}'" in imported.stderr
