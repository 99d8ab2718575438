"""A loopback git smart-HTTP server: ``git http-backend`` behind http.server.

Used by the tests and benchmarks of the polling path. It records every
request, so a test can tell a cheap ref listing from a full fetch, and while
``refusing_fetches`` is set it answers every fetch 503, as a server that is
overloaded or restarting does, but still lists refs.
"""

from __future__ import annotations

import os
import subprocess
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit


class GitHttpServer:
    def __init__(self, root: Path) -> None:
        self.root = root
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

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

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
