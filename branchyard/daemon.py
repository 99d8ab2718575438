"""``branchyard up``: wires the store, watcher, engine, runtime, router and API together.

Everything runs on one asyncio loop in one process. The daemon writes
``daemon.json`` in the home (its pid and addresses) for the CLI to find it, and
holds ``daemon.lock`` so that two daemons never share a home. SIGINT or
SIGTERM stops every service process and closes every port before it exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import logging
import os
import signal
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import uvicorn

from branchyard.api import create_app
from branchyard.engine import Engine
from branchyard.errors import UsageError
from branchyard.git import Sources
from branchyard.router import Router, RouteTable
from branchyard.runtime.local import LocalRuntime
from branchyard.settings import SettingsRepo
from branchyard.store import Store

log = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"
DAEMON_FILE = "daemon.json"


class _ApiServer(uvicorn.Server):
    """uvicorn, minus its own signal handling: the daemon handles SIGINT and SIGTERM."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


@dataclass(frozen=True)
class Options:
    home: Path
    router_port: int = 7080
    api_port: int = 0
    poll_interval: float = 5.0


@contextlib.contextmanager
def _home_lock(home: Path) -> Iterator[IO[str]]:
    handle = (home / "daemon.lock").open("w")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise UsageError(f"a daemon is already running with home {home}") from None
    try:
        yield handle
    finally:
        handle.close()


def _bind(port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((LOOPBACK, port))
    except OSError as exc:
        sock.close()
        raise UsageError(f"cannot listen on {LOOPBACK}:{port}: {exc.strerror}") from None
    return sock


async def serve(options: Options) -> None:
    home = options.home
    home.mkdir(parents=True, exist_ok=True)
    with _home_lock(home):
        await _serve(options)


async def _serve(options: Options) -> None:
    home = options.home
    store = Store(home / "state.db")
    sources = Sources(home / "mirrors")
    table = RouteTable()
    router = Router(table)
    engine = Engine(
        store,
        LocalRuntime(home, sources),
        router,
        table,
        sources,
        SettingsRepo(home / "settings"),
        options.poll_interval,
    )
    api_socket = _bind(options.api_port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    api_task: asyncio.Task[None] | None = None
    server: _ApiServer | None = None
    try:
        try:
            router_port = await router.serve(LOOPBACK, options.router_port)
        except OSError as exc:
            raise UsageError(
                f"cannot listen on {LOOPBACK}:{options.router_port}: {exc.strerror}"
            ) from None
        info = {
            "pid": os.getpid(),
            "home": str(home),
            "router": f"http://{LOOPBACK}:{router_port}",
            "api": f"http://{LOOPBACK}:{api_socket.getsockname()[1]}",
        }
        config = uvicorn.Config(create_app(engine, info), log_level="warning", lifespan="off")
        server = _ApiServer(config)
        api_task = asyncio.create_task(server.serve(sockets=[api_socket]))
        while not server.started:
            if api_task.done():
                await api_task
                raise UsageError("the API server did not start")
            await asyncio.sleep(0.01)
        await engine.start()
        _write_daemon_file(home, info)
        print(f"branchyard is up: router {info['router']}  api {info['api']}", flush=True)
        await stop.wait()
        print("branchyard is stopping", flush=True)
    finally:
        (home / DAEMON_FILE).unlink(missing_ok=True)
        await engine.close()
        if server is not None and api_task is not None:
            server.should_exit = True
            await api_task
        await router.close()
        api_socket.close()
        store.close()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


def _write_daemon_file(home: Path, info: dict[str, object]) -> None:
    temporary = home / f".{DAEMON_FILE}.tmp"
    temporary.write_text(json.dumps(info))
    temporary.replace(home / DAEMON_FILE)
