"""A box's environment is explicit, as a pod's: a variable the daemon was started with
reaches no service, worker, build step or install unless ``up --pass-env`` names it,
and the daemon's secrets reach nothing it starts, boxed or not (its git processes)."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from branchyard.runtime.environment import box_environment
from tests.conftest import ServiceRepo, start_daemon, stop_cleanly, wait_for

CANARY = "CANARY_OF_THE_DAEMON"
SECRETS = {
    "BRANCHYARD_WEBHOOK_SECRET": "webhook-secret-of-the-daemon",
    "BRANCHYARD_STATUS_TOKEN": "status-token-of-the-daemon",
}
DUMP = "import json, os, sys; print(sys.argv[1], json.dumps(dict(os.environ)), flush=True)"
# An in-tree build backend: the wheel it builds holds the environment of the install.
BACKEND = """\
import base64, hashlib, json, os, zipfile

NAME = "envpkg-0.1.dist-info"


def build_wheel(wheel_directory, config_settings=None, metadata_directory=None):
    files = {
        "envpkg_env.json": json.dumps(dict(os.environ)),
        NAME + "/METADATA": "Metadata-Version: 2.1\\nName: envpkg\\nVersion: 0.1\\n",
        NAME + "/WHEEL": "Wheel-Version: 1.0\\nRoot-Is-Purelib: true\\nTag: py3-none-any\\n",
    }
    record = []
    for name, text in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=")
        record.append(f"{name},sha256={digest.decode()},{len(text.encode())}")
    files[NAME + "/RECORD"] = "\\n".join([*record, NAME + "/RECORD,,"]) + "\\n"
    wheel = "envpkg-0.1-py3-none-any.whl"
    with zipfile.ZipFile(os.path.join(wheel_directory, wheel), "w") as archive:
        for name, text in files.items():
            archive.writestr(name, text)
    return wheel
"""
PYPROJECT = """\
[project]
name = "envpkg"
version = "0.1"

[build-system]
requires = []
build-backend = "backend"
backend-path = ["."]
"""
SERVICE = """\
import json, os
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

class Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_GET(self):
        body = json.dumps(dict(os.environ)).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

