"""Part 2, the router: wrk through branchyard's router, against nginx, in one run.

The backend is nginx (Debian's package) serving a small static file on
loopback, so it is not the bottleneck. Three paths take the same load:

- **direct**: wrk to the nginx backend;
- **nginx proxy**: wrk to a second nginx server block that proxies to the
  backend with upstream keepalive on (``keepalive 64``, HTTP/1.1,
  ``Connection ""``). It runs in a second nginx instance (its own config and
  worker), not in the backend's: with one worker serving both blocks, the proxy
  shared its core with the backend and lost to branchyard's router for that
  reason alone, which says nothing about either proxy;
- **branchyard**: wrk to ``branchyard.router.Router`` running alone in its own
  process (``bench/router_server.py``) with one route, ``svc.main.localhost``,
  to the nginx backend. That measures the router and nothing else: the daemon's
  API, watcher and engine share the router's event loop, but are idle here.

Two modes: keep-alive connections, and a new connection per request
(``Connection: close``). nginx runs from its own config file in a temp directory,
not as the system service, in the foreground as a child of the bench, on
loopback ports, and is stopped afterwards. Each nginx has ``--nginx-workers`` workers (default
1: one core per proxy, as branchyard's router is one asyncio process).
"""

from __future__ import annotations

import argparse
import grp
import os
import pwd
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from bench.common import (
    LOOPBACK,
    ROOT,
    BenchError,
    Summary,
    cpu_seconds,
    free_port,
    get,
    wait_until,
)
from bench.results import Section

HOST = "svc.main.localhost"
PAGE = "index.html"
BODY = b"<!doctype html><title>bench</title><p>a small static file for the router benchmark</p>\n"

NGINX_CONFIG = """\
{user}worker_processes {workers};
daemon off;
master_process on;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{
    worker_connections 4096;
}}
http {{
    access_log off;
    default_type text/html;
    keepalive_requests 100000000;
    client_body_temp_path {dir}/tmp/body;
    proxy_temp_path {dir}/tmp/proxy;
    fastcgi_temp_path {dir}/tmp/fastcgi;
    uwsgi_temp_path {dir}/tmp/uwsgi;
    scgi_temp_path {dir}/tmp/scgi;
{http}
}}
"""

BACKEND_BLOCK = """\
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        root {dir}/www;
    }}"""

PROXY_BLOCK = """\
    upstream backend {{
        server 127.0.0.1:{backend};
        keepalive 64;
    }}
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location / {{
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $host;
        }}
    }}"""

MODES = (("keep-alive", []), ("new connection per request", ["-H", "Connection: close"]))
PATHS = ("direct", "nginx proxy", "branchyard")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("router")
    group.add_argument(
        "--duration", type=float, default=10, help="seconds per wrk run (default 10)"
    )
    group.add_argument(
        "--repeats", type=int, default=3, help="wrk runs per path and mode (default 3)"
    )
    group.add_argument("--connections", type=int, default=32, help="wrk -c (default 32)")
    group.add_argument("--threads", type=int, default=1, help="wrk -t (default 1)")
    group.add_argument(
        "--nginx-workers",
        default="1",
        help="nginx worker_processes (default 1: one core, like the router's one process)",
    )


@dataclass(frozen=True)
class WrkRun:
    requests_per_second: float
    p50: float  # seconds
    p99: float
    errors: int  # socket errors plus non-2xx/3xx answers
    cpu: float  # the proxy's CPU use in cores during the run (branchyard path, else nginx)


_UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def _duration(text: str) -> float:
    match = re.fullmatch(r"([\d.]+)(us|ms|s|m|h)", text.strip())
    if not match:
        raise BenchError(f"cannot read wrk's latency {text!r}")
    return float(match.group(1)) * _UNITS[match.group(2)]


def parse_wrk(output: str) -> tuple[float, float, float, int]:
    """(requests/s, p50 s, p99 s, errors) from ``wrk --latency`` output."""
    rate = re.search(r"^Requests/sec:\s+([\d.]+)", output, re.MULTILINE)
    p50 = re.search(r"^\s+50%\s+(\S+)", output, re.MULTILINE)
    p99 = re.search(r"^\s+99%\s+(\S+)", output, re.MULTILINE)
    if not (rate and p50 and p99):
        raise BenchError(f"cannot read wrk's output:\n{output}")
    errors = 0
    socket_errors = re.search(r"Socket errors: (.*)", output)
    if socket_errors:
        errors += sum(int(n) for n in re.findall(r"\d+", socket_errors.group(1)))
    bad = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", output)
    if bad:
        errors += int(bad.group(1))
    return float(rate.group(1)), _duration(p50.group(1)), _duration(p99.group(1)), errors


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


