"""Part 2, the router: wrk through branchyard's router, against nginx, in one run.

The backend is nginx (Debian's package) serving a small static file on
loopback, run by a real ``branchyard up`` as its service ``svc`` (a Procfile
that starts nginx on ``$PORT``), so it is not the bottleneck and every path
reaches the same one. Four paths take the same load:

- **direct**: wrk to the nginx backend;
- **nginx proxy**: wrk to a second nginx that proxies to the backend with
  upstream keepalive on (``keepalive 64``, HTTP/1.1, ``Connection ""``). It runs
  as an instance of its own (its own config and worker), not in the backend's:
  with one worker serving both, the proxy shared its core with the backend and
  lost to branchyard's router for that reason alone, which says nothing about
  either proxy;
- **branchyard up**: wrk to the router of the daemon that runs the backend, as
  users get it: it shares one event loop with the watcher, the engine, the API
  and the supervisors. During its last run in each mode, a commit to ``svc`` is
  pushed: the daemon builds and starts a new nginx, switches the route to it
  and drains the old one while wrk goes on;
- **router alone**: ``branchyard.router.Router`` in a process of its own
  (``bench/router_server.py``) with one route to the backend: the router and
  nothing else.

Two modes: keep-alive connections, and a new connection per request
(``Connection: close``). nginx runs from its own config files in temp
directories, not as the system service, in the foreground (the proxy as a child
of the bench, the backend as the daemon's service), on loopback ports, and is
stopped afterwards. Each nginx has ``--nginx-workers`` workers (default 1: one
core per proxy, as branchyard's router is one asyncio process). wrk and nginx
come from Debian's packages; as root the bench installs them if they are missing.
"""

from __future__ import annotations

import argparse
import grp
import http.client
import os
import pwd
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from bench.common import (
    LOOPBACK,
    ROOT,
    BenchError,
    Daemon,
    ServiceRepo,
    Summary,
    command_name,
    cpu_seconds,
    free_port,
    get,
    wait_until,
)
from bench.results import Section
from branchyard.runtime.netns import NetworkNamespace

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

# The backend as a service of the daemon: nginx on $PORT, from a directory of its own
# that its workers can read (they may run as another user), in the foreground.
SERVE = """\
#!/bin/sh
set -e
dir=$(mktemp -d /tmp/bench-svc-nginx.XXXXXX)
chmod 755 "$dir"
mkdir "$dir/tmp"
cp -r www "$dir/www"
sed -e "s|@PORT@|$PORT|g" -e "s|@DIR@|$dir|g" nginx.conf > "$dir/nginx.conf"
exec "$(command -v nginx || echo /usr/sbin/nginx)" -e "$dir/error.log" -p "$dir" \\
    -c "$dir/nginx.conf"
"""

