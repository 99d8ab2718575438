"""How many client connections the router holds, so that a flood leaves the rest served.

Every client connection costs a file descriptor, and one more while it has a backend
connection. A box that opened thousands of idle connections once took every descriptor
of the daemon, and with them the API and the router of every namespace. So the router
takes at most a budget derived from ``RLIMIT_NOFILE`` (:func:`budget_for`), which always
leaves :data:`~branchyard.router.limits.RESERVED_FDS` to the rest of the daemon, and
shares it out: the main listener has a share of its own, the peer listeners share the
rest, each of them takes at most
:data:`~branchyard.router.limits.PEER_LISTENER_CONNECTIONS`, and one source address
(not loopback, which is every local client at once) at most
:data:`~branchyard.router.limits.CLIENT_CONNECTIONS`. A connection over any cap is
refused at once, never held.
"""

from __future__ import annotations

import ipaddress
import resource
from collections import Counter
from dataclasses import dataclass

from branchyard.router import limits
from branchyard.router.limits import MAIN_LISTENER_CONNECTIONS, MIN_ROUTER_FDS, RESERVED_FDS


@dataclass(frozen=True)
class Budget:
    """Client connections the router may hold: in all, and of them the main listener's."""

    clients: int
    main: int

    @property
    def peers(self) -> int:
        """What the peer listeners share."""
        return self.clients - self.main


def budget_for(nofile: int) -> Budget:
    """The budget under a file descriptor limit of ``nofile``: what is left after the
    reserve, halved (a client connection may hold a backend connection)."""
    router_fds = max(nofile - max(RESERVED_FDS, nofile // 4), MIN_ROUTER_FDS)
    clients = router_fds // 2
    return Budget(clients, min(MAIN_LISTENER_CONNECTIONS, clients // 2))


def process_budget() -> Budget:
    """The budget under this process's soft ``RLIMIT_NOFILE``."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return budget_for(hard if soft == resource.RLIM_INFINITY else soft)


def _is_loopback(address: str) -> bool:
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


class Admission:
    """Counts the client connections held, by listener kind and by source address, and
    says why one more would be refused (the per-listener and per-source caps are read as
    ``limits.NAME``, so tests can lower them)."""

    def __init__(self, budget: Budget) -> None:
        self.budget = budget
        self.main = 0
        self.peers = 0
        self.by_source: Counter[str] = Counter()

    def refusal(self, main: bool, held: int, source: str) -> str | None:
        """Why a connection from ``source`` to a listener holding ``held`` is refused, or
        None to admit it (then :meth:`admit`)."""
        if main and self.main >= self.budget.main:
            return f"the router holds {self.main} connections, its most"
        if not main and held >= limits.PEER_LISTENER_CONNECTIONS:
            return f"this peer listener holds {held} connections, its most"
        if not main and self.peers >= self.budget.peers:
            return f"the peer listeners hold {self.peers} connections, their most"
        if not _is_loopback(source) and self.by_source[source] >= limits.CLIENT_CONNECTIONS:
            return f"{source} holds {self.by_source[source]} connections, its most"
        return None

    def admit(self, main: bool, source: str) -> None:
        if main:
            self.main += 1
        else:
            self.peers += 1
        self.by_source[source] += 1

    def release(self, main: bool, source: str) -> None:
        if main:
            self.main -= 1
        else:
            self.peers -= 1
        left = self.by_source[source] - 1
        if left:
            self.by_source[source] = left
        else:
            del self.by_source[source]
