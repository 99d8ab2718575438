"""Sample service repositories to try branchyard with, and the workflow to try on them.

`create_demo` writes three small services (`app`, `other_app` and `web`) into a directory.
Each service gets a bare repository under `DIR/.origin/NAME.git`, which is what gets
registered with the daemon, and a working clone `DIR/NAME` whose `origin` is that bare
repository, on branch `main`, already pushed. `workflow_text` returns the commands of the
DESIGN.md workflow adapted to those paths and to the router's real port.

The services are standard-library Python with a Procfile `web: python app.py`, so they need
no dependency install. They listen on $HOST:$PORT (where branchyard says: loopback locally,
every interface in a Kubernetes pod, so the same repo runs on both) and show the environment
branchyard gives them: `app` and `other_app` answer JSON naming their service, namespace,
revision and branch; `web` calls both through `APP_URL` and `OTHER_APP_URL`, so one page shows
whether the wiring of a namespace works, and `GET /env` answers the variables it was given as
JSON.

Git runs as a child process with argument lists (never through a shell), with a fixed author
and committer in its environment, so the demo works on a machine with no git identity set.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

__all__ = ["SERVICE_NAMES", "DemoRepo", "create_demo", "workflow_text"]

SERVICE_NAMES: tuple[str, ...] = ("app", "other_app", "web")
"""The demo services, in the order `create_demo` returns them."""

ORIGIN_DIRNAME = ".origin"
"""Directory under the demo directory that holds the bare repositories."""

PROCFILE = "web: python app.py\n"

_GIT_IDENTITY: Mapping[str, str] = {
    "GIT_AUTHOR_NAME": "branchyard demo",
    "GIT_AUTHOR_EMAIL": "demo@branchyard.invalid",
    "GIT_COMMITTER_NAME": "branchyard demo",
    "GIT_COMMITTER_EMAIL": "demo@branchyard.invalid",
}

# Variables that would point git at some other repository (set, for instance, when this runs
# from inside a git hook); the demo's git commands must only see the paths they are given.
_GIT_LOCATION_VARIABLES = (
    "GIT_DIR",
    "GIT_WORK_TREE",
    "GIT_INDEX_FILE",
    "GIT_OBJECT_DIRECTORY",
    "GIT_ALTERNATE_OBJECT_DIRECTORIES",
    "GIT_COMMON_DIR",
    "GIT_NAMESPACE",
)

_WORKFLOW_BRANCH = "bugfix"


@dataclass(frozen=True)
class DemoRepo:
    """One demo service: its name, its bare repository and its working clone."""

    name: str
    origin: Path
    """Bare repository `DIR/.origin/NAME.git`: what gets registered with the daemon."""
    clone: Path
    """Working clone `DIR/NAME`: remote `origin` is the bare repository, on branch main."""


def create_demo(directory: Path) -> list[DemoRepo]:
    """Create the three demo service repositories under `directory` and return them.

    `directory` is created if missing. Paths in the result are absolute. Nothing is
    overwritten: if any clone or bare repository path already exists, `FileExistsError` is
    raised before anything is written. If git fails part way, what this call created is
    removed again and `subprocess.CalledProcessError` (with git's stderr) is raised; a
    missing git executable raises `FileNotFoundError`.
    """
    root = directory.expanduser().resolve()
    repos = [
        DemoRepo(
            name=name,
            origin=root / ORIGIN_DIRNAME / f"{name}.git",
            clone=root / name,
        )
        for name in SERVICE_NAMES
    ]
    for repo in repos:
        for path in (repo.clone, repo.origin):
            if path.exists() or path.is_symlink():
                raise FileExistsError(
                    f"{path} already exists; remove it or choose another directory "
                    "for the demo (nothing was changed)"
                )

    origin_root = root / ORIGIN_DIRNAME
    root_existed = root.exists()
    origin_root_existed = origin_root.exists()
    created: list[Path] = []
    try:
        origin_root.mkdir(parents=True, exist_ok=True)
        for repo in repos:
            created += [repo.origin, repo.clone]
            _create_repo(repo, _service_files(repo.name))
    except BaseException:
        for path in created:
            shutil.rmtree(path, ignore_errors=True)
        if not origin_root_existed:
            shutil.rmtree(origin_root, ignore_errors=True)
        if not root_existed:
            shutil.rmtree(root, ignore_errors=True)
        raise
    return repos


def workflow_text(directory: Path, router_url: str) -> str:
    """Return the DESIGN.md workflow as shell commands for the demo in `directory`.

    `router_url` is where the router listens, such as "http://127.0.0.1:7080"; the commands
    reach services as `http://SERVICE.NAMESPACE.localhost:PORT/` on that port.
    """
    root = shlex.quote(str(directory.expanduser().resolve()))
    branch = _WORKFLOW_BRANCH
    others = " ".join(name for name in SERVICE_NAMES if name != "app")
    return "\n".join(
        [
            f"cd {root}",
            "",
            "# the baseline: every repository's main branch, wired together",
            "branchyard ps -q",
            f"curl {_service_url('web', 'main', router_url)}",
            "",
            f"# one branch pushed in one repository gives a namespace '{branch}'",
            f"git -C app checkout -b {branch} && git -C app push origin {branch}",
            f"branchyard -n {branch} ps -q",
            "",
            "# the same branch name in the other repositories joins the same namespace",
            f"for s in {others}; do "
            f"git -C $s checkout -b {branch} && git -C $s push origin {branch}; done",
            f"branchyard -n {branch} ps -q",
            "",
            f"# web in {branch} already reaches app and other_app in {branch};",
            "# edit opens $EDITOR on web's env there: try GREETING=hi",
            f"branchyard -n {branch} edit web",
            f"curl {_service_url('web', branch, router_url)}",
            f"curl {_service_url('web', branch, router_url)}env",
            "",
        ]
    )


def _service_url(service: str, namespace: str, router_url: str) -> str:
    """Return the router URL of `service` in `namespace`, ending in a slash."""
    parts = urlsplit(router_url if "//" in router_url else f"//{router_url}")
    scheme = parts.scheme or "http"
    port = parts.port
    default_port = {"http": 80, "https": 443}.get(scheme)
    host = f"{service.replace('_', '-')}.{namespace}.localhost"
    if port is not None and port != default_port:
        host = f"{host}:{port}"
    return f"{scheme}://{host}/"


def _create_repo(repo: DemoRepo, files: Mapping[str, str]) -> None:
    """Create the bare repository and the pushed working clone of one service."""
    _git(["init", "-q", "--bare", "-b", "main", str(repo.origin)])
    _git(["init", "-q", "-b", "main", str(repo.clone)])
    for relative, content in files.items():
        (repo.clone / relative).write_text(content, encoding="utf-8")
    _git(["-C", str(repo.clone), "add", "--", *files])
    _git(
        [
            "-C",
            str(repo.clone),
            "-c",
            "commit.gpgsign=false",
            "commit",
            "-q",
            "--no-verify",
            "-m",
            f"Add the {repo.name} demo service",
        ]
    )
    _git(["-C", str(repo.clone), "remote", "add", "origin", str(repo.origin)])
    _git(["-C", str(repo.clone), "push", "-q", "--no-verify", "-u", "origin", "main"])


def _git(args: Sequence[str]) -> None:
    """Run one git command with the demo identity; raise CalledProcessError on failure."""
    env = {k: v for k, v in os.environ.items() if k not in _GIT_LOCATION_VARIABLES}
    env.update(_GIT_IDENTITY)
    subprocess.run(
        ["git", *args],
        check=True,
        capture_output=True,
        text=True,
        env=env,
        stdin=subprocess.DEVNULL,
    )


def _service_files(name: str) -> dict[str, str]:
    """Return the files of one demo service, by path relative to its repository."""
    source = _WEB_SOURCE if name == "web" else _PEER_SOURCE.replace("@SERVICE@", name)
    return {"Procfile": PROCFILE, "app.py": source}


_PEER_SOURCE = '''\
"""The @SERVICE@ demo service: answers GET / with what branchyard told it about itself."""

import json
import os
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

SERVICE = "@SERVICE@"


def identity():
    """Return this service's name, namespace, short revision and branch."""
    revision = os.environ.get("BRANCHYARD_REVISION")
    return {
        "service": SERVICE,
        "namespace": os.environ.get("BRANCHYARD_NAMESPACE"),
        "revision": revision[:7] if revision else None,
        "branch": os.environ.get("BRANCHYARD_BRANCH"),
    }


class Handler(BaseHTTPRequestHandler):
    def do_GET(self):
        if self.path.split("?")[0] != "/":
            self.send_error(404)
            return
        body = json.dumps(identity()).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format, *args):
        pass


