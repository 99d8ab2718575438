"""``branchyard up``: wires the store, watcher, engine, runtime, router and API together.

This is the one place that makes the daemon's parts and connects them: the engine
and its rollouts receive a runtime and a traffic layer (here the local ones:
processes on this machine and the built-in router), the store, watcher, settings,
vault, status reporter and clock; the watcher's branch heads and the store's
revision changes reach the engine through callbacks given here. Another runtime is
another module and another line in :func:`_seams`.

Everything runs on one asyncio loop in one process. The daemon writes
``daemon.json`` in the home (its pid and addresses) for the CLI to find it, and
holds ``daemon.lock`` so that two daemons never share a home. SIGINT or
SIGTERM stops every service process and closes every port before it exits.

What the daemon keeps is private: the home is 0700 and everything it writes is
0600 (umask 077). Pushed code runs in a sandbox (``runtime.sandbox``), and
without one only when told ``--no-sandbox``. Secrets given in the environment
(:data:`SECRET_VARIABLES`) do not stay in it, nor in the one the kernel shows in
``/proc/PID/environ``: :func:`hide_secrets` re-executes the daemon without them
and hands them over through a pipe, as values. Boxes get an explicit environment
(``runtime.environment``), never the daemon's.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import gc
import json
import logging
import os
import resource
import signal
import socket
import sys
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import IO

import uvicorn
from fastapi import FastAPI
from starlette.types import ASGIApp
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from branchyard import auth, dashboard
from branchyard.api import create_app
from branchyard.engine import Engine
from branchyard.errors import UsageError
from branchyard.git import Sources
from branchyard.gitserve import Address, GitServer
from branchyard.model import Clock, RepoHeads
from branchyard.rollout import DRAIN_GRACE, Rollouts
from branchyard.router import HEAD_TIMEOUT_SECONDS, LocalTraffic, Router, RouteTable
from branchyard.router.caps import process_budget
from branchyard.runtime import Reviewed, RevisionSpec, Runtime, Traffic
from branchyard.runtime.boxnet import BoxNetwork
from branchyard.runtime.cgroups import CONTROLLERS, Cgroups
from branchyard.runtime.cgroups import Limits as Limits  # for `up`
from branchyard.runtime.environment import Outside
from branchyard.runtime.kube.options import KubeOptions as KubeOptions  # for `up`
from branchyard.runtime.kube.options import index_settings as index_settings
from branchyard.runtime.kube.options import node_label as node_label
from branchyard.runtime.kube.options import toleration as toleration
from branchyard.runtime.local import STOP_GRACE, LocalRuntime
from branchyard.runtime.logs import LOG_MAX
from branchyard.runtime.netns import can_enter
from branchyard.runtime.sandbox import Sandbox, detect
from branchyard.settings import SettingsRepo
from branchyard.shapes import Info
from branchyard.status import StatusConfig, StatusReporter, config_from_env
from branchyard.store import Store
from branchyard.trees import MAX_CHECKOUT
from branchyard.vault import Vault
from branchyard.views import Views
from branchyard.watcher import Watcher

log = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"
DAEMON_FILE = "daemon.json"
SECRET_VARIABLES = ("BRANCHYARD_WEBHOOK_SECRET", "BRANCHYARD_STATUS_TOKEN")
_SECRETS_FD = "BRANCHYARD_SECRETS_FD"


SERVER_CONNECTIONS = 512
"""Most connections the API (and, apart, the git server) holds at once; one more gets a
503 line and is closed at once (the reserve of ``router.limits.RESERVED_FDS`` counts them)."""

_TOO_MANY = (
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain; charset=utf-8\r\n"
    b"Content-Length: 43\r\nConnection: close\r\nRetry-After: 1\r\n\r\n"
    b"too many connections to this server: retry\n"
)


class _ApiProtocol(HttpToolsProtocol):
    """uvicorn's HTTP/1.1 protocol, closing a connection that takes longer than
    :attr:`head_timeout` to send a request head, counted from its connection or its
    previous response, as the router does: a client that trickles a header, or
    connects and says nothing, no longer holds a connection for ever. (uvicorn's own
    keep-alive timeout ends at the first byte of the next request.) A connection over
    :data:`SERVER_CONNECTIONS` is refused as soon as it is accepted."""

    head_timeout = HEAD_TIMEOUT_SECONDS
    _head_timer: asyncio.TimerHandle | None = None

    @classmethod
    def with_timeout(cls, seconds: float) -> type[_ApiProtocol]:
        return type("_ApiProtocol", (cls,), {"head_timeout": seconds})

    def _wait_for_head(self) -> None:
        self._head_read()
        self._head_timer = self.loop.call_later(self.head_timeout, self.transport.close)

    def _head_read(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.server_state.connections) > SERVER_CONNECTIONS:
            transport.write(_TOO_MANY)
            transport.close()
            return
        self._wait_for_head()

    def connection_lost(self, exc: Exception | None) -> None:
        self._head_read()
        super().connection_lost(exc)

    def on_headers_complete(self) -> None:
        self._head_read()
        super().on_headers_complete()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing() and not self.pipeline:
            self._wait_for_head()


REQUEST_GRACE = 5
"""Seconds a stopping daemon lets the API's answers in progress finish before it drops
their connections: one whose client reads nothing (a stalled ``logs -f``) would hold the
stop for ever. A request still busy another grace later is cancelled."""


class _Server(uvicorn.Server):
    """uvicorn, minus its own signal handling: the daemon handles SIGINT and SIGTERM."""

    task: asyncio.Task[None] | None = None

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield

    async def stop(self) -> None:
        self.should_exit = True
        if self.task is None:
            return
        done, _ = await asyncio.wait({self.task}, timeout=REQUEST_GRACE)
        if not done:
            for connection in list(self.server_state.connections):
                connection.transport.abort()  # its answer's sends return: it ends
        await self.task


@dataclass(frozen=True)
class Options:
    home: Path
    router_port: int = 7080
    api_port: int = 0
    api_host: str = LOOPBACK
    poll_interval: float = 5.0
    drain_grace: float = DRAIN_GRACE
    stop_grace: float = STOP_GRACE
    head_timeout: float = HEAD_TIMEOUT_SECONDS
    log_limit: int = LOG_MAX
    sandbox: bool = True
    max_checkout: int = MAX_CHECKOUT
    """Bytes a commit's files may add up to before its checkout is refused."""
    exposed: tuple[int, ...] = ()
    """Host loopback ports every box reaches (``up --expose-host-port``)."""
    kube: KubeOptions = field(default_factory=KubeOptions)
    """How revisions map to Kubernetes objects (``k8s render`` reads them with the
    local runtime too)."""
    git: Address | None = None
    """Serve local repos to pods over git's smart HTTP; its URL becomes ``kube.git_url``."""
    runtime: str = "local"
    """What runs revisions: ``local`` (processes here) or ``kubernetes``."""
    secrets: Mapping[str, str] = field(default_factory=dict)
    """:data:`SECRET_VARIABLES` the daemon was started with (:func:`hide_secrets`)."""
    pass_env: frozenset[str] = frozenset()
    """Variables of the daemon's environment every box gets (``up --pass-env``)."""
    limits: Limits = field(default_factory=Limits)
    """What a box may use where the manifest says nothing (``up --box-*``)."""


