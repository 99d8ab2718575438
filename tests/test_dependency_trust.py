"""No install can change what another install, branch or repo then uses (issue 18, exploit 2).

Both attacks of the issue, against a real daemon, with local packages only (a wheel
served on loopback, and packages in the repos whose PEP 517 backend is in the repo
itself, so that no install needs the internet):

- a branch whose ``requirements.txt`` names ``./evilpkg``, whose build backend
  rewrites what it finds in the uv cache it is given, cannot change main's next
  environment;
- main committing the ``requirements.txt`` (``./libs/vlib``) of another repo's
  branch does not reuse the environment that branch built, and a change inside
  ``./libs/vlib`` alone installs again.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from bench.services import Wheels, wheel
from tests.conftest import Daemon, ServiceRepo, stdlib_service, wait_for

pytestmark = pytest.mark.integration

APP = """\
import json, os
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

def installed(name):
    try:
        module = __import__(name)
    except ImportError:
        return None
    return {"value": getattr(module, "VALUE", None),
            "files": sorted(os.listdir(os.path.dirname(module.__file__)))}

class Handler(BaseHTTPRequestHandler):
    def do_GET(self):
        body = json.dumps({"env": {"BRANCHYARD_REVISION": os.environ["BRANCHYARD_REVISION"]},
                           "tinydep": installed("tinydep"), "vlib": installed("vlib")}).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

ThreadingHTTPServer(("127.0.0.1", int(os.environ["PORT"])), Handler).serve_forever()
"""

# A PEP 517 backend in the package's own directory: builds a wheel of the package's
# one module with nothing but the standard library.
BACKEND = """\
import base64, hashlib, os, zipfile

NAME, VERSION = "{name}", "1.0"

def get_requires_for_build_wheel(config_settings=None):
    return []

def build_wheel(wheel_directory, config_settings=None, metadata_directory=None):
    dist = f"{{NAME}}-{{VERSION}}.dist-info"
    with open(os.path.join(NAME, "__init__.py")) as source:
        files = {{f"{{NAME}}/__init__.py": source.read()}}
    files[f"{{dist}}/METADATA"] = f"Metadata-Version: 2.1\\nName: {{NAME}}\\nVersion: 1.0\\n"
    files[f"{{dist}}/WHEEL"] = "Wheel-Version: 1.0\\nRoot-Is-Purelib: true\\nTag: py3-none-any\\n"
    record = []
    for path, text in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=")
        record.append(f"{{path}},sha256={{digest.decode()}},{{len(text.encode())}}")
    files[f"{{dist}}/RECORD"] = "\\n".join([*record, f"{{dist}}/RECORD,,"]) + "\\n"
    name = f"{{NAME}}-{{VERSION}}-py3-none-any.whl"
    with zipfile.ZipFile(os.path.join(wheel_directory, name), "w") as archive:
        for path, text in files.items():
            archive.writestr(path, text)
    return name
"""

# What the evil package's backend does first: whatever it can write above the uv cache
# it was given, every installed package's directory of tinydep there gets a module more.
POISON = """\

def _poison():
    cache = os.environ["UV_CACHE_DIR"]
    with open(os.path.join(cache, "EVIL_RAN"), "w") as ran:
        ran.write("the evil backend ran")
    top = os.path.dirname(os.path.dirname(os.path.dirname(cache)))
    for root, dirs, files in os.walk(top):
        if os.path.basename(root) == "tinydep":
            try:
                with open(os.path.join(root, "marker.py"), "w") as marker:
                    marker.write("POISONED = True\\n")
            except OSError:
                pass

_build = build_wheel

def build_wheel(*args, **kwargs):
    _poison()
    return _build(*args, **kwargs)
