"""The ways out of a box's network namespace: an HTTP proxy to the outside world, and
the host's loopback ports an operator exposed to every box.

A box has no route anywhere (see ``netns``). What it may reach beyond its peers goes
through the daemon, which decides:

- **the proxy** (:data:`PROXY_PORT` on the box's loopback, in ``HTTP_PROXY`` and
  ``HTTPS_PROXY``): ``CONNECT host:port`` for HTTPS and absolute ``http://`` requests
  for plain HTTP, to addresses beyond this machine and its networks only
  (:func:`refusal`): never this machine's own addresses and networks, private
  networks, link-local or multicast addresses, so not the API, the dashboard, the
  git server, other boxes or a cloud's metadata service. Installs reach a package
  index through it; services their outside APIs.
- **exposed ports** (``up --expose-host-port PORT``): a host loopback port that
  every box reaches at the same address, for a package index served on this
  machine (``devpi``, a wheel directory), forwarded byte for byte.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import socket
from collections.abc import Callable
from functools import partial
from pathlib import Path
from urllib.parse import urlsplit

LOOPBACK = "127.0.0.1"
PROXY_PORT = 3128  # on each box's own loopback; services get ports from 10000 up
PROXY_URL = f"http://{LOOPBACK}:{PROXY_PORT}"
VARIABLES = {
    **{name: PROXY_URL for name in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy")},
    **{name: f"localhost,{LOOPBACK},::1" for name in ("NO_PROXY", "no_proxy")},
}
"""What a box's environment says about its way out (its peers are on its loopback)."""
HEAD_LIMIT = 16 * 1024
HEAD_TIMEOUT = 10.0
CONNECT_TIMEOUT = 10.0
_DROPPED = frozenset({b"connection", b"keep-alive", b"proxy-connection", b"proxy-authorization"})
log = logging.getLogger(__name__)

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Stream = tuple[asyncio.StreamReader, asyncio.StreamWriter]
Policy = Callable[[Address], "str | None"]


Network = ipaddress.IPv4Network | ipaddress.IPv6Network
PRIVATE = tuple(
    ipaddress.ip_network(n)
    for n in (
        *("0.0.0.0/8", "10.0.0.0/8", "100.64.0.0/10", "172.16.0.0/12", "192.168.0.0/16"),
        *("fc00::/7", "::/128"),
    )
)
"""Networks that are someone's own: RFC 1918, carrier-grade NAT, unique local, unspecified."""


