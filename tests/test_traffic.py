"""The local traffic layer: what the ``runtime.Traffic`` calls leave in the route table.

Pure in-memory state (no listener is opened): each call is checked by how the table
then resolves the service, as the proxy does for each request.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from branchyard.router import LocalTraffic, Router, RouteTable

A = ("127.0.0.1", 40001)
B = ("127.0.0.1", 40002)

Call = Callable[[LocalTraffic], None]


def traffic() -> tuple[LocalTraffic, RouteTable]:
    table = RouteTable()
    return LocalTraffic(table, Router(table)), table


@pytest.mark.parametrize(
    ("calls", "resolves", "down_because"),
    [
        ([lambda t: t.route("main", "app", [(A, 100)])], {A}, ""),
        ([lambda t: t.route("main", "app", [(A, 90), (B, 10)])], {A, B}, ""),
        ([lambda t: t.route("main", "app", [(A, 0), (B, 100)])], {B}, ""),
        ([lambda t: t.down("main", "app")], {None}, ""),
        (
            [lambda t: t.route("main", "app", [(A, 100)]), lambda t: t.down("main", "app", "why")],
            {None},
            "why",
        ),
        (
            [lambda t: t.down("main", "app", "why"), lambda t: t.route("main", "app", [(A, 1)])],
            {A},
            "",
        ),
    ],
    ids=[
        "one backend",
        "weights",
        "a weight of 0 takes nothing",
        "down",
        "down with a reason",
        "routed again",
    ],
)
def test_routes_and_downs_leave_what_the_proxy_resolves(
    calls: list[Call], resolves: set[object], down_because: str
) -> None:
    layer, table = traffic()
    for call in calls:
        call(layer)
    seen = {table.resolve("main", "app") for _ in range(400)}
    assert seen == resolves
    assert table.down_because("main", "app") == down_because
    assert table.resolve_host("app.main.localhost") == ("main", "app")


def test_a_removed_service_is_no_longer_one_the_router_knows() -> None:
    layer, table = traffic()
    layer.route("main", "app", [(A, 100)])
    layer.route("main", "web", [(B, 100)])
    layer.remove("main", "app")
    assert table.resolve_host("app.main.localhost") is None
    assert table.resolve("main", "app") is None
    assert table.resolve_host("web.main.localhost") == ("main", "web")


@pytest.mark.parametrize(
    "before",
    [
        [],
        [lambda t: t.route("main", "app", [(A, 100)]), lambda t: t.route("main", "app", [(B, 1)])],
    ],
    ids=["never routed", "routed, then routed away"],
)
def test_draining_a_backend_nothing_is_connected_to_returns_at_once(before: list[Call]) -> None:
    layer, _ = traffic()
    for call in before:
        call(layer)
    drain = layer.drain(A, grace=3600)
    with pytest.raises(StopIteration):  # done at its first step: it waits for nothing
        drain.send(None)
