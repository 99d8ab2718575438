"""The traffic seam on this machine: what ``runtime.Traffic`` asks, done by the router.

Routes and weights go into the :class:`~branchyard.router.table.RouteTable`, which
the proxy reads for each request, so they apply at once; a drain is the router's.
This module sits at the top of the package: it imports from it, nothing imports it.
"""

from __future__ import annotations

from collections.abc import Sequence

from branchyard.router.limits import Address
from branchyard.router.server import Router
from branchyard.router.table import RouteTable


class LocalTraffic:
    def __init__(self, table: RouteTable, router: Router) -> None:
        self._table = table
        self._router = router

    def route(self, namespace: str, service: str, weights: Sequence[tuple[Address, int]]) -> None:
        if len(weights) == 1:
            self._table.set_backend(namespace, service, weights[0][0])
        else:
            self._table.set_weights(namespace, service, weights)

    def down(self, namespace: str, service: str, why: str = "") -> None:
        self._table.set_backend(namespace, service, None, why)

    def remove(self, namespace: str, service: str) -> None:
        self._table.remove(namespace, service)

    def cannot_split(self) -> str:
        return ""  # the route table splits by weight per request

    async def drain(self, backend: Address, grace: float) -> None:
        await self._router.drain(backend, grace)
