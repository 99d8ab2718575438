"""The route table: which backend serves each (namespace, service), weights included.

Plain in-memory state, no I/O; the engine writes it, the proxy reads it per request.
"""

from __future__ import annotations

import bisect
import itertools
import random
from collections.abc import Sequence

from branchyard.naming import dns_label
from branchyard.router.limits import BASELINE, Address, _Key

_HOST_CACHE_SIZE = 1024


def _split_host(host: str) -> tuple[str, str | None]:
    """Split a Host header value into (lowercase name, port or None)."""
    host = host.strip()
    if host.startswith("["):  # an IPv6 literal, "[::1]:8080"
        end = host.find("]")
        if end < 0:
            return host.lower(), None
        name, rest = host[1:end], host[end + 1 :]
        port = rest[1:] if rest.startswith(":") else None
    else:
        name, _, port = host.partition(":")
    if port is not None and not port.isdigit():
        port = None
    return name.rstrip(".").lower(), port


# -- the route table ---------------------------------------------------------------


class _Weighted:
    """Several backends with weights; :meth:`pick` chooses one afresh for each request."""

    __slots__ = ("backends", "cumulative", "top")

    def __init__(self, weights: Sequence[tuple[Address, int]]) -> None:
        positive = [(backend, weight) for backend, weight in weights if weight > 0]
        self.backends = tuple(backend for backend, _ in positive)
        self.cumulative = tuple(itertools.accumulate(weight for _, weight in positive))
        # The highest weight (the first of equals), shown by RouteTable.entries().
        self.top = max(positive, key=lambda pair: pair[1])[0] if positive else None

    def pick(self) -> Address | None:
        backends = self.backends
        if len(backends) <= 1:
            return backends[0] if backends else None
        cumulative = self.cumulative
        return backends[bisect.bisect(cumulative, random.random() * cumulative[-1])]