class Nginx:
    """nginx from a config of our own in a temp directory, in the foreground, as our child.

    ``block`` is the config's ``http`` content (BACKEND_BLOCK or PROXY_BLOCK),
    formatted with ``port`` (a free loopback port), ``dir`` and ``backend``.
    """

    def __init__(self, block: str, workers: str, backend: int = 0) -> None:
        # A directory of its own, readable by the workers (which may run as another user).
        self.directory = directory = Path(tempfile.mkdtemp(prefix="bench-nginx-"))
        directory.chmod(0o755)
        self.port = free_port()
        (directory / "www").mkdir()
        (directory / "tmp").mkdir()
        (directory / "www" / PAGE).write_bytes(BODY)
        config = directory / "nginx.conf"
        http = block.format(port=self.port, dir=directory, backend=backend)
        config.write_text(
            NGINX_CONFIG.format(user=_user_directive(), workers=workers, dir=directory, http=http)
        )
        nginx = shutil.which("nginx") or "/usr/sbin/nginx"
        self.process = subprocess.Popen(
            [nginx, "-e", str(directory / "error.log"), "-p", str(directory), "-c", str(config)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        try:
            wait_until(lambda: _answers(self.port), 10, f"nginx on port {self.port}", 0.02)
        except BenchError:
            self.stop()
            raise

    def workers(self) -> list[int]:
        return _children(self.process.pid)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGQUIT)  # graceful: workers finish, then exit
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.process.returncode not in (0, -signal.SIGQUIT):
            error = self.process.stderr.read().decode() if self.process.stderr else ""
            log = (self.directory / "error.log").read_text(errors="replace")[-2000:]
            raise BenchError(f"nginx exited {self.process.returncode}: {error} {log}")
        shutil.rmtree(self.directory, ignore_errors=True)


def _user_directive() -> str:
    """As root, nginx drops its workers to a user; name one that exists here."""
    if os.geteuid() != 0:
        return ""
    try:
        pwd.getpwnam("nobody")
        grp.getgrnam("nogroup")
    except KeyError:
        return "user root root;\n"
    return "user nobody nogroup;\n"


def _answers(port: int) -> bool:
    try:
        status, body = get(port, HOST, f"/{PAGE}", timeout=2)
    except OSError:
        return False
    return status == 200 and body == BODY


class StandaloneRouter:
    """``bench/router_server.py`` in its own process, routing HOST to the nginx backend."""

    def __init__(self, backend: int) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "bench.router_server", str(backend)],
            stdout=subprocess.PIPE,
            cwd=ROOT,
            text=True,
        )
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if not line.startswith("listening "):
            self.stop()
            raise BenchError(f"the standalone router did not start: {line!r}")
        self.port = int(line.split()[1])

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            self.process.wait(timeout=15)


def _wrk(args: argparse.Namespace, port: int, mode: list[str], seconds: float) -> str:
    command = [
        "wrk",
        f"-t{args.threads}",
        f"-c{args.connections}",
        f"-d{seconds:g}s",
        "--latency",
        "-H",
        f"Host: {HOST}",
        *mode,
        f"http://{LOOPBACK}:{port}/{PAGE}",
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=seconds + 60)
    if done.returncode != 0:
        raise BenchError(f"{' '.join(command)} failed: {done.stderr}")
    return done.stdout


def _wrk_command(args: argparse.Namespace, mode: list[str]) -> str:
    extra = " -H 'Connection: close'" if mode else ""
    return (
        f"wrk -t{args.threads} -c{args.connections} -d{args.duration:g}s --latency "
        f"-H 'Host: {HOST}'{extra} http://127.0.0.1:PORT/{PAGE}"
    )


def _version(argv: list[str]) -> str:
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    return (done.stdout + done.stderr).strip().splitlines()[0]


def require_tools() -> None:
    missing = [tool for tool in ("wrk", "nginx") if shutil.which(tool) is None]
    if "nginx" in missing and Path("/usr/sbin/nginx").exists():
        missing.remove("nginx")
    if missing:
        raise BenchError(
            f"the router benchmark needs {' and '.join(missing)}: "
            "apt-get install -y wrk nginx (Debian packages)"
        )


