"""A loopback git smart-HTTP server: ``git http-backend`` behind http.server.

Used by the tests and benchmarks of the polling path. It records every
request, so a test can tell a cheap ref listing from a full fetch, and while
``refusing_fetches`` is set it answers every fetch 503, as a server that is
overloaded or restarting does, but still lists refs. Given ``credentials``, it
asks for them (HTTP basic auth, 401 without them), as a private repo's forge does,
and records the command line of every git process that shows the password (or the user
name, where the password is empty: a token given as the user) while a request is served
(the client's git and its ``git-remote-http`` wait on it then).
"""

from __future__ import annotations

import base64
import os
import subprocess
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit


class GitHttpServer:
    def __init__(self, root: Path, credentials: tuple[str, str] | None = None) -> None:
        self.root = root
        self.credentials = credentials
        self.unauthorized = 0  # requests answered 401
        self.shown_in_argv: list[str] = []  # command lines that held the secret
        self.processes_seen = 0  # git processes looked at while requests were served
        self.requests: list[tuple[str, str, bytes]] = []  # method, path, body
        self.refusing_fetches = False
        self.refused = 0  # fetches answered 503
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                self._cgi(b"")

            def do_POST(self) -> None:
                self._cgi(self.rfile.read(int(self.headers.get("Content-Length", "0"))))

            def _cgi(self, body: bytes) -> None:
                url = urlsplit(self.path)
                server.requests.append((self.command, url.path, body))
                if server.credentials is not None and not self._authorized(server.credentials):
                    server.unauthorized += 1
                    self.send_response(401)
                    self.send_header("WWW-Authenticate", 'Basic realm="git"')
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                if server.refusing_fetches and _is_fetch(body):
                    server.refused += 1
                    self.send_response(503)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                env = {
                    **os.environ,
                    "GIT_PROJECT_ROOT": str(server.root),
                    "GIT_HTTP_EXPORT_ALL": "1",
                    "PATH_INFO": url.path,
                    "QUERY_STRING": url.query,
                    "REQUEST_METHOD": self.command,
                    "CONTENT_TYPE": self.headers.get("Content-Type", ""),
                    "CONTENT_LENGTH": str(len(body)),
                    "GIT_PROTOCOL": self.headers.get("Git-Protocol", ""),
                    "REMOTE_ADDR": "127.0.0.1",
                }
                done = subprocess.run(
                    ["git", "http-backend"], input=body, env=env, capture_output=True, check=False
                )
                head, _, payload = done.stdout.partition(b"\r\n\r\n")
                status = 200
                headers = []
                for line in head.decode().split("\r\n"):
                    key, _, value = line.partition(": ")
                    if key.lower() == "status":
                        status = int(value.split()[0])
                    elif key:
                        headers.append((key, value))
                self.send_response(status)
                for key, value in headers:
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def _authorized(self, credentials: tuple[str, str]) -> bool:
                user, password = credentials
                server.look_for(password or user)
                expected = base64.b64encode(f"{user}:{password}".encode()).decode()
                return self.headers.get("Authorization", "") == f"Basic {expected}"

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def look_for(self, secret: str) -> None:
        """Record every running git process whose command line holds ``secret``."""
        for entry in Path("/proc").iterdir():
            try:
                argv = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if b"git" in argv.split(b"\0")[0]:
                self.processes_seen += 1
                if secret.encode() in argv:
                    self.shown_in_argv.append(argv.replace(b"\0", b" ").decode())

    def fetches(self) -> int:
        """Requests that transferred objects (not just the list of refs)."""
        return sum(1 for _, _, body in self.requests if _is_fetch(body))

    def __enter__(self) -> GitHttpServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()


def _is_fetch(body: bytes) -> bool:
    """Whether a request body asks for objects (protocol v2's fetch, or v0's wants)."""
    return b"command=fetch" in body or b"want " in body