def hide_secrets() -> dict[str, str]:
    """Take :data:`SECRET_VARIABLES` out of the environment, and return them.

    ``/proc/PID/environ`` shows the environment a process started with, whatever
    it unsets later, and an unsandboxed child of the same user can read it. So a
    daemon started with any of them executes itself again without them, having
    written them to a pipe; the new image reads them back as values, never into
    ``os.environ``: whatever copies that (git, a box's environment) cannot carry
    them. :class:`Options` hands them to the parts that use them.
    """
    handed = os.environ.pop(_SECRETS_FD, None)
    if handed is not None:
        with os.fdopen(int(handed)) as pipe:
            secrets: dict[str, str] = json.load(pipe)
        return secrets
    secrets = {name: os.environ[name] for name in SECRET_VARIABLES if name in os.environ}
    if not secrets:
        return {}
    read, write = os.pipe()
    with os.fdopen(write, "w") as pipe:
        json.dump(secrets, pipe)
    os.set_inheritable(read, True)
    env = {k: v for k, v in os.environ.items() if k not in secrets}
    env[_SECRETS_FD] = str(read)
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)


def _raise_fd_limit() -> None:
    """The soft ``RLIMIT_NOFILE`` up to the hard one: the router's budget of connections
    is derived from it (``router.caps``)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (OSError, ValueError) as exc:
            log.warning("cannot raise the file descriptor limit from %s to %s: %s", soft, hard, exc)


def _log_budget() -> None:
    budget = process_budget()
    log.info(
        "file descriptors: %s; the router holds at most %s client connections, "
        "%s of them for the main listener",
        resource.getrlimit(resource.RLIMIT_NOFILE)[0],
        budget.clients,
        budget.main,
    )


def _make_private(home: Path) -> None:
    """The home 0700, what is in it 0600 or under a 0700 directory, and so what comes."""
    os.umask(0o077)
    home.chmod(0o700)
    for entry in home.iterdir():
        if not entry.is_symlink():
            entry.chmod(0o700 if entry.is_dir() else 0o600)


def _sandbox(wanted: bool) -> Sandbox | None:
    if not wanted:
        log.warning("no sandbox (--no-sandbox): pushed code runs with the daemon's rights")
        return None
    return detect()


def _networked(sandbox: Sandbox | None, router: Router, exposed: tuple[int, ...]) -> Sandbox | None:
    """The sandbox with a network namespace per box, where this daemon can make one."""
    if sandbox is None:
        return None
    cannot = can_enter()
    if cannot is not None:
        log.warning("boxes share the host's network: a network per box needs root (%s)", cannot)
        return sandbox
    return replace(sandbox, network=BoxNetwork(router, exposed))


def _limited(options: Options, sandbox: Sandbox | None) -> tuple[Cgroups | None, Sandbox | None]:
    """The boxes' cgroups (None on Kubernetes, where each pod is limited instead); and
    the sandbox, without the shared process rlimit where a cgroup
    counts each box's processes."""
    if options.runtime != "local":
        return None, sandbox
    cgroups = Cgroups.detect(str(options.home.resolve()), options.limits)
    if sandbox is not None and "pids" in cgroups.controllers:
        rlimits = tuple(limit for limit in sandbox.rlimits if limit[0] != "nproc")
        sandbox = replace(sandbox, rlimits=rlimits)
    return cgroups, sandbox


