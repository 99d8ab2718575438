"""The CLI's side of the API: find the daemon through the home and talk JSON to it.

Standard library only, so every CLI command starts fast. The daemon's address is
in ``HOME/daemon.json``; no file, or nobody answering there, means it is not
running, and the error says how to start it.
"""

from __future__ import annotations

import http.client
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode, urlsplit

from branchyard import auth
from branchyard.errors import BranchyardError, DaemonNotRunning

DAEMON_FILE = "daemon.json"
TIMEOUT = 60.0


def default_home() -> Path:
    return Path(os.environ.get("BRANCHYARD_HOME") or Path.home() / ".branchyard")


def path_of(*parts: str, **query: Any) -> str:
    path = "/api/" + "/".join(quote(p, safe="") for p in parts)
    params = {k: v for k, v in query.items() if v not in (None, False)}
    return f"{path}?{urlencode(params)}" if params else path


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

    def _connection(self, timeout: float | None) -> http.client.HTTPConnection:
        try:
            info = json.loads((self.home / DAEMON_FILE).read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            raise self._not_running() from None
        address = urlsplit(info["api"])
        return http.client.HTTPConnection(address.hostname or "", address.port, timeout=timeout)

    def _send(
        self, method: str, path: str, body: Any, timeout: float | None = TIMEOUT
    ) -> http.client.HTTPResponse:
        connection = self._connection(timeout)
        payload = json.dumps(body).encode() if body is not None else None
        headers = {"Authorization": f"Bearer {auth.read(self.home) or ''}"}
        if payload is not None:
            headers["Content-Type"] = "application/json"
        try:
            connection.request(method, path, body=payload, headers=headers)
            response = connection.getresponse()
        except ConnectionRefusedError:
            raise self._not_running() from None
        if response.status >= 400:
            raw = response.read()
            try:
                error = json.loads(raw)
                raise ApiError(error["error"], error["message"], response.status)
            except (json.JSONDecodeError, KeyError, TypeError):
                detail = raw.decode(errors="replace").strip()[:200]
                raise ApiError(
                    "http", f"HTTP {response.status}: {detail}", response.status
                ) from None
        return response

    def call(self, method: str, path: str, body: Any = None) -> Any:
        return json.loads(self._send(method, path, body).read())

    def text(self, path: str) -> str:
        return self._send("GET", path, None).read().decode(errors="replace")

    def lines(self, path: str) -> Iterator[str]:
        """The lines of a streamed answer (server-sent events), as they come."""
        response = self._send("GET", path, None, timeout=None)
        while line := response.readline():
            yield line.decode(errors="replace").rstrip("\n")

    def stream(self, path: str) -> Iterator[bytes]:
        response = self._send("GET", path, None, timeout=None)
        while chunk := response.read1(65536):
            yield chunk
