"""The sample services the bench deploys, and their cold start without branchyard.

The sample is a standard-library HTTP server that answers every GET with the
revision it runs (``BRANCHYARD_REVISION``), so a poller can tell the moment the
router reaches a new revision. The dependency variant imports ``tinydep``, a
minimal wheel written on the spot and served on loopback (no index needed; an
install runs in a sandbox, which sees the network but not the bench's files).
The framework samples answer the same way from a Flask app, served by Flask's
own server (``python app.py``) or by gunicorn, both installed from PyPI.
"""

from __future__ import annotations

import base64
import hashlib
import os
import subprocess
import sys
import threading
import time
import zipfile
from dataclasses import dataclass
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import uv

from bench.common import LOOPBACK, BenchError, free_port, get

SERVICE = """\
import json, os
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
{imports}
VERSION = {version}

class Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_GET(self):
        body = json.dumps({{
            "revision": os.environ.get("BRANCHYARD_REVISION", "none"),
            "namespace": os.environ.get("BRANCHYARD_NAMESPACE", ""),
            "service": os.environ.get("BRANCHYARD_SERVICE", ""),
            "version": VERSION,{extra}
        }}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

ThreadingHTTPServer(("127.0.0.1", int(os.environ["PORT"])), Handler).serve_forever()
"""

PROCFILE = "web: python app.py\n"

FLASK_APP = """\
import os
from flask import Flask

app = Flask(__name__)
VERSION = {version}

@app.get("/")
def index():
    return {{
        "revision": os.environ.get("BRANCHYARD_REVISION", "none"),
        "version": VERSION,
    }}

if __name__ == "__main__":
    app.run(host="127.0.0.1", port=int(os.environ["PORT"]))
"""


@dataclass(frozen=True)
class Framework:
    """A sample service on a web framework from PyPI: its Procfile and requirements."""

    name: str
    procfile: str
    requirements: tuple[str, ...]

    def files(self, version: int = 0) -> dict[str, str]:
        return {
            "Procfile": self.procfile,
            "app.py": FLASK_APP.format(version=version),
            "requirements.txt": "".join(f"{line}\n" for line in self.requirements),
        }


FRAMEWORKS = (
    Framework("Flask", PROCFILE, ("flask==3.1.3",)),
    Framework(
        "gunicorn",
        "web: gunicorn --bind 127.0.0.1:$PORT app:app\n",
        ("flask==3.1.3", "gunicorn==27.0.1"),
    ),
)


def stdlib_service(version: int = 0) -> dict[str, str]:
    """A Procfile and ``app.py``; ``version`` changes the code, so each commit is real."""
    return {
        "Procfile": PROCFILE,
        "app.py": SERVICE.format(imports="", version=version, extra=""),
    }


def dependency_service(requirement: str, version: int = 0) -> dict[str, str]:
    """The same service, importing ``tinydep`` listed in ``requirements.txt``."""
    return {
        "Procfile": PROCFILE,
        "app.py": SERVICE.format(
            imports="import tinydep",
            version=version,
            extra='\n            "tinydep": tinydep.VALUE,',
        ),
        "requirements.txt": f"{requirement}\n",
    }


def wheel(directory: Path, version: str) -> Path:
    """Write a minimal pure-Python wheel of ``tinydep`` and return its path."""
    name = f"tinydep-{version}-py3-none-any.whl"
    dist = f"tinydep-{version}.dist-info"
    files = {
        "tinydep/__init__.py": f"VALUE = {version!r}\n",
        f"{dist}/METADATA": f"Metadata-Version: 2.1\nName: tinydep\nVersion: {version}\n",
        f"{dist}/WHEEL": "Wheel-Version: 1.0\nGenerator: bench\nRoot-Is-Purelib: true\n"
        "Tag: py3-none-any\n",
    }
    record = []
    for path, text in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=")
        record.append(f"{path},sha256={digest.decode()},{len(text.encode())}")
    files[f"{dist}/RECORD"] = "\n".join([*record, f"{dist}/RECORD,,"]) + "\n"
    directory.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(directory / name, "w") as archive:
        for path, text in files.items():
            archive.writestr(path, text)
    return directory / name


@dataclass(frozen=True)
class Wheels:
    """A directory of wheels served on a loopback port, which a daemon must expose to its
    boxes (``up --expose-host-port``): a box reaches nothing else of this machine."""

    port: int

    def requirement(self, wheel: Path) -> str:
        """``wheel`` as a requirement, by URL."""
        return f"tinydep @ http://{LOOPBACK}:{self.port}/{wheel.name}"

    @property
    def flags(self) -> tuple[str, str]:
        """The ``up`` options that let a daemon's boxes reach these wheels."""
        return ("--expose-host-port", str(self.port))


def serve_wheels(directory: Path) -> Wheels:
    """Serve ``directory`` on loopback for the rest of this process."""

    class Quiet(SimpleHTTPRequestHandler):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, directory=str(directory), **kwargs)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer((LOOPBACK, 0), Quiet)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return Wheels(server.server_address[1])


def make_venv(path: Path, requirements: Path | None = None) -> Path:
    """An environment made the way the local runtime makes one (``uv venv``, ``uv pip``),
    with its bytecode compiled as ``pip install`` would."""
    uv_bin = uv.find_uv_bin()
    subprocess.run(
        [uv_bin, "venv", "--quiet", "--python", sys.executable, str(path)],
        check=True,
        capture_output=True,
    )
    if requirements is not None:
        python = str(path / "bin" / "python")
        subprocess.run(
            [
                *(uv_bin, "pip", "install", "--quiet", "--compile-bytecode"),
                *("--python", python, "-r", str(requirements)),
            ],
            check=True,
            capture_output=True,
        )
    return path


def cold_starts(
    checkout: Path, venv: Path, samples: int, poll: float, procfile: str = PROCFILE
) -> list[float]:
    """Seconds from process start to the first 200, ``samples`` times, no branchyard.

    The service starts exactly as the local runtime starts it: ``/bin/sh -c`` on
    the Procfile command, the environment's ``bin`` first on PATH, in its own
    session; the same poll interval as the push-to-live poller.
    """
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("BRANCHYARD_")},
        "PATH": f"{venv / 'bin'}{os.pathsep}{os.environ.get('PATH', os.defpath)}",
        "VIRTUAL_ENV": str(venv),
        "PYTHONUNBUFFERED": "1",
    }
    command = procfile.removeprefix("web:").strip()
    results = []
    for _ in range(samples):
        port = free_port()
        started = time.monotonic()
        process = subprocess.Popen(
            ["/bin/sh", "-c", command],
            cwd=checkout,
            env={**env, "PORT": str(port)},
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        try:
            deadline = started + 30
            while True:
                try:
                    status, _ = get(port, LOOPBACK, timeout=2.0)
                    if status == 200:
                        break
                except OSError:
                    pass
                if process.poll() is not None:
                    raise BenchError(f"the sample service exited with {process.returncode}")
                if time.monotonic() > deadline:
                    raise BenchError("the sample service did not answer within 30 s")
                time.sleep(poll)
            results.append(time.monotonic() - started)
        finally:
            os.killpg(process.pid, 15)
            process.wait()
    return results