@contextlib.contextmanager
def _home_lock(home: Path) -> Iterator[IO[str]]:
    try:
        home.mkdir(parents=True, exist_ok=True)
        handle = (home / "daemon.lock").open("w")
    except OSError as exc:
        raise UsageError(f"cannot use the home {home}: {exc.strerror or exc}") from None
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise UsageError(f"a daemon is already running with home {home}") from None
    try:
        yield handle
    finally:
        handle.close()


def _bind(host: str, port: int) -> socket.socket:
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        sock = socket.socket(family, socket.SOCK_STREAM)
    except OSError as exc:
        raise UsageError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise UsageError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    return sock


def _status_config(secrets: Mapping[str, str]) -> StatusConfig | None:
    try:
        return config_from_env({**os.environ, **secrets})
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def _local_repos(store: Store, sources: Sources) -> Callable[[str], Path | None]:
    """What the git server serves: the git directory of the registered local repo of a
    name, None for any other name (a remote repo's mirror is fetched from its URL)."""

    def locate(name: str) -> Path | None:
        repo = next((r for r in store.repos() if r.name == name), None)
        if repo is None:
            return None
        source = sources(repo.url)
        return source.git_dir if source.local and source.git_dir.is_dir() else None

    return locate


async def _started(app: ASGIApp, sock: socket.socket, head_timeout: float) -> _Server:
    """uvicorn serving ``app`` on ``sock``, once it listens."""
    config = uvicorn.Config(
        app,
        log_level="warning",
        lifespan="off",
        http=_ApiProtocol.with_timeout(head_timeout),
        timeout_graceful_shutdown=2 * REQUEST_GRACE,
    )
    server = _Server(config)
    server.task = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started:
        if server.task.done():
            await server.task
            raise UsageError(f"the server on {_address(sock)} did not start")
        await asyncio.sleep(0.01)
    return server


