"""branchyard's router alone, in its own process, with one route: for the router benchmark.

    python -m bench.router_server BACKEND_PORT [--namespace main] [--service svc] [--box PID]

Serves ``branchyard.router.Router`` on a free loopback port with a
``RouteTable`` whose only entry sends ``svc.main.localhost`` to
``127.0.0.1:BACKEND_PORT``, on the event loop the daemon uses (uvloop). Prints
``listening PORT`` once it accepts, and runs until SIGTERM or SIGINT. With ``--box``,
the backend listens inside the network namespace of the process PID (a box), and
the router reaches it from sockets made there, as the daemon's does.
"""

from __future__ import annotations

import argparse
import asyncio
import signal

import uvloop

from branchyard.router import Router, RouteTable
from branchyard.runtime.netns import NetworkNamespace


async def serve(backend_port: int, namespace: str, service: str, box: int | None) -> None:
    table = RouteTable()
    backend = ("127.0.0.1", backend_port)
    table.set_backend(namespace, service, backend)
    router = Router(table)
    if box is not None:
        router.dialer.reach(backend, NetworkNamespace.of(box).new_socket)
    port = await router.serve("127.0.0.1", 0)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    print(f"listening {port}", flush=True)
    try:
        await stop.wait()
    finally:
        await router.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("backend_port", type=int)
    parser.add_argument("--namespace", default="main")
    parser.add_argument("--service", default="svc")
    parser.add_argument("--box", type=int, help="the backend is in this process's network")
    args = parser.parse_args()
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(serve(args.backend_port, args.namespace, args.service, args.box))


if __name__ == "__main__":
    main()