MODES: tuple[tuple[str, list[str]], ...] = (
    ("keep-alive", []),
    ("new connection per request", ["-H", "Connection: close"]),
)
PATHS = ("direct", "nginx proxy", "router alone", "branchyard up")  # the deploy comes last
TARGETED = ("branchyard up", "router alone")


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

    def __init__(self, block: str, workers: str, backend: int = 0, box: int | None = None) -> None:
        # A directory of its own, readable by the workers (which may run as another user).
        self.directory = directory = Path(tempfile.mkdtemp(prefix="bench-nginx-"))
        directory.chmod(0o755)
        self.port = free_port()
        (directory / "www").mkdir()
        (directory / "tmp").mkdir()
        (directory / "www" / PAGE).write_bytes(BODY)
        self._block = block
        self._workers = workers
        config = self._configure(backend)
        nginx = shutil.which("nginx") or "/usr/sbin/nginx"
        self.process = subprocess.Popen(
            _in_box(
                box,
                [
                    nginx,
                    "-e",
                    str(directory / "error.log"),
                    "-p",
                    str(directory),
                    "-c",
                    str(config),
                ],
            ),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        self.box = box  # None, or the process in whose network namespace it runs
        try:
            wait_until(lambda: _answers(self.port, box), 10, f"nginx on port {self.port}", 0.02)
        except BenchError:
            self.stop()
            raise

    def _configure(self, backend: int) -> Path:
        config = self.directory / "nginx.conf"
        http = self._block.format(port=self.port, dir=self.directory, backend=backend)
        config.write_text(
            NGINX_CONFIG.format(
                user=_user_directive(), workers=self._workers, dir=self.directory, http=http
            )
        )
        return config

    def reload(self, backend: int) -> None:
        """Proxy to ``backend`` from now on (new workers; the old ones finish and leave)."""
        self._configure(backend)
        old = set(self.workers())
        self.process.send_signal(signal.SIGHUP)
        wait_until(
            lambda: self.workers() and not old & set(self.workers()),
            15,
            "nginx to reload its configuration",
            0.02,
        )

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


def _get_in(box: int, port: int) -> tuple[int, bytes]:
    """One GET of the page on ``port`` inside the network namespace of the process ``box``."""
    namespace = NetworkNamespace.of(box)
    try:
        sock = namespace.new_socket()
    finally:
        namespace.close()
    sock.setblocking(True)
    sock.settimeout(2)
    connection = http.client.HTTPConnection(LOOPBACK, port, timeout=2)
    try:
        sock.connect((LOOPBACK, port))
        connection.sock = sock
        connection.request("GET", f"/{PAGE}", headers={"Host": HOST, "Connection": "close"})
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def _answers(port: int, box: int | None = None) -> bool:
    """Whether the page is served on ``port``, here or inside the box of the process ``box``."""
    try:
        status, body = get(port, HOST, f"/{PAGE}", timeout=2) if box is None else _get_in(box, port)
    except OSError:
        return False
    return status == 200 and body == BODY


def _in_box(box: int | None, argv: list[str]) -> list[str]:
    """``argv`` run inside the network namespace of the process ``box`` (if any)."""
    return argv if box is None else ["nsenter", f"--net=/proc/{box}/ns/net", "--", *argv]


def _listening(pid: int, port: int) -> bool:
    """Whether ``port`` listens in the network namespace of ``pid`` (its /proc/PID/net/tcp)."""
    try:
        table = Path(f"/proc/{pid}/net/tcp").read_text().splitlines()[1:]
    except OSError:
        return False
    return any(
        int(row.split()[1].rsplit(":", 1)[1], 16) == port and row.split()[3] == "0A"
        for row in table
    )


class StandaloneRouter:
    """``bench/router_server.py`` in its own process, routing HOST to the nginx backend
    (inside the box of the process ``box``, as the daemon reaches it, if there is one)."""

    def __init__(self, backend: int, box: int | None) -> None:
        inside = [] if box is None else ["--box", str(box)]
        self.process = subprocess.Popen(
            [sys.executable, "-m", "bench.router_server", str(backend), *inside],
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


def _wrk(
    args: argparse.Namespace, port: int, mode: list[str], seconds: float, box: int | None
) -> str:
    """wrk against ``port``, from inside the box of the process ``box`` if there is one."""
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
    done = subprocess.run(
        _in_box(box, command), capture_output=True, text=True, timeout=seconds + 60
    )
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


def _missing_tools() -> list[str]:
    missing = [tool for tool in ("wrk", "nginx") if shutil.which(tool) is None]
    if "nginx" in missing and Path("/usr/sbin/nginx").exists():
        missing.remove("nginx")
    return missing


def require_tools() -> None:
    """wrk and nginx, from Debian's packages: installed here as root, else asked for."""
    missing = _missing_tools()
    if missing and os.geteuid() == 0 and shutil.which("apt-get"):
        print(f"bench: installing {' '.join(missing)} (apt-get)", file=sys.stderr, flush=True)
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        install = ["apt-get", "install", "-y", "-qq", *missing]
        if subprocess.run(install, env=env, capture_output=True, check=False).returncode != 0:
            subprocess.run(["apt-get", "update", "-qq"], env=env, capture_output=True)
            subprocess.run(install, env=env, capture_output=True, check=False)
        missing = _missing_tools()
    if missing:
        raise BenchError(
            f"the router benchmark needs {' and '.join(missing)}: "
            "apt-get install -y wrk nginx (Debian packages)"
        )


def _backend_files(workers: str, version: int) -> dict[str, str]:
    """The ``svc`` repo: nginx serving PAGE on $PORT; ``version`` makes each commit new."""
    http = BACKEND_BLOCK.format(port="@PORT@", dir="@DIR@")
    config = NGINX_CONFIG.format(user=_user_directive(), workers=workers, dir="@DIR@", http=http)
    return {
        "Procfile": "web: sh serve.sh\n",
        "serve.sh": SERVE,
        "nginx.conf": config,
        f"www/{PAGE}": BODY.decode(),
        "VERSION": f"{version}\n",
    }


class Backend:
    """The nginx backend, run by a real ``branchyard up`` as its service ``svc``."""

    def __init__(self, workdir: Path, workers: str) -> None:
        self.workers_setting = workers
        self.box: int | None = None  # an nginx of the live revision, in its box's network
        self.daemon = Daemon.start(workdir / "home")
        try:
            self.repo = ServiceRepo.create(workdir / "repos", "svc", _backend_files(workers, 0))
            self.daemon.add_repo(str(self.repo.origin))
            self.port = self._wait_for_port(None)
        except BaseException:
            self.stop()
            raise
        self.deploys = 0

    def _wait_for_port(self, old: int | None) -> int:
        def serving() -> int | None:
            port = self.daemon.live_port("main", "svc")
            if not port or port == old:
                return None
            self.box = self._box_of(port)
            return port if _answers(port, self.box) else None

        return wait_until(serving, 60, "the nginx service to go live", 0.02)

    def _box_of(self, port: int) -> int | None:
        """The nginx serving ``port`` in a box of its own (its network), or None where the
        daemon's boxes share the host's network."""
        if "its own network" not in self.daemon.info.get("sandbox", ""):
            return None
        return next((pid for pid in self.nginx_pids() if _listening(pid, port)), None)

    def nginx_pids(self) -> list[int]:
        """The backend's nginx processes: descendants of the daemon (nginx writes its
        process title over its environment, so the marker cannot find them)."""
        found, parents = [], [self.daemon.pid]
        while parents:
            children = [child for parent in parents for child in _children(parent)]
            found += [pid for pid in children if command_name(pid) == "nginx"]
            parents = children
        return found

    def deploy(self) -> float:
        """Push a new commit of ``svc``; seconds from the push returning to its route."""
        self.deploys += 1
        self.repo.commit(_backend_files(self.workers_setting, self.deploys), "deploy")
        old = self.port
        self.repo.push()
        pushed = time.monotonic()
        self.port = self._wait_for_port(old)
        return time.monotonic() - pushed

    def stop(self) -> None:
        try:
            self.daemon.stop()
        finally:
            for left in Path(tempfile.gettempdir()).glob("bench-svc-nginx.*"):
                shutil.rmtree(left, ignore_errors=True)


@dataclass(frozen=True)
class DeployRun:
    mode: str
    run: WrkRun
    after: float  # seconds into the run the push was made
    to_live: float  # from the push to the new revision serving


def _measure(
    args: argparse.Namespace,
    port: int,
    mode: list[str],
    pids: list[int],
    box: int | None,
    during: Callable[[], None] | None = None,
) -> WrkRun:
    """One wrk run; ``during`` runs in a thread a third of the way into it."""
    cpu_before = {pid: cpu_seconds(pid) for pid in pids}
    timer = threading.Timer(args.duration / 3, during) if during is not None else None
    if timer is not None:
        timer.start()
    began = time.monotonic()
    output = _wrk(args, port, mode, args.duration, box)
    took = time.monotonic() - began
    if timer is not None:
        timer.join()
    cpu = sum(cpu_seconds(pid) - before for pid, before in cpu_before.items())
    rate, p50, p99, errors = parse_wrk(output)
    return WrkRun(rate, p50, p99, errors, cpu / took)


def run(args: argparse.Namespace, workdir: Path, command: str) -> Section:
    require_tools()
    section = Section("router", "2. Router", command)
    started = time.monotonic()
    backend = Backend(workdir, args.nginx_workers)
    proxy: Nginx | None = None
    router: StandaloneRouter | None = None
    deploys: list[DeployRun] = []
    try:
        proxy = Nginx(PROXY_BLOCK, args.nginx_workers, backend.port, backend.box)
        router = StandaloneRouter(backend.port, backend.box)
        results: dict[tuple[str, str], list[WrkRun]] = {}
        for mode_name, mode in MODES:
            if mode_name != MODES[0][0]:  # the deploy moved the backend: follow it
                if backend.box is None:
                    proxy.reload(backend.port)
                else:  # into the new revision's box
                    proxy.stop()
                    proxy = Nginx(PROXY_BLOCK, args.nginx_workers, backend.port, backend.box)
                router.stop()
                router = StandaloneRouter(backend.port, backend.box)
            # wrk runs where each proxy can be reached: nginx only inside the backend's box
            boxes = {"direct": backend.box, "nginx proxy": backend.box}
            ports = {
                "direct": backend.port,
                "nginx proxy": proxy.port,
                "branchyard up": backend.daemon.router_port,
                "router alone": router.port,
            }
            cpus = {
                "direct": backend.nginx_pids(),
                "nginx proxy": proxy.workers(),
                "branchyard up": [backend.daemon.pid],
                "router alone": [router.process.pid],
            }
            for name, port in ports.items():
                if not _answers(port, boxes.get(name)):
                    raise BenchError(f"the {name} path does not serve the page on port {port}")
            for name in PATHS:  # warm up: connections, caches, the interpreter
                _wrk(args, ports[name], mode, min(1.0, args.duration), boxes.get(name))
            for repeat in range(args.repeats):
                for name in PATHS:  # interleaved, so drift hits every path alike
                    pushed: list[float] = []

                    def deploy(into: list[float] = pushed) -> None:
                        into.append(backend.deploy())

                    last = repeat == args.repeats - 1 and name == "branchyard up"
                    measured = _measure(
                        args,
                        ports[name],
                        mode,
                        cpus[name],
                        boxes.get(name),
                        deploy if last else None,
                    )
                    results.setdefault((mode_name, name), []).append(measured)
                    if last and not pushed:
                        raise BenchError(f"the deploy during {mode_name} did not go live")
                    if pushed:
                        deploys.append(DeployRun(mode_name, measured, args.duration / 3, pushed[0]))
    finally:
        if router is not None:
            router.stop()
        if proxy is not None:
            proxy.stop()
        backend.stop()

    section.add(
        f"{_version(['nginx', '-v'])}; {_version(['wrk', '-v']).split(' Copyright')[0]}. "
        f"Backend: nginx serving a {len(BODY)}-byte static file, run by a real "
        "`branchyard up` as its service `svc` (a Procfile that starts nginx on `$PORT`); "
        "every path reaches that one backend, which runs in a box with a network "
        "namespace of its own (a root daemon's). *direct* and *nginx proxy* run inside "
        "that namespace (`nsenter --net`: wrk, and the proxy nginx), as nginx has no other "
        "way in; *branchyard up* and *router alone* reach in from the host with sockets "
        "made inside it (`branchyard/runtime/netns.py`), as users' requests do. "
        "*nginx proxy*: a second nginx instance "
        "(its own config and workers) proxying to it with upstream `keepalive 64`. "
        f"Both run with `worker_processes {args.nginx_workers}`. *branchyard up*: the "
        "router of that daemon, as users get it, on the one event loop it shares with "
        "the watcher, the engine, the API and the supervisors. *router alone*: "
        "`branchyard.router.Router` in a process of its own (`bench/router_server.py`) "
        "with one route to the backend. Each figure is the median (min … max) of "
        f"{args.repeats} wrk runs of {args.duration:g} s after a warm-up, the paths "
        "interleaved; during the last *branchyard up* run of each mode a commit to `svc` "
        "is pushed, so the daemon builds and starts a new nginx, moves the route to it and "
        "drains the old one under load (the other paths then follow the new backend). "
        "*CPU* is the proxy's own CPU use, in cores, during the run (the daemon, all of "
        "it; the router process; the proxy nginx's workers; for *direct*, the backend's "
        f"nginx). The machine has {os.cpu_count()} cores for wrk, the backend and the proxy.",
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
            summaries[name] = (rate, p99)
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
        for done in (d for d in deploys if d.mode == mode_name):
            rows.append(
                [
                    "branchyard up, the run with a deploy",
                    f"{done.run.requests_per_second:,.0f}",
                    f"{done.run.p50 * 1000:.3f}",
                    f"{done.run.p99 * 1000:.3f}",
                    f"{done.run.cpu:.2f}",
                    str(done.run.errors),
                ]
            )
        section.table(["path", "requests/s", "p50 ms", "p99 ms", "CPU", "errors"], rows)
        ng_rate, ng_p99 = summaries["nginx proxy"]
        ratios = []
        for name in TARGETED:
            rate, p99 = summaries[name]
            throughput = rate.median / ng_rate.median
            tail = p99.median / ng_p99.median
            ratios.append(f"{name} throughput {throughput:.2f}, p99 {tail:.2f}")
            section.target(
                f"{name}, {mode_name}: throughput / nginx proxy",
                f"{throughput:.2f}",
                "≥ 0.5",
                throughput >= 0.5,
            )
            section.target(
                f"{name}, {mode_name}: p99 / nginx proxy", f"{tail:.2f}", "≤ 2.0", tail <= 2.0
            )
        lines = [f"Ratios to the nginx proxy: {'; '.join(ratios)}."]
        for done in (d for d in deploys if d.mode == mode_name):
            lines.append(
                f"The deploy: pushed {done.after:.1f} s into the run, the new nginx served "
                f"{done.to_live * 1000:.0f} ms after the push returned; that run alone: "
                f"throughput {done.run.requests_per_second / ng_rate.median:.2f}, p99 "
                f"{done.run.p99 / ng_p99.median:.2f} of the nginx proxy's medians, "
                f"{done.run.errors} errors."
            )
        section.add(" ".join(lines), "")
    section.seconds = time.monotonic() - started
    return section