def run(args: argparse.Namespace, workdir: Path, command: str) -> Section:
    require_tools()
    section = Section("router", "2. Router", command)
    started = time.monotonic()
    backend = Nginx(BACKEND_BLOCK, args.nginx_workers)
    proxy: Nginx | None = None
    router: StandaloneRouter | None = None
    try:
        proxy = Nginx(PROXY_BLOCK, args.nginx_workers, backend.port)
        router = StandaloneRouter(backend.port)
        ports = {"direct": backend.port, "nginx proxy": proxy.port, "branchyard": router.port}
        for name, port in ports.items():
            if not _answers(port):
                raise BenchError(f"the {name} path does not serve the page on port {port}")
        results: dict[tuple[str, str], list[WrkRun]] = {}
        for mode_name, mode in MODES:
            for name in PATHS:  # warm up: connections, caches, the interpreter
                _wrk(args, ports[name], mode, min(1.0, args.duration))
            for _ in range(args.repeats):
                for name in PATHS:  # interleaved, so drift hits every path alike
                    pids = {
                        "direct": backend.workers(),
                        "nginx proxy": proxy.workers(),
                        "branchyard": [router.process.pid],
                    }[name]
                    cpu_before = sum(cpu_seconds(pid) for pid in pids)
                    began = time.monotonic()
                    output = _wrk(args, ports[name], mode, args.duration)
                    took = time.monotonic() - began
                    cpu = (sum(cpu_seconds(pid) for pid in pids) - cpu_before) / took
                    rate, p50, p99, errors = parse_wrk(output)
                    results.setdefault((mode_name, name), []).append(
                        WrkRun(rate, p50, p99, errors, cpu)
                    )
    finally:
        if router is not None:
            router.stop()
        if proxy is not None:
            proxy.stop()
        backend.stop()

    section.add(
        f"{_version(['nginx', '-v'])}; {_version(['wrk', '-v']).split(' Copyright')[0]}. "
        f"Backend: nginx serving a {len(BODY)}-byte static file. nginx proxy: a second "
        "nginx instance (its own config and workers) whose server block proxies to the "
        "backend with upstream `keepalive 64`. Both run in the foreground from configs in "
        f"temp directories with `worker_processes {args.nginx_workers}`. branchyard: "
        "`branchyard.router.Router` alone in its own process (`bench/router_server.py`), "
        "one route to the nginx backend; like the daemon's, it is one asyncio process "
        "(at most one core). Each figure is the median (min … max) of "
        f"{args.repeats} wrk runs of {args.duration:g} s after a warm-up, the paths "
        "interleaved. *CPU* is the proxy's own CPU use, in cores, during the run (the "
        "router process; the proxy nginx's workers; for *direct*, the backend's workers). "
        f"The machine has {os.cpu_count()} cores for wrk, the backend and the proxy.",
        "",
    )
    for mode_name, mode in MODES:
        section.add(f"### {mode_name.capitalize()}", "", f"`{_wrk_command(args, mode)}`", "")
        rows = []
        summaries = {}
        for name in PATHS:
            runs = results[(mode_name, name)]
            rate = Summary.of([r.requests_per_second for r in runs])
            p50 = Summary.of([r.p50 for r in runs])
            p99 = Summary.of([r.p99 for r in runs])
            cpu = Summary.of([r.cpu for r in runs])
            summaries[name] = (rate, p50, p99)
            rows.append(
                [
                    name,
                    f"{rate.median:,.0f} ({rate.low:,.0f} … {rate.high:,.0f})",
                    f"{p50.median * 1000:.3f} ({p50.low * 1000:.3f} … {p50.high * 1000:.3f})",
                    f"{p99.median * 1000:.3f} ({p99.low * 1000:.3f} … {p99.high * 1000:.3f})",
                    f"{cpu.median:.2f}",
                    str(sum(r.errors for r in runs)),
                ]
            )
        section.table(["path", "requests/s", "p50 ms", "p99 ms", "CPU", "errors"], rows)
        by_rate, _, by_p99 = summaries["branchyard"]
        ng_rate, _, ng_p99 = summaries["nginx proxy"]
        direct_rate, _, direct_p99 = summaries["direct"]
        throughput = by_rate.median / ng_rate.median
        tail = by_p99.median / ng_p99.median
        section.add(
            f"Ratios branchyard / nginx proxy: throughput {throughput:.2f}, p99 {tail:.2f}. "
            f"branchyard / direct: throughput {by_rate.median / direct_rate.median:.2f}, "
            f"p99 {by_p99.median / direct_p99.median:.2f}.",
            "",
        )
        section.target(
            f"router, {mode_name}: throughput / nginx proxy",
            f"{throughput:.2f}",
            "≥ 0.5",
            throughput >= 0.5,
        )
        section.target(
            f"router, {mode_name}: p99 / nginx proxy", f"{tail:.2f}", "≤ 2.0", tail <= 2.0
        )
    section.seconds = time.monotonic() - started
    return section