def refusal(address: Address, nearby: tuple[Network, ...] = ()) -> str | None:
    """Why the proxy does not connect to ``address``, or None. It refuses this machine
    (loopback, and ``nearby``: the networks its interfaces are on), private networks,
    link-local (a cloud's metadata service) and multicast addresses. Documentation
    ranges are not refused: some sites' package mirrors answer there."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return refusal(address.ipv4_mapped, nearby)
    if address.is_loopback:
        return "a loopback address"
    if address.is_link_local:
        return "a link-local address"
    if address.is_multicast:
        return "a multicast address"
    if any(address in network for network in nearby):
        return "on this machine's own network"
    if any(address in network for network in PRIVATE):
        return "a private address"
    return None


def parse_routes(ipv4: str, ipv6: str) -> tuple[Network, ...]:
    """The networks reached without a gateway (this machine's own) in ``/proc/net/route``
    and ``/proc/net/ipv6_route``, but the default route."""
    found: list[Network] = []
    for line in ipv4.splitlines()[1:]:
        fields = line.split()
        if len(fields) >= 8 and int(fields[2], 16) == 0 and int(fields[7], 16) != 0:
            four = ipaddress.IPv4Address(int(fields[1], 16).to_bytes(4, "little"))
            mask = bin(int(fields[7], 16)).count("1")
            found.append(ipaddress.IPv4Network((four, mask), strict=False))
    for line in ipv6.splitlines():
        fields = line.split()
        if len(fields) >= 5 and int(fields[4], 16) == 0 and int(fields[1], 16) != 0:
            six = ipaddress.IPv6Address(bytes.fromhex(fields[0]))
            found.append(ipaddress.IPv6Network((six, int(fields[1], 16)), strict=False))
    return tuple(found)


def this_machine() -> Policy:
    """The proxy's policy on this machine: :func:`refusal` with its own networks, and
    any address one of its interfaces has (it can be bound here)."""
    try:
        nearby = parse_routes(
            Path("/proc/net/route").read_text(), Path("/proc/net/ipv6_route").read_text()
        )
    except OSError:
        nearby = ()

    def policy(address: Address) -> str | None:
        return refusal(address, nearby) or ("this machine" if _local(address) else None)

    return policy


def _local(address: Address) -> bool:
    family = socket.AF_INET6 if address.version == 6 else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        try:
            probe.bind((str(address), 0))
        except OSError:
            return False
    return True


def target_of(head: bytes) -> tuple[str, int, bool] | str:
    """(host, port, tunnel) a proxy request asks for, or why it cannot be served."""
    first = head.split(b"\r\n", 1)[0].decode("latin-1").split()
    if len(first) != 3:
        return "not an HTTP request line"
    method, target, _ = first
    if method == "CONNECT":
        host, _, port = target.rpartition(":")
        host = host.strip("[]")
        if not host or not port.isdigit():
            return f"not host:port: {target}"
        return host, int(port), True
    url = urlsplit(target)
    if url.scheme != "http" or not url.hostname:
        return f"only http:// URLs and CONNECT go through the proxy, not {target[:80]}"
    try:
        return url.hostname, url.port or 80, False
    except ValueError:
        return f"a bad port in {target[:80]}"


def forwarded_head(head: bytes) -> bytes:
    """A plain HTTP request's head as the origin gets it: one request per connection."""
    lines = head.split(b"\r\n")
    kept = [lines[0]]
    for line in lines[1:]:
        if line and line.split(b":", 1)[0].strip().lower() not in _DROPPED:
            kept.append(line)
    return b"\r\n".join([*kept, b"Connection: close", b"", b""])


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while chunk := await reader.read(65536):
            writer.write(chunk)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
    except OSError:
        writer.close()


async def _splice(a: Stream, b: Stream) -> None:
    try:
        await asyncio.gather(_pipe(a[0], b[1]), _pipe(b[0], a[1]))
    finally:
        for writer in (a[1], b[1]):
            writer.close()


def _answer(writer: asyncio.StreamWriter, status: str, line: str) -> None:
    body = f"{line}\n".encode()
    writer.write(
        f"HTTP/1.1 {status}\r\nContent-Type: text/plain\r\nContent-Length: {len(body)}\r\n"
        "Connection: close\r\n\r\n".encode()
        + body
    )


async def _connect_allowed(host: str, port: int, policy: Policy) -> Stream:
    """A connection to the first address of ``host`` the policy allows;
    ConnectionRefusedError saying why where there is none."""
    loop = asyncio.get_running_loop()
    found = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    why = f"{host} has no address"
    for _, _, _, _, sockaddr in found:
        address = ipaddress.ip_address(sockaddr[0])
        reason = policy(address)
        if reason is None:
            async with asyncio.timeout(CONNECT_TIMEOUT):
                return await asyncio.open_connection(str(address), port)
        why = f"{host} is {reason} ({address}): a box reaches only the internet beyond this machine"
    raise ConnectionRefusedError(why)


async def _proxy(
    policy: Policy, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    try:
        async with asyncio.timeout(HEAD_TIMEOUT):
            head = await reader.readuntil(b"\r\n\r\n")
    except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, OSError):
        writer.close()
        return
    target = target_of(head)
    if isinstance(target, str):
        _answer(writer, "400 Bad Request", target)
        writer.close()
        return
    host, port, tunnel = target
    try:
        upstream = await _connect_allowed(host, port, policy)
    except ConnectionRefusedError as exc:
        _answer(writer, "403 Forbidden", str(exc))
        writer.close()
        return
    except (OSError, TimeoutError) as exc:
        _answer(writer, "502 Bad Gateway", f"cannot reach {host}:{port}: {exc}")
        writer.close()
        return
    if tunnel:
        writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
    else:
        upstream[1].write(forwarded_head(head))
    await _splice((reader, writer), upstream)


async def _forward(port: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        upstream = await asyncio.open_connection(LOOPBACK, port)
    except OSError:
        writer.close()
        return
    await _splice((reader, writer), upstream)


async def serve_proxy(sock: socket.socket, policy: Policy) -> asyncio.Server:
    """Serve the proxy on ``sock`` (listening inside a box), to what ``policy`` allows."""
    return await asyncio.start_server(partial(_proxy, policy), sock=sock, limit=HEAD_LIMIT)


async def serve_forward(sock: socket.socket, port: int) -> asyncio.Server:
    """Forward what connects to ``sock`` (inside a box) to ``port`` on the host's loopback."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _forward(port, reader, writer)

    return await asyncio.start_server(handle, sock=sock)


async def close_server(server: asyncio.Server) -> None:
    server.close()
    with contextlib.suppress(Exception):
        await server.wait_closed()
