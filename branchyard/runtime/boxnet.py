"""What a box's network holds: the addresses the daemon opens inside it, and the way
the router reaches its service.

When a box is set up and before anything of its own runs (see ``processes``), the
daemon opens, on the box's loopback (``netns``):

- each peer address its environment carries (a ``<PEER>_URL`` this runtime handed
  out): the same port as outside, served by the router's peer logic, so a peer
  keeps its stable address and its baseline fallback;
- the egress proxy and the exposed host ports (``egress``);

and, for a box that serves ``$PORT``, tells the router's dialer to reach that port
from inside the box. All of it goes with the box (:meth:`Attached.close`).
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import Awaitable, Callable, Collection, Mapping
from dataclasses import dataclass, field
from functools import partial

from branchyard.router import Router
from branchyard.runtime import egress
from branchyard.runtime.netns import NetworkNamespace

LOOPBACK = "127.0.0.1"
_PEER_URL = re.compile(rf"http://{re.escape(LOOPBACK)}:(\d+)")
Slot = tuple[str, str]


def peer_ports(env: Mapping[str, str], slot_at: Callable[[int], Slot | None]) -> dict[int, Slot]:
    """The peer addresses ``env`` carries: each port of a loopback URL that is a peer's."""
    found: dict[int, Slot] = {}
    for value in env.values():
        match = _PEER_URL.fullmatch(value.rstrip("/"))
        if match:
            port = int(match[1])
            slot = slot_at(port)
            if slot is not None:
                found[port] = slot
    return found


@dataclass
class Attached:
    """One box's side of the network, open until :meth:`close`."""

    namespace: NetworkNamespace
    closers: list[Callable[[], Awaitable[None]]] = field(default_factory=list)

    async def close(self) -> None:
        for close in reversed(self.closers):
            with contextlib.suppress(Exception):
                await close()
        self.closers.clear()
        self.namespace.close()


class BoxNetwork:
    """Opens each box's addresses (:meth:`attach`); one per runtime."""

    variables = egress.VARIABLES

    def __init__(self, router: Router, exposed: Collection[int] = ()) -> None:
        self._router = router
        self._exposed = tuple(exposed)
        self._policy = egress.this_machine()  # its networks as they are at the start

    async def attach(self, pid: int, env: Mapping[str, str]) -> Attached:
        """Open the addresses of the box whose init is ``pid``, which runs with ``env``."""
        attached = Attached(NetworkNamespace.of(pid))
        try:
            await self._open(attached, env)
        except BaseException:
            await asyncio.shield(attached.close())
            raise
        return attached

    async def _open(self, attached: Attached, env: Mapping[str, str]) -> None:
        namespace = attached.namespace
        for port, slot in peer_ports(env, self._router.peer_at).items():
            listener = await self._router.serve_peer_in_box(*slot, namespace.listen(LOOPBACK, port))
            attached.closers.append(listener.close)
        for port in self._exposed:
            forward = await egress.serve_forward(namespace.listen(LOOPBACK, port), port)
            attached.closers.append(partial(egress.close_server, forward))
        proxy = await egress.serve_proxy(
            namespace.listen(LOOPBACK, egress.PROXY_PORT), self._policy
        )
        attached.closers.append(partial(egress.close_server, proxy))
        if "PORT" in env:
            address = (LOOPBACK, int(env["PORT"]))
            make = namespace.new_socket
            self._router.dialer.reach(address, make)

            async def forget() -> None:
                self._router.dialer.forget(address, make)

            attached.closers.append(forget)