class RouteTable:
    """Which backend serves each (namespace, service). Pure in-memory state, no I/O.

    An entry is one backend, or several with weights (a canary), or ``None``: the
    service exists in the namespace but nothing serves it (no live revision yet, or
    one that crashed or is restarting, which :meth:`down_because` tells); the router
    answers 503 for it rather than 404. Weights are applied per request: :meth:`resolve` makes
    a weighted random choice on every call.
    """

    def __init__(self) -> None:
        self._backends: dict[_Key, Address | _Weighted | None] = {}
        self._down: dict[_Key, str] = {}  # why an entry with no backend has none
        self._host_keys: dict[_Key, _Key] = {}  # entry -> (DNS namespace, DNS service)
        self._by_host: dict[_Key, _Key] = {}  # (DNS namespace, DNS service) -> entry
        self._host_cache: dict[bytes, _Key | None] = {}  # Host header bytes -> entry
        self.home: Address | None = None  # what serves the router's own address

    def set_home(self, backend: Address | None) -> None:
        """Send requests for the router's own address (``localhost:PORT``) to ``backend``
        (the dashboard); without one they get the 404 listing page."""
        self.home = backend

    def set_backend(
        self, namespace: str, service: str, backend: Address | None, why: str = ""
    ) -> None:
        """Route (namespace, service) to ``backend``; ``None`` means "nothing serves",
        and ``why`` says why if there is more to say than "no live revision yet"."""
        self._set((namespace, service), backend)
        if backend is None and why:
            self._down[(namespace, service)] = why

    def down_because(self, namespace: str, service: str) -> str:
        """Why nothing serves (namespace, service), or "" if nothing was said."""
        return self._down.get((namespace, service), "")

    def set_weights(
        self, namespace: str, service: str, weights: Sequence[tuple[Address, int]]
    ) -> None:
        """Route (namespace, service) to several backends, each request picking one.

        A backend's share of requests is its weight over the sum of weights
        (percentages work, so do any relative weights). A weight of 0 takes no
        requests; when all are 0 (or there are none) the service answers 503.
        Raises ValueError for a negative weight.
        """
        for backend, weight in weights:
            if not weight >= 0:  # also refuses NaN
                raise ValueError(f"weight of {backend} must not be negative: {weight}")
        positive = [(backend, weight) for backend, weight in weights if weight > 0]
        if len({backend for backend, _ in positive}) == 1:
            self._set((namespace, service), positive[0][0])  # one backend: no choice to make
        else:
            self._set((namespace, service), _Weighted(positive))

    def _set(self, key: _Key, route: Address | _Weighted | None) -> None:
        self._backends[key] = route
        self._down.pop(key, None)
        if key not in self._host_keys:
            self._host_keys[key] = host_key = (dns_label(key[0]), dns_label(key[1]))
            self._reindex(host_key)

    def remove(self, namespace: str, service: str) -> None:
        """Forget (namespace, service); removing an unknown entry does nothing."""
        key = (namespace, service)
        if key in self._backends:
            del self._backends[key]
            self._down.pop(key, None)
            self._reindex(self._host_keys.pop(key))

    def resolve(self, namespace: str, service: str) -> Address | None:
        """The backend for one request to this entry (a weighted choice if it has
        several), or None (unknown entry, no live revision, or all weights 0)."""
        route = self._backends.get((namespace, service))
        if isinstance(route, _Weighted):
            return route.pick()
        return route

    def resolve_peer(self, namespace: str, service: str) -> Address | None:
        """Like :meth:`resolve`, but falls back to the baseline's backend."""
        backend = self.resolve(namespace, service)
        if backend is None:
            backend = self.resolve(BASELINE, service)
        return backend

    def resolve_host(self, host: str) -> _Key | None:
        """The (namespace, service) that a Host header value names, or None.

        ``"other-app.bugfix.localhost:7080"`` gives ``("bugfix", "other_app")`` when
        that entry exists: the first label is the service's DNS-safe form, the second
        the namespace's. Case does not matter; the port and any further labels are
        ignored (so a wildcard domain works as well as ``.localhost``).
        """
        name, _ = _split_host(host)
        service, _, rest = name.partition(".")
        namespace = rest.partition(".")[0]
        if not service or not namespace:
            return None
        found = self._by_host.get((namespace, service))
        if found is None:  # not already in DNS-safe form, "other_app" say
            found = self._by_host.get((dns_label(namespace), dns_label(service)))
        return found

    def routes_to(self, backend: Address) -> bool:
        """Whether any entry may send requests to ``backend`` (a weight above 0)."""
        for route in self._backends.values():
            if route == backend or (isinstance(route, _Weighted) and backend in route.backends):
                return True
        return False

    def entries(self) -> list[tuple[str, str, Address | None]]:
        """Every entry as (namespace, service, backend), sorted by namespace, service.

        An entry with weights shows its highest-weight backend.
        """
        listed = []
        for ns, svc in sorted(self._backends):
            route = self._backends[ns, svc]
            listed.append((ns, svc, route.top if isinstance(route, _Weighted) else route))
        return listed

    def _route_host(self, host: bytes) -> _Key | None:
        """:meth:`resolve_host` for raw header bytes, remembered until the names change."""
        cache = self._host_cache
        try:
            return cache[host]
        except KeyError:
            pass
        key = self.resolve_host(host.decode("latin-1"))
        if len(cache) >= _HOST_CACHE_SIZE:
            cache.clear()
        cache[host] = key
        return key

    def _reindex(self, host_key: _Key) -> None:
        self._host_cache.clear()
        candidates = [key for key, hk in self._host_keys.items() if hk == host_key]
        if not candidates:
            self._by_host.pop(host_key, None)
            return
        # Two names with one DNS form ("other_app", "other-app"): the DNS-safe one wins.
        self._by_host[host_key] = min(candidates, key=lambda k: (k != host_key, k))