def _address(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _reachable(host: str) -> str:
    """An address the CLI on this machine can use for a listener bound to ``host``."""
    return LOOPBACK if host in ("0.0.0.0", "::", "") else host


async def serve(options: Options) -> None:
    home = options.home
    with _home_lock(home):
        _make_private(home)
        _raise_fd_limit()
        local = options.runtime == "local"  # on Kubernetes, each pod is boxed instead
        sandbox = _sandbox(options.sandbox) if local else None
        await _serve(options, *_limited(options, sandbox))


async def _seams(
    options: Options,
    sandbox: Sandbox | None,
    cgroups: Cgroups | None,
    store: Store,
    sources: Sources,
    table: RouteTable,
    router: Router,
) -> tuple[Runtime, Traffic]:
    """The runtime and the traffic layer: processes here and the built-in router, or
    a cluster's Deployments and Services (the two share one owner of the Services,
    the runtime's ``switchboard``)."""
    if options.runtime == "kubernetes":
        from branchyard.runtime.kube.runtime import KubeRuntime
        from branchyard.runtime.kube.traffic import KubeTraffic

        kube = await KubeRuntime.connect(
            options.kube,
            store.event,
            lambda: f"http://localhost:{router.main_port}/",
            lambda: {(r.namespace, r.service) for r in store.latest_revisions()},
            sources,
        )
        return kube, KubeTraffic(kube.switchboard)
    runtime = LocalRuntime(
        options.home,
        sources,
        store,
        router,
        options.stop_grace,
        options.log_limit,
        sandbox,
        options.max_checkout,
        Outside(dict(os.environ), options.pass_env),
        cgroups,
    )
    return runtime, LocalTraffic(table, router)


def _engine(
    options: Options, store: Store, sources: Sources, runtime: Runtime, traffic: Traffic
) -> tuple[Engine, Views]:
    """The engine and its parts, connected: the watcher's heads and the store's revision
    changes reach it through the callbacks given here; and the read side over the same
    parts, which the API and the dashboard read through, with the webhook secret of
    repos that have none of their own (``BRANCHYARD_WEBHOOK_SECRET``, read here as the
    status token is)."""
    home = options.home
    vault = Vault(home / "secrets.json")
    clock = Clock()
    rollouts = Rollouts(
        store,
        runtime,
        traffic,
        sources,
        vault.values,
        options.drain_grace,
        options.stop_grace,
        clock.sleep,
    )

    async def on_heads(heads: RepoHeads) -> None:
        await engine.on_heads(heads)

    watcher = Watcher(sources, on_heads, options.poll_interval)
    status = StatusReporter(
        _status_config(options.secrets), on_error=lambda text: store.event("status", text)
    )
    settings = SettingsRepo(home / "settings")
    engine = Engine(
        store, runtime, traffic, rollouts, watcher, sources, settings, vault, status, clock
    )
    store.listen(engine.report)
    return engine, Views(
        engine,
        store,
        runtime,
        rollouts,
        watcher,
        settings,
        partial(_review, options.kube, sources),
        options.secrets.get("BRANCHYARD_WEBHOOK_SECRET", ""),
    )


def _pods(options: Options) -> str | None:
    """What boxes pushed code on Kubernetes (``info``'s sandbox line)."""
    if options.runtime != "kubernetes":
        return None
    return "Kubernetes pods (non-root, no capabilities, Pod Security restricted)"


async def _review(
    options: KubeOptions, sources: Sources, spec: RevisionSpec, peers: Mapping[str, str]
) -> Reviewed:
    """``k8s render``'s YAML and warnings, with an install cache the key its pods' installs
    reuse; the renderer (and lightkube) imported at its first use, not at every daemon's
    start."""
    from branchyard.runtime.kube.installs import InstallKeys
    from branchyard.runtime.kube.review import review

    key = None if options.install_cache is None else await InstallKeys(sources).key(spec)
    return review(options, spec, peers, key)


def _git_socket(options: Options) -> tuple[socket.socket | None, Options]:
    """The git server's socket (None: not asked for), and ``options`` with the URL pods
    fetch local repos from as the Kubernetes options' ``git_url`` (its port known now)."""
    if options.git is None:
        return None, options
    sock = _bind(options.git.host, options.git.port)
    url = options.git.url_at(sock.getsockname()[1])
    return sock, replace(options, kube=replace(options.kube, git_url=url))


async def _serve(options: Options, cgroups: Cgroups | None, sandbox: Sandbox | None) -> None:
    home = options.home
    git_socket, options = _git_socket(options)
    store = Store(home / "state.db")
    sources = Sources(home / "mirrors")
    table = RouteTable()
    router = Router(table)
    sandbox = _networked(sandbox, router, options.exposed)
    runtime, traffic = await _seams(options, sandbox, cgroups, store, sources, table, router)
    engine, views = _engine(options, store, sources, runtime, traffic)
    auth.load_or_create(home)  # made at first start: an API off loopback is never open
    api_socket = _bind(options.api_host, options.api_port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    api: _Server | None = None
    app: FastAPI | None = None
    git_server = GitServer(_local_repos(store, sources))
    git: _Server | None = None
    try:
        try:
            router_port = await router.serve(LOOPBACK, options.router_port)
        except OSError as exc:
            raise UsageError(
                f"cannot listen on {LOOPBACK}:{options.router_port}: {exc.strerror}"
            ) from None
        info: Info = {
            "pid": os.getpid(),
            "home": str(home),
            "router": f"http://{LOOPBACK}:{router_port}",
            "api": f"http://{_reachable(options.api_host)}:{api_socket.getsockname()[1]}",
            "sandbox": sandbox.describe() if sandbox else _pods(options),
            "limits": cgroups.describe() if cgroups else None,
            "git": options.kube.git_url if git_socket is not None else None,
        }
        if cgroups is not None:  # said once the daemon could start, not above its error
            (log.info if cgroups.controllers == set(CONTROLLERS) else log.warning)(
                "limits: %s", cgroups.describe()
            )
        app = create_app(engine, views, info, home)
        dashboard.mount(app, views, home)  # the pages, beside the API on its app
        table.set_home((_reachable(options.api_host), api_socket.getsockname()[1]))
        api = await _started(app, api_socket, options.head_timeout)
        if git_socket is not None:
            git = await _started(git_server.app, git_socket, options.head_timeout)
            log.info(
                "serving local repos read-only over git's smart HTTP on %s; pods fetch %s/NAME",
                _address(git_socket),
                info["git"],
            )
        await engine.start()
        _log_budget()
        # What start-up made lives as long as the daemon: full collections, which took
        # about 25 ms each on the loop the router shares, no longer walk it.
        gc.freeze()
        _write_daemon_file(home, info)
        git_up = f"  git {info['git']}" if info["git"] else ""
        print(f"branchyard is up: router {info['router']}  api {info['api']}{git_up}", flush=True)
        await stop.wait()
        print("branchyard is stopping", flush=True)
    finally:
        if app is not None:
            app.state.stopping.set()
        try:
            (home / DAEMON_FILE).unlink(missing_ok=True)
        except OSError as exc:  # a read-only home: stopping what runs matters more
            log.warning("cannot remove %s: %s", home / DAEMON_FILE, exc.strerror)
        runtime.detach()
        await engine.close()
        git_server.stop()
        for server in (git, api):
            if server is not None:
                await server.stop()
        await runtime.close()
        await sources.close()
        await router.close()
        for sock in (api_socket, git_socket):
            if sock is not None:
                sock.close()
        store.close()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


def _write_daemon_file(home: Path, info: Info) -> None:
    temporary = home / f".{DAEMON_FILE}.tmp"
    temporary.write_text(json.dumps(info))
    temporary.replace(home / DAEMON_FILE)
