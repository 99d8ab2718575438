"""The egress proxy: which addresses a box may leave for (pure), what a request asks for
(pure), and the proxy itself on loopback, tunnelling and forwarding to a local server
that a test policy allows (the real policy allows no address of this machine)."""

from __future__ import annotations

import asyncio
import ipaddress
import socket

import pytest

from branchyard.runtime.egress import (
    Policy,
    forwarded_head,
    parse_routes,
    refusal,
    serve_proxy,
    target_of,
    this_machine,
)


@pytest.mark.parametrize(
    ("address", "why"),
    [
        ("127.0.0.1", "a loopback address"),
        ("127.9.9.9", "a loopback address"),
        ("::1", "a loopback address"),
        ("::ffff:127.0.0.1", "a loopback address"),
        ("10.0.0.5", "a private address"),
        ("172.16.3.4", "a private address"),
        ("192.168.1.1", "a private address"),
        ("100.64.0.1", "a private address"),  # carrier-grade NAT
        ("fd00::2", "a private address"),
        ("0.0.0.0", "a private address"),
        ("169.254.169.254", "a link-local address"),  # a cloud's metadata service
        ("fe80::1", "a link-local address"),
        ("224.0.0.1", "a multicast address"),
        ("192.0.2.1", None),  # a documentation range: some sites' mirrors answer there
        ("203.0.113.80", None),
        ("151.101.0.223", None),  # pypi.org
        ("2a04:4e42::223", None),
    ],
)
def test_a_box_leaves_only_for_the_internet_beyond_this_machine(
    address: str, why: str | None
) -> None:
    assert refusal(ipaddress.ip_address(address)) == why


NEARBY = (ipaddress.ip_network("192.0.2.0/24"), ipaddress.ip_network("fd00::/64"))


@pytest.mark.parametrize(
    ("address", "why"),
    [
        ("192.0.2.2", "on this machine's own network"),
        ("192.0.2.77", "on this machine's own network"),
        ("::ffff:192.0.2.1", "on this machine's own network"),
        ("fd00::2", "on this machine's own network"),
        ("192.0.3.1", None),
        ("203.0.113.80", None),
    ],
)
def test_nor_for_the_networks_this_machine_is_on(address: str, why: str | None) -> None:
    assert refusal(ipaddress.ip_address(address), NEARBY) == why


ROUTES = """\
Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT
eth0\t00000000\t010200C0\t0003\t0\t0\t0\t00000000\t0\t0\t0
eth0\t000200C0\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0
"""
IPV6_ROUTES = (
    "fd000000000000000000000000000000 40 00000000000000000000000000000000 00 "
    "00000000000000000000000000000000 00000100 00000001 00000000 00000001     eth0\n"
    "00000000000000000000000000000000 00 00000000000000000000000000000000 00 "
    "fd000000000000000000000000000001 00000400 00000003 00000000 00000003     eth0\n"
    "00000000000000000000000000000001 80 00000000000000000000000000000000 00 "
    "00000000000000000000000000000000 00000000 00000004 00000000 80200001       lo\n"
)


def test_this_machines_networks_are_its_routes_without_a_gateway() -> None:
    assert parse_routes(ROUTES, IPV6_ROUTES) == (
        ipaddress.ip_network("192.0.2.0/24"),
        ipaddress.ip_network("fd00::/64"),
        ipaddress.ip_network("::1/128"),
    )


def test_this_machines_policy_refuses_its_own_addresses() -> None:
    policy = this_machine()
    assert policy(ipaddress.ip_address("127.0.0.1")) == "a loopback address"
    own = ipaddress.ip_address(socket.gethostbyname(socket.gethostname()))
    assert policy(own) is not None


