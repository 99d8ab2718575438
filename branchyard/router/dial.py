"""How the router (and a health check) connects to a backend.

A backend is an address. Most are reached by a plain TCP connection from here; a
service in a box with a network namespace of its own listens on that box's
loopback, which only a socket made inside the namespace reaches. The runtime
registers such an address with the function that makes those sockets
(:meth:`Dialer.reach`), and every connection to it starts from one.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable
from typing import TypeVar

from branchyard.router.limits import Address

MakeSocket = Callable[[], socket.socket]
P = TypeVar("P", bound=asyncio.BaseProtocol)


class Dialer:
    def __init__(self) -> None:
        self._makers: dict[Address, MakeSocket] = {}

    def reach(self, address: Address, make: MakeSocket) -> None:
        """Connect to ``address`` from sockets ``make`` returns from now on."""
        self._makers[address] = make

    def forget(self, address: Address, make: MakeSocket) -> None:
        """Stop using ``make`` for ``address`` (if a newer one replaced it, keep that)."""
        if self._makers.get(address) is make:
            del self._makers[address]

    async def connect(
        self, factory: Callable[[], P], address: Address
    ) -> tuple[asyncio.Transport, P]:
        """A connection to ``address`` with the protocol ``factory`` makes."""
        loop = asyncio.get_running_loop()
        make = self._makers.get(address)
        if make is None:
            host, port = address
            return await loop.create_connection(factory, host, port)
        sock = make()
        try:
            await loop.sock_connect(sock, address)
        except BaseException:
            sock.close()
            raise
        return await loop.create_connection(factory, sock=sock)

    async def open_connection(
        self, address: Address
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """:func:`asyncio.open_connection` to ``address``, as :meth:`connect` reaches it."""
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(loop=loop)
        transport, protocol = await self.connect(
            lambda: asyncio.StreamReaderProtocol(reader, loop=loop), address
        )
        return reader, asyncio.StreamWriter(transport, protocol, reader, loop)