ThreadingHTTPServer((os.environ["HOST"], int(os.environ["PORT"])), Handler).serve_forever()
"""
FILES = {
    "Procfile": f"web: python app.py\nworker: python -c '{DUMP}' worker; sleep 600\n",
    "app.py": SERVICE,
    "branchyard.yaml": f"build:\n  - python -c '{DUMP}' build\nenv:\n  GREETING: hi\n",
    "requirements.txt": "./envpkg\n",
    "envpkg/pyproject.toml": PYPROJECT,
    "envpkg/backend.py": BACKEND,
}
GIT = '#!/bin/sh\nenv > "{dumps}/$$"\nexec /usr/bin/git "$@"\n'


def said(log: str, what: str) -> dict[str, str]:
    """The environment a box dumped into ``log`` as ``what {json}``."""
    line = next(x for x in log.splitlines() if x.startswith(f"{what} {{"))
    found: dict[str, str] = json.loads(line.split(" ", 1)[1])
    return found


def environments(
    tmp_path: Path, make_repo: Callable[..., ServiceRepo], *flags: str
) -> dict[str, dict[str, str]]:
    """What a service, its worker, its build step and its install get from a daemon with
    ``CANARY`` and the secrets in its environment, and what its own git processes got."""
    dumps = tmp_path / "git-environments"
    dumps.mkdir()
    wrapper = tmp_path / "bin" / "git"
    wrapper.parent.mkdir()
    wrapper.write_text(GIT.format(dumps=dumps))
    wrapper.chmod(0o755)
    app = make_repo("app", FILES)
    with pytest.MonkeyPatch.context() as patched:
        patched.setenv(CANARY, "sing")
        for name, value in SECRETS.items():
            patched.setenv(name, value)
        patched.setenv("PATH", f"{wrapper.parent}:/usr/bin:/bin")
        daemon = start_daemon(tmp_path / "home", *flags)
    try:
        daemon.cli("repo", "add", str(app.origin))
        found = {"service": wait_for(lambda: daemon.answer("app"), 60, "app live")}
        found["worker"] = wait_for(lambda: said(daemon.cli("logs", "app").stdout, "worker"), 15)
        found["build"] = said(daemon.cli("logs", "app", "--build").stdout, "build")
        (installed,) = (daemon.home / "venvs").glob("*/lib/python*/site-packages/envpkg_env.json")
        found["install"] = json.loads(installed.read_text())
    finally:
        stop_cleanly(daemon)
    found["git"] = {
        line.split("=", 1)[0]: line.partition("=")[2]
        for dump in dumps.iterdir()
        for line in dump.read_text().splitlines()
        if "=" in line
    }
    assert list(dumps.iterdir()), "the daemon ran git through the wrapper"
    return found


def test_no_box_gets_the_daemons_environment_and_nothing_it_starts_gets_its_secrets(
    tmp_path: Path, make_repo: Callable[..., ServiceRepo]
) -> None:
    found = environments(tmp_path, make_repo)
    for what in ("service", "worker", "build", "install"):
        env = found[what]
        assert CANARY not in env, what
        assert not set(SECRETS) & set(env), what
        assert env["TMPDIR"] == "/tmp" and env["HOME"] and env["PATH"], what
    for what in ("service", "worker", "build"):
        assert found[what]["GREETING"] == "hi" and found[what]["BRANCHYARD_SERVICE"] == "app"
    assert found["service"]["PORT"] and "PORT" not in found["worker"]
    assert found["service"]["HOST"] == "127.0.0.1" and "HOST" not in found["worker"]
    assert found["service"]["HOME"] == found["worker"]["HOME"] != "/tmp"  # its scratch area
    assert "UV_CACHE_DIR" in found["install"]
    assert not set(SECRETS.values()) & set(found["git"].values())
    assert found["git"][CANARY] == "sing", "git, not a box, gets the daemon's environment"


def test_pass_env_hands_a_variable_of_the_daemon_to_every_box(
    tmp_path: Path, make_repo: Callable[..., ServiceRepo]
) -> None:
    found = environments(tmp_path, make_repo, "--pass-env", CANARY)
    for what in ("service", "worker", "build", "install"):
        assert found[what][CANARY] == "sing", what
        assert not set(SECRETS) & set(found[what]), what


def test_up_refuses_to_pass_a_secret_or_a_name_that_is_no_variable(tmp_path: Path) -> None:
    for name in ("BRANCHYARD_WEBHOOK_SECRET", "NOT-A-NAME"):
        done = subprocess.run(
            [sys.executable, "-m", "branchyard", "--home", str(tmp_path), "up", "--pass-env", name],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode != 0
        assert done.stderr == f"error: --pass-env {name}: not a variable a box may be handed\n"


DAEMON = {
    "PATH": "/opt/bin:/usr/bin",
    "LANG": "C.UTF-8",
    "LC_ALL": "C.UTF-8",
    "TZ": "Europe/Paris",
    "HOME": "/root",
    "TMPDIR": "/var/tmp",
    "AWS_SECRET_ACCESS_KEY": "aws",
    "GITHUB_TOKEN": "gh",
    "HTTPS_PROXY": "http://proxy:3128",
    "no_proxy": "localhost",
    "UV_INDEX_URL": "https://mirror/simple",
    "PIP_INDEX_URL": "https://mirror/simple",
    "SSL_CERT_FILE": "/etc/ssl/mine.pem",
    "PYTHONHOME": "/opt/python",
    "BRANCHYARD_HOME": "/srv/home",
}
EVERY = {"PATH": "/opt/bin:/usr/bin", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8", "TZ": "Europe/Paris"}
INSTALL = {
    "HTTPS_PROXY": "http://proxy:3128",
    "no_proxy": "localhost",
    "UV_INDEX_URL": "https://mirror/simple",
    "PIP_INDEX_URL": "https://mirror/simple",
    "SSL_CERT_FILE": "/etc/ssl/mine.pem",
}
BOX = {"HOME": "/srv/scratch", "TMPDIR": "/tmp"}


@pytest.mark.parametrize(
    ("daemon", "passed", "own", "install", "expected"),
    [
        pytest.param(DAEMON, (), {}, False, {**EVERY, **BOX}, id="service-gets-no-more"),
        pytest.param(
            DAEMON, (), {}, True, {**EVERY, **INSTALL, **BOX}, id="install-gets-index-and-proxy"
        ),
        pytest.param(
            DAEMON,
            ("GITHUB_TOKEN", "ABSENT"),
            {},
            False,
            {**EVERY, "GITHUB_TOKEN": "gh", **BOX},
            id="passed-by-name",
        ),
        pytest.param(
            DAEMON,
            (),
            {"PORT": "10001", "PATH": "/venv/bin:/usr/bin", "TZ": "UTC", "HOME": "/elsewhere"},
            False,
            {**EVERY, "PORT": "10001", "PATH": "/venv/bin:/usr/bin", "TZ": "UTC", **BOX},
            id="own-wins-but-not-home",
        ),
        pytest.param(
            {}, (), {}, False, {"PATH": "/usr/local/bin:/usr/bin:/bin", **BOX}, id="bare-daemon"
        ),
    ],
)
def test_a_box_environment_is_only_what_is_listed(
    daemon: dict[str, str],
    passed: tuple[str, ...],
    own: dict[str, str],
    install: bool,
    expected: dict[str, str],
) -> None:
    assert box_environment(daemon, passed, own, Path("/srv/scratch"), install) == expected
