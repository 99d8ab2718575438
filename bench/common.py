"""What every part of the benchmark shares: git, the real daemon, HTTP probes, statistics.

Everything talks to 127.0.0.1 only. The daemon is the real one (``python -m
branchyard up``) in a temp home, started the way a user starts it; every process
it starts inherits a unique marker variable, so the bench can find (and measure)
them through ``/proc`` and check that none is left behind.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import platform
import signal
import sqlite3
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from branchyard.runtime.processes import Ports

T = TypeVar("T")

LOOPBACK = "127.0.0.1"
ROOT = Path(__file__).resolve().parent.parent
BRANCHYARD = Path(sys.executable).with_name("branchyard")  # the console script in the venv
PORTS = Ports()
MARKER_VARIABLE = "BENCH_MARK"  # handed to the boxes with --pass-env

GIT_IDENTITY = {
    "GIT_AUTHOR_NAME": "Bench Mark",
    "GIT_AUTHOR_EMAIL": "bench@example.com",
    "GIT_COMMITTER_NAME": "Bench Mark",
    "GIT_COMMITTER_EMAIL": "bench@example.com",
}
os.environ.update(GIT_IDENTITY)


class BenchError(Exception):
    """The benchmark could not run (a missing tool, a daemon that died, a timeout)."""


# -- git ---------------------------------------------------------------------------


def git(*args: str, cwd: Path | None = None) -> str:
    done = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise BenchError(f"git {' '.join(args)} failed: {done.stderr.strip()}")
    return done.stdout.strip()


@dataclass
class ServiceRepo:
    """A bare 'origin' repo and a working clone to commit and push from."""

    name: str
    origin: Path
    clone: Path

    @classmethod
    def create(cls, root: Path, name: str, files: dict[str, str]) -> ServiceRepo:
        origin = root / "origin" / f"{name}.git"
        clone = root / "work" / name
        git("init", "-q", "--bare", "-b", "main", str(origin))
        git("init", "-q", "-b", "main", str(clone))
        git("remote", "add", "origin", str(origin), cwd=clone)
        repo = cls(name, origin, clone)
        repo.commit(files, "first")
        repo.push("main")
        return repo

    def commit(self, files: dict[str, str], message: str = "change") -> str:
        for relative, text in files.items():
            path = self.clone / relative
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
        git("add", "-A", cwd=self.clone)
        git("commit", "-q", "--allow-empty", "-m", message, cwd=self.clone)
        return git("rev-parse", "HEAD", cwd=self.clone)

    def branch_in_origin(self, branches: Sequence[str]) -> None:
        """Make ``branches`` at the clone's HEAD directly in the bare repo (one
        ``update-ref``, as many namespaces at once as a person would push one by one)."""
        sha = git("rev-parse", "HEAD", cwd=self.clone)
        lines = "".join(f"create refs/heads/{branch} {sha}\n" for branch in branches)
        subprocess.run(
            ["git", "--git-dir", str(self.origin), "update-ref", "--stdin"],
            input=lines,
            text=True,
            check=True,
        )

    def push(self, branch: str = "main") -> None:
        git("push", "-q", "origin", branch, cwd=self.clone)

    def checkout(self, branch: str, new: bool = False) -> None:
        git("checkout", "-q", *(["-b"] if new else []), branch, cwd=self.clone)

    def export(self, dest: Path) -> Path:
        """The clone's HEAD tree in ``dest`` (what the runtime would check out)."""
        dest.mkdir(parents=True, exist_ok=True)
        archive = subprocess.run(
            ["git", "archive", "--format=tar", "HEAD"], cwd=self.clone, capture_output=True
        )
        subprocess.run(["tar", "-x", "-C", str(dest)], input=archive.stdout, check=True)
        return dest


# -- HTTP probes -------------------------------------------------------------------


def get(
    port: int, host: str = "localhost", path: str = "/", timeout: float = 5.0
) -> tuple[int, bytes]:
    """``(status, body)`` of one GET on a fresh connection (``Connection: close``)."""
    connection = http.client.HTTPConnection(LOOPBACK, port, timeout=timeout)
    try:
        connection.request("GET", path, headers={"Host": host, "Connection": "close"})
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def revision_at(port: int, host: str) -> str | None:
    """The revision a sample service reports through ``port``, or None if it does not answer."""
    try:
        status, body = get(port, host, timeout=2.0)
        if status != 200:
            return None
        answer: dict[str, Any] = json.loads(body)
        return str(answer.get("revision"))
    except (OSError, ValueError, http.client.HTTPException):
        return None