def main():
    port = int(os.environ.get("PORT", "8000"))
    server = ThreadingHTTPServer((os.environ.get("HOST", "127.0.0.1"), port), Handler)
    print(f"listening on {port}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
'''

_WEB_SOURCE = r'''"""The web demo service: one page showing what app and other_app answer from here.

GET / calls APP_URL and OTHER_APP_URL and shows their answers, so the page tells at a glance
whether the namespace is wired; GET /env answers the variables branchyard set, as JSON.
"""

import html
import http.client
import json
import os
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

PEERS = ("APP_URL", "OTHER_APP_URL")


def ask(variable):
    """Return what the peer named by `variable` answered, or why it could not.

    URLError, HTTPError and timeouts are OSErrors; a malformed URL is a ValueError.
    """
    url = os.environ.get(variable)
    if not url:
        return f"{variable} is not set"
    try:
        with urllib.request.urlopen(url.rstrip("/") + "/", timeout=2) as response:
            return response.read().decode("utf-8", "replace")
    except (OSError, ValueError, http.client.HTTPException) as error:
        return f"unreachable at {url}: {error}"


def visible_env():
    """Return the variables this service shows: *_URL, BRANCHYARD_* and GREETING."""
    return {
        name: value
        for name, value in sorted(os.environ.items())
        if name.endswith("_URL") or name.startswith("BRANCHYARD_") or name == "GREETING"
    }


def page():
    """Return the HTML page: who this is, and what each peer answered."""
    env = os.environ
    greeting = env.get("GREETING", "hello")
    namespace = env.get("BRANCHYARD_NAMESPACE", "?")
    revision = env.get("BRANCHYARD_REVISION", "")[:7] or "?"
    branch = env.get("BRANCHYARD_BRANCH", "?")
    lines = [
        "<!doctype html>",
        '<html><head><meta charset="utf-8"><title>web</title></head><body>',
        f"<h1>{html.escape(greeting)} from web</h1>",
        (
            f"<p>namespace <b>{html.escape(namespace)}</b>,"
            f" revision <b>{html.escape(revision)}</b>,"
            f" branch <b>{html.escape(branch)}</b></p>"
        ),
    ]
    for variable in PEERS:
        lines.append(f"<h2>{variable}</h2>")
        lines.append(f"<pre>{html.escape(ask(variable), quote=False)}</pre>")
    lines.append("</body></html>")
    return "\n".join(lines) + "\n"


class Handler(BaseHTTPRequestHandler):
    def do_GET(self):
        path = self.path.split("?")[0]
        if path == "/":
            self.answer("text/html; charset=utf-8", page())
        elif path == "/env":
            self.answer("application/json", json.dumps(visible_env()))
        else:
            self.send_error(404)

    def answer(self, content_type, text):
        body = text.encode("utf-8")
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format, *args):
        pass


def main():
    port = int(os.environ.get("PORT", "8000"))
    server = ThreadingHTTPServer((os.environ.get("HOST", "127.0.0.1"), port), Handler)
    print(f"listening on {port}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
'''