"""


def package(name: str, value: str, backend: str = BACKEND) -> dict[str, str]:
    """The files of a package in a repo, at ``./NAME`` (its module says VALUE)."""
    return {
        f"{name}/pyproject.toml": (
            '[build-system]\nrequires = []\nbuild-backend = "backend"\nbackend-path = ["."]\n'
            f'[project]\nname = "{name}"\nversion = "1.0"\n'
        ),
        f"{name}/backend.py": backend.format(name=name),
        f"{name}/{name}/__init__.py": f"VALUE = {value!r}\n",
    }


def build_log(daemon: Daemon, service: str, namespace: str = "main") -> str:
    return daemon.cli("-n", namespace, "logs", "--build", service).stdout


def test_a_branch_s_build_backend_cannot_change_what_main_installs_next(
    wheel_daemon: Daemon, make_repo: Callable[..., ServiceRepo], tmp_path: Path, wheels: Wheels
) -> None:
    daemon = wheel_daemon
    tinydep = wheels.requirement(wheel(tmp_path / "wheels", "1.0"))
    app = make_repo("app", stdlib_service(**{"app.py": APP, "requirements.txt": f"{tinydep}\n"}))
    daemon.cli("repo", "add", str(app.origin))
    first = wait_for(lambda: daemon.answer("app")["tinydep"], 60, "main with tinydep")
    assert first["files"] == ["__init__.py", "__pycache__"]

    app.checkout("evil")
    evil = {"requirements.txt": f"{tinydep}\n./evilpkg\n"}
    app.commit({**evil, **package("evilpkg", "evil", BACKEND + POISON)}, "evil")
    app.push("evil")
    wait_for(lambda: daemon.answer("app", "evil")["vlib"] is None, 90, "the evil branch live")
    ran = list((daemon.home / "uv-cache").rglob("EVIL_RAN"))
    assert ran, "the evil backend ran"

    app.checkout("main", new=False)
    sha = app.commit({"requirements.txt": f"# a new environment\n{tinydep}\n"}, "again")
    app.push("main")
    wait_for(lambda: daemon.serves("app", "main", sha), 60, "main's next revision")
    assert "install" in build_log(daemon, "app")
    assert daemon.answer("app")["tinydep"]["files"] == ["__init__.py", "__pycache__"]

    own_cache = daemon.home / "uv-cache" / "evil" / "app"
    assert own_cache.is_dir()
    app.push(":evil")  # the branch deleted: its service goes, its cache with it
    wait_for(lambda: not own_cache.exists(), 60, "the evil branch's uv cache deleted")


def test_main_does_not_reuse_another_repo_s_branch_environment_and_a_vendored_change_installs(
    daemon: Daemon, make_repo: Callable[..., ServiceRepo]
) -> None:
    requirements = {"requirements.txt": "./libs/vlib\n"}
    other = make_repo("other")
    daemon.cli("repo", "add", str(other.origin))
    other.checkout("feature")
    vendored = {f"libs/{k}": v for k, v in package("vlib", "the attacker's").items()}
    other.commit({"app.py": APP, **requirements, **vendored}, "vendor vlib")
    other.push("feature")
    wait_for(lambda: daemon.answer("other", "feature")["vlib"], 90, "other's branch with vlib")

    app = make_repo("app")
    daemon.cli("repo", "add", str(app.origin))
    wait_for(lambda: daemon.answer("app"), 30, "app live")
    ours = {f"libs/{k}": v for k, v in package("vlib", "ours").items()}
    sha = app.commit({"app.py": APP, **requirements, **ours}, "vendor vlib")
    app.push("main")
    wait_for(lambda: daemon.serves("app", "main", sha), 90, "app with vlib")
    assert "reusing environment" not in build_log(daemon, "app")
    assert daemon.answer("app")["vlib"]["value"] == "ours"

    changed = app.commit({"libs/vlib/vlib/__init__.py": "VALUE = 'changed'\n"}, "change vlib")
    app.push("main")
    wait_for(lambda: daemon.serves("app", "main", changed), 90, "app with the changed vlib")
    assert "reusing environment" not in build_log(daemon, "app")
    assert daemon.answer("app")["vlib"]["value"] == "changed"

    code_only = app.commit({"README": "code only"}, "code only")
    app.push("main")
    wait_for(lambda: daemon.serves("app", "main", code_only), 60, "a code-only commit")
    assert "reusing environment" in build_log(daemon, "app")

    app.checkout("topic")
    branched = app.commit({"README": "a branch's code"}, "on a branch")
    app.push("topic")
    wait_for(lambda: daemon.serves("app", "topic", branched), 60, "the branch live")
    assert "reusing environment" in build_log(daemon, "app", "topic")
    assert "(built in main)" in build_log(daemon, "app", "topic")