def wait_until(
    check: Callable[[], T | None], timeout: float, what: str, interval: float = 0.005
) -> T:
    """Call ``check`` every ``interval`` s until it returns something truthy."""
    deadline = time.monotonic() + timeout
    last: T | None = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(interval)
    raise BenchError(f"timed out after {timeout:g} s waiting for {what} (last: {last!r})")


def free_port() -> int:
    """A free loopback port for a process to listen on later, outside the kernel's ephemeral
    range (a ``bind(0)`` port may go to any outgoing connection before that process binds it),
    and never one this bench handed out before."""
    return PORTS.take()


# -- /proc -------------------------------------------------------------------------


def processes_with(marker: str) -> list[int]:
    """Pids of processes whose environment contains ``marker``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if marker.encode() in (entry / "environ").read_bytes():
                found.append(int(entry.name))
        except OSError:
            continue
    return found


def status_kib(pid: int, key: str) -> int:
    """A ``kB`` field of ``/proc/PID/status`` (``VmRSS``, ``VmHWM``), 0 if gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(f"{key}:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def command_line(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
    except OSError:
        return "?"


def command_name(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return "?"


def threads(pid: int) -> int:
    return status_kib(pid, "Threads")


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of ``pid`` itself (not its children)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of stat)
    return ticks / os.sysconf("SC_CLK_TCK")


def cli_env(base: Mapping[str, str], root: Path = ROOT) -> dict[str, str]:
    """``base`` for the ``branchyard`` console script, importing the branchyard of the
    checkout ``root`` (the one beside this bench unless told: the installed one, unless
    the bench runs in another checkout)."""
    path = os.pathsep.join(p for p in (str(root), base.get("PYTHONPATH", "")) if p)
    return {**base, "PYTHONPATH": path}


# -- the daemon --------------------------------------------------------------------


@dataclass
class Daemon:
    """A real ``branchyard up`` in a temp home, on free loopback ports."""

    home: Path
    process: subprocess.Popen[bytes]
    marker: str
    root: Path = ROOT
    info: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def start(cls, home: Path, *extra: str, root: Path = ROOT) -> Daemon:
        """The daemon of the checkout ``root`` (this bench's unless told)."""
        home.mkdir(parents=True, exist_ok=True)
        marker = f"BENCH_{uuid.uuid4().hex}"
        log = (home / "daemon.log").open("wb")
        # Boxes get the marker only when told (a checkout before --pass-env gave them all).
        knows = "--pass-env" in (root / "branchyard" / "cli" / "admin.py").read_text()
        process = subprocess.Popen(
            [
                *(sys.executable, "-m", "branchyard", "--home", str(home), "up"),
                *("--router-port", "0", "--api-port", "0", *extra),
                *(("--pass-env", MARKER_VARIABLE) if knows else ()),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**cli_env(os.environ, root), MARKER_VARIABLE: marker},
            cwd=root,
        )
        daemon = cls(home, process, marker, root)

        def ready() -> bool:
            if process.poll() is not None:
                raise BenchError(f"the daemon exited early: {daemon.log_tail()}")
            try:
                daemon.info = json.loads((home / "daemon.json").read_text())
            except (OSError, ValueError):
                return False
            return True

        wait_until(ready, 30, "daemon.json", interval=0.02)
        return daemon

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def router_port(self) -> int:
        return int(self.info["router"].rsplit(":", 1)[1])

    @property
    def api_port(self) -> int:
        return int(self.info["api"].rsplit(":", 1)[1])

    def log_tail(self, size: int = 3000) -> str:
        return (self.home / "daemon.log").read_text(errors="replace")[-size:]

    def cli(self, *args: str) -> str:
        done = subprocess.run(
            [str(BRANCHYARD), "--home", str(self.home), *args],
            capture_output=True,
            text=True,
            timeout=120,
            env=cli_env(os.environ, self.root),
        )
        if done.returncode != 0:
            raise BenchError(f"branchyard {' '.join(args)} failed: {done.stderr.strip()}")
        return done.stdout

    def api(self, method: str, path: str, body: Any = None) -> Any:
        connection = http.client.HTTPConnection(LOOPBACK, self.api_port, timeout=60)
        try:
            payload = json.dumps(body).encode() if body is not None else None
            headers = {"Content-Type": "application/json"} if payload is not None else {}
            token = self.home / "token"  # the API token, where the daemon has one
            if token.exists():
                headers["Authorization"] = f"Bearer {token.read_text().strip()}"
            connection.request(method, path, body=payload, headers=headers)
            response = connection.getresponse()
            data = response.read()
            if response.status >= 400:
                raise BenchError(f"{method} {path}: HTTP {response.status}: {data[:300]!r}")
            return json.loads(data)
        finally:
            connection.close()

    def add_repo(self, url: str, name: str | None = None) -> None:
        self.api("POST", "/api/repos", {"url": url, "name": name})

    def services(self) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = self.api("GET", "/api/services")
        return rows

    def service_pids(self) -> list[int]:
        """Every process the daemon started that is still running (its services)."""
        return [pid for pid in processes_with(self.marker) if pid != self.pid]

    def stop(self) -> float:
        """SIGTERM, wait for exit; the seconds it took. Fails if a service survives."""
        started = time.monotonic()
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
                raise BenchError("the daemon did not stop within 60 s") from None
        took = time.monotonic() - started
        deadline = time.monotonic() + 15
        while (left := processes_with(self.marker)) and time.monotonic() < deadline:
            time.sleep(0.05)
        if left:
            raise BenchError(
                "the daemon left processes behind: "
                + "; ".join(f"{pid} {command_line(pid)}" for pid in left)
            )
        if self.process.returncode != 0:
            raise BenchError(f"the daemon exited {self.process.returncode}: {self.log_tail()}")
        return took

    def __enter__(self) -> Daemon:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.process.poll() is None:
            self.stop()

    def _query(self, sql: str, parameters: tuple[Any, ...]) -> list[tuple[Any, ...]]:
        """Rows from the daemon's store, opened read-only; empty if it cannot be read so."""
        try:
            with contextlib.closing(
                sqlite3.connect(f"file:{self.home / 'state.db'}?mode=ro", uri=True)
            ) as db:
                return [tuple(row) for row in db.execute(sql, parameters).fetchall()]
        except sqlite3.Error:
            return []

    def events(self, since: float) -> list[tuple[float, str, str, str, str]]:
        """(at, kind, namespace, service, message) from the store since ``since`` (wall
        clock), for breakdowns; empty if the store cannot be read that way."""
        rows = self._query(
            "SELECT at, kind, coalesce(namespace, ''), coalesce(service, ''), message "
            "FROM events WHERE at >= ? ORDER BY at",
            (since,),
        )
        return [
            (float(at), str(kind), str(ns), str(service), str(message))
            for at, kind, ns, service, message in rows
        ]

    def live_ordinal(self, namespace: str, service: str, sha: str) -> int | None:
        """The ordinal of the service's revision of ``sha`` once it is live, else None."""
        rows = self._query(
            "SELECT ordinal FROM revisions WHERE namespace = ? AND service = ? AND sha = ? "
            "AND state = 'live' ORDER BY ordinal DESC LIMIT 1",
            (namespace, service, sha),
        )
        return int(rows[0][0]) if rows else None

    def live_count(self) -> int:
        """How many (namespace, service) have a live revision."""
        rows = self._query(
            "SELECT count(*) FROM (SELECT DISTINCT namespace, service FROM revisions "
            "WHERE state = 'live')",
            (),
        )
        return int(rows[0][0]) if rows else 0

    def live_port(self, namespace: str, service: str) -> int | None:
        """The port of the service's live revision (the router's backend), if one is live."""
        rows = self._query(
            "SELECT port FROM revisions WHERE namespace = ? AND service = ? AND state = 'live' "
            "ORDER BY ordinal DESC LIMIT 1",
            (namespace, service),
        )
        return int(rows[0][0]) if rows and rows[0][0] else None


# -- statistics --------------------------------------------------------------------


def quantile(values: Sequence[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    ordered = sorted(values)
    if not ordered:
        raise ValueError("no values")
    position = (len(ordered) - 1) * q
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


@dataclass(frozen=True)
class Summary:
    n: int
    median: float
    p95: float
    p99: float
    low: float
    high: float

    @classmethod
    def of(cls, values: Sequence[float]) -> Summary:
        return cls(
            len(values),
            statistics.median(values),
            quantile(values, 0.95),
            quantile(values, 0.99),
            min(values),
            max(values),
        )


# -- the machine -------------------------------------------------------------------


def machine() -> dict[str, str]:
    memory = "?"
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                memory = f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
    except OSError:
        pass
    cpu = platform.processor() or "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cores": str(os.cpu_count()),
        "cpu": cpu,
        "memory": memory,
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "kernel": f"{platform.system()} {platform.release()}",
        "git": git("--version").removeprefix("git version "),
    }
