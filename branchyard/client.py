"""The CLI's side of the API: find the daemon through the home and talk JSON to it.

HTTP/1.1 is spoken with h11 over a plain socket: it imports in a third of the
time http.client does (which brings in the email package and ssl), and every
CLI command pays for its imports. The daemon's address is in
``HOME/daemon.json``; no file, or nobody answering there, means it is not
running, and the error says how to start it.
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, urlencode, urlsplit

import h11

from branchyard import auth
from branchyard.errors import BranchyardError, DaemonNotRunning

if TYPE_CHECKING:  # importing the shapes costs a command ~20 ms (see branchyard.shapes)
    from branchyard.shapes import Info

DAEMON_FILE = "daemon.json"
TIMEOUT = 60.0
WARNING = "Branchyard-Warning"
"""A header of an answer, one per warning: a line the CLI prints on stderr (``k8s
render``: an address in the objects that no pod reaches)."""


def default_home() -> Path:
    return Path(os.environ.get("BRANCHYARD_HOME") or Path.home() / ".branchyard")


def path_of(*parts: str, **query: Any) -> str:
    path = "/api/" + "/".join(quote(p, safe="") for p in parts)
    params = {k: v for k, v in query.items() if v not in (None, False)}
    return f"{path}?{urlencode(params)}" if params else path


UNSANDBOXED = "pushed code runs with the daemon's rights (branchyard up --no-sandbox)"


class ApiError(BranchyardError):
    def __init__(self, code: str, message: str, status: int) -> None:
        super().__init__(message)
        self.code = code
        self.status = status


class Client:
    def __init__(self, home: Path) -> None:
        self.home = home

    def _not_running(self) -> DaemonNotRunning:
        return DaemonNotRunning(
            f"branchyard is not running for home {self.home}; start it with: branchyard up"
        )

    def _daemon_file(self) -> Info:
        try:
            info: Info = json.loads((self.home / DAEMON_FILE).read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            raise self._not_running() from None
        return info

    def sandboxed(self) -> bool:
        """Whether the running daemon boxes pushed code (it says so in its daemon file)."""
        return self._daemon_file().get("sandbox", "") is not None

    def _address(self) -> tuple[str, int]:
        address = urlsplit(self._daemon_file()["api"])
        return address.hostname or "", address.port or 80

    def _send(self, method: str, path: str, body: Any, timeout: float | None = TIMEOUT) -> _Answer:
        host, port = self._address()
        payload = json.dumps(body).encode() if body is not None else b""
        headers = [
            ("Host", f"{host}:{port}"),
            ("Authorization", f"Bearer {auth.read(self.home) or ''}"),
            ("Content-Length", str(len(payload))),
            ("Connection", "close"),
        ]
        if body is not None:
            headers.append(("Content-Type", "application/json"))
        try:
            sock = socket.create_connection((host, port), timeout=timeout)
        except ConnectionRefusedError:
            raise self._not_running() from None
        except OSError as exc:
            raise BranchyardError(f"cannot reach the daemon at {host}:{port}: {exc}") from None
        answer = _Answer(sock)
        answer.send(h11.Request(method=method, target=path, headers=headers), payload)
        if answer.status >= 400:
            raw = answer.read()
            try:
                error = json.loads(raw)
                raise ApiError(error["error"], error["message"], answer.status)
            except (json.JSONDecodeError, KeyError, TypeError):
                detail = raw.decode(errors="replace").strip()[:200]
                raise ApiError("http", f"HTTP {answer.status}: {detail}", answer.status) from None
        return answer

    def call(self, method: str, path: str, body: Any = None) -> Any:
        return json.loads(self._send(method, path, body).read())

    def text(self, path: str) -> str:
        """A GET's answer that is text, not JSON (YAML, a log)."""
        return self._send("GET", path, None).read().decode()

    def warned_text(self, path: str) -> tuple[str, list[str]]:
        """:meth:`text`, and the answer's warnings (its :data:`WARNING` headers)."""
        answer = self._send("GET", path, None)
        return answer.read().decode(), answer.warnings

    def lines(self, path: str) -> Iterator[str]:
        """The lines of a streamed answer (server-sent events), as they come."""
        rest = b""
        for chunk in self.stream(path):
            *complete, rest = (rest + chunk).split(b"\n")
            for line in complete:
                yield line.decode(errors="replace")
        if rest:
            yield rest.decode(errors="replace")

    def stream(self, path: str) -> Iterator[bytes]:
        return self._send("GET", path, None, timeout=None).chunks()


class _Answer:
    """One request on its own connection, and the answer read as it comes."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._http = h11.Connection(h11.CLIENT)
        self.status = 0
        self.warnings: list[str] = []

    def send(self, request: h11.Request, payload: bytes) -> None:
        try:
            for event in (request, h11.Data(data=payload), h11.EndOfMessage()):
                self._sock.sendall(self._http.send(event) or b"")
            response = self._next()
        except OSError as exc:
            self._sock.close()
            raise BranchyardError(f"lost the connection to the daemon: {exc}") from None
        except BaseException:
            self._sock.close()
            raise
        if not isinstance(response, h11.Response):
            self._sock.close()
            raise BranchyardError("the daemon closed the connection without answering")
        self.status = response.status_code
        header = WARNING.lower().encode()
        self.warnings = [v.decode(errors="replace") for k, v in response.headers if k == header]

    def chunks(self) -> Iterator[bytes]:
        try:
            while isinstance(event := self._next(), h11.Data):
                yield bytes(event.data)
        finally:
            self._sock.close()

    def read(self) -> bytes:
        return b"".join(self.chunks())

    def _next(self) -> object:  # an h11 event (the caller checks which)
        try:
            while (event := self._http.next_event()) is h11.NEED_DATA:
                self._http.receive_data(self._sock.recv(65536))
        except (OSError, h11.RemoteProtocolError) as exc:
            raise BranchyardError(f"lost the connection to the daemon: {exc}") from None
        return event