@pytest.mark.parametrize(
    ("head", "target"),
    [
        (b"CONNECT pypi.org:443 HTTP/1.1\r\n\r\n", ("pypi.org", 443, True)),
        (b"CONNECT [2a04:4e42::223]:443 HTTP/1.1\r\n\r\n", ("2a04:4e42::223", 443, True)),
        (b"GET http://example.org/x?y HTTP/1.1\r\n\r\n", ("example.org", 80, False)),
        (b"GET http://example.org:8080/ HTTP/1.1\r\n\r\n", ("example.org", 8080, False)),
        (b"CONNECT pypi.org HTTP/1.1\r\n\r\n", "not host:port: pypi.org"),
        (b"GET /x HTTP/1.1\r\n\r\n", "only http:// URLs and CONNECT go through the proxy, not /x"),
        (
            b"GET ftp://x/ HTTP/1.1\r\n\r\n",
            "only http:// URLs and CONNECT go through the proxy, not ftp://x/",
        ),
        (b"GET http://x:99999/ HTTP/1.1\r\n\r\n", "a bad port in http://x:99999/"),
        (b"nonsense\r\n\r\n", "not an HTTP request line"),
    ],
)
def test_a_proxy_request_names_its_target(head: bytes, target: tuple[str, int, bool] | str) -> None:
    assert target_of(head) == target


def test_a_forwarded_request_is_the_only_one_on_its_connection_and_carries_no_proxy_headers() -> (
    None
):
    head = (
        b"GET http://example.org/ HTTP/1.1\r\nHost: example.org\r\nProxy-Authorization: x\r\n"
        b"Connection: keep-alive\r\nAccept: */*\r\n\r\n"
    )
    assert forwarded_head(head) == (
        b"GET http://example.org/ HTTP/1.1\r\nHost: example.org\r\nAccept: */*\r\n"
        b"Connection: close\r\n\r\n"
    )


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """A loopback origin that answers a request with its head."""
    head = await reader.readuntil(b"\r\n\r\n")
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(head) + head)
    await writer.drain()
    writer.close()


def _through(request: bytes, loopback_allowed: bool) -> bytes:
    """What a client gets from the proxy for ``request`` (``%d``: the origin's port)."""

    async def scenario() -> bytes:
        origin = await asyncio.start_server(_echo, "127.0.0.1", 0)
        listening = socket.socket()
        listening.bind(("127.0.0.1", 0))
        listening.listen()
        listening.setblocking(False)
        policy: Policy = (lambda _: None) if loopback_allowed else refusal
        proxy = await serve_proxy(listening, policy)
        try:
            reader, writer = await asyncio.open_connection(*listening.getsockname())
            writer.write(request % origin.sockets[0].getsockname()[1])
            answer = await reader.read()
            writer.close()
            return answer
        finally:
            proxy.close()
            origin.close()

    return asyncio.run(scenario())


def test_the_proxy_tunnels_a_connect_to_what_its_policy_allows() -> None:
    answer = _through(
        b"CONNECT 127.0.0.1:%d HTTP/1.1\r\n\r\nGET /in HTTP/1.1\r\nHost: o\r\n\r\n", True
    )
    assert answer.startswith(b"HTTP/1.1 200 Connection established\r\n\r\nHTTP/1.1 200 OK")
    assert answer.endswith(b"GET /in HTTP/1.1\r\nHost: o\r\n\r\n")


def test_the_proxy_forwards_a_plain_request_with_connection_close() -> None:
    answer = _through(b"GET http://127.0.0.1:%d/x HTTP/1.1\r\nHost: o\r\n\r\n", True)
    assert answer.startswith(b"HTTP/1.1 200 OK")
    assert answer.endswith(b"Host: o\r\nConnection: close\r\n\r\n")


def test_the_proxy_refuses_this_machine_in_one_line() -> None:
    answer = _through(b"CONNECT localhost:%d HTTP/1.1\r\n\r\n", False)
    assert answer.startswith(b"HTTP/1.1 403 Forbidden")
    assert answer.endswith(b": a box reaches only the internet beyond this machine\n")
    assert answer.count(b"\n", answer.index(b"\r\n\r\n") + 4) == 1
