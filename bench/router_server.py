"""branchyard's router alone, in its own process, with one route: for the router benchmark.

    python -m bench.router_server BACKEND_PORT [--namespace main] [--service svc]

Serves ``branchyard.router.Router`` on a free loopback port with a
``RouteTable`` whose only entry sends ``svc.main.localhost`` to
``127.0.0.1:BACKEND_PORT``, on the event loop the daemon uses (uvloop). Prints
``listening PORT`` once it accepts, and runs until SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import signal

import uvloop

from branchyard.router import Router, RouteTable


async def serve(backend_port: int, namespace: str, service: str) -> None:
    table = RouteTable()
    table.set_backend(namespace, service, ("127.0.0.1", backend_port))
    router = Router(table)
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
    args = parser.parse_args()
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(serve(args.backend_port, args.namespace, args.service))


if __name__ == "__main__":
    main()
