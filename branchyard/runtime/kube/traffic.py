"""The traffic seam on Kubernetes: what ``runtime.Traffic`` asks, done by Services.

``route`` points the Service ``SERVICE`` at a revision (and with weights, at a Service
per revision through an HTTPRoute, where the cluster serves the Gateway API; else
``cannot_split`` says so, and ``weight`` is refused before anything starts). The
engine routes a revision only once its start returned, that is once its Deployment
is Available. Everything is
applied by the :class:`~branchyard.runtime.kube.services.Switchboard` it shares with
the runtime's peers, in the background and in order; ``drain`` waits for it.

``down`` changes nothing: a Service sends only to Ready pods, so a revision that is
not ready takes no request already, and the reason is the local router's page's
alone. A drain has nothing more to wait for: a pod that is scaled away gets its
termination grace from the kubelet.
"""

from __future__ import annotations

from collections.abc import Sequence

from branchyard.runtime import Address
from branchyard.runtime.kube.services import Switchboard


class KubeTraffic:
    def __init__(self, switchboard: Switchboard) -> None:
        self._switchboard = switchboard

    def route(self, namespace: str, service: str, weights: Sequence[tuple[Address, int]]) -> None:
        self._switchboard.route((namespace, service), weights)

    def down(self, namespace: str, service: str, why: str = "") -> None:
        return None

    def remove(self, namespace: str, service: str) -> None:
        self._switchboard.remove((namespace, service))

    def cannot_split(self) -> str:
        return self._switchboard.cannot_split()

    async def drain(self, backend: Address, grace: float) -> None:
        await self._switchboard.settled()
