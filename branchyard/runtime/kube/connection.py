"""The runtime's connection to its cluster: which one, whether it answers, what it
serves, and the few calls the runtime makes, through lightkube's ``AsyncClient``.

Which cluster: ``--kubeconfig`` (and ``--context``), else ``KUBECONFIG``, else
``~/.kube/config``, else the service account of the pod branchyard runs in. A
kubeconfig that cannot be read or a cluster that does not answer is a
:class:`~branchyard.errors.UsageError` at ``up``, in one line.

Every change is a server-side apply with the field manager ``branchyard``, forced:
the objects are branchyard's (they carry its label), and what it applies is what
it wants. Each call counts in :attr:`Connection.calls` (a figure of the docs).
Where the cluster cannot be reached mid-way, a call raises a
:class:`~branchyard.errors.TemporaryError`; what the API server refuses stays a
lightkube ``ApiError`` for the caller to read (404, 409, 410).
"""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import httpx2
import yaml
from lightkube import ALL_NS, ApiError, AsyncClient, ConfigError, KubeConfig, SingleConfig
from lightkube.core.resource import NamespacedResource
from lightkube.types import CascadeType

from branchyard.errors import TemporaryError, UsageError
from branchyard.runtime.kube import names
from branchyard.runtime.kube.options import KubeOptions
from branchyard.runtime.kube.render import HTTPRoute

FIELD_MANAGER = "branchyard"
DEFAULT_KUBECONFIG = "~/.kube/config"
TIMEOUT = 10.0  # seconds for one call (a watch has no read timeout)

Thing = TypeVar("Thing", bound=Any)

logging.getLogger("httpx2").setLevel(logging.WARNING)  # not a line per call in the daemon's log


def load_config(options: KubeOptions) -> SingleConfig:
    """The cluster and the credentials to use, in the usual order."""
    default = Path(DEFAULT_KUBECONFIG).expanduser()
    from_env = os.environ.get("KUBECONFIG", "").split(os.pathsep)[0]
    path = options.kubeconfig or from_env or (str(default) if default.is_file() else None)
    try:
        if path is not None:
            config = KubeConfig.from_file(path)
        else:
            config = KubeConfig.from_service_account()
        single = config.get(options.context)
    except KeyError as exc:  # in-cluster: no KUBERNETES_SERVICE_HOST; a context's cluster
        where = path or "in-cluster config"
        raise UsageError(f"cannot use the Kubernetes config ({where}): {exc} is missing") from None
    except (ConfigError, yaml.YAMLError, OSError, TypeError, AttributeError) as exc:
        if path is None:
            raise UsageError(
                "no Kubernetes cluster: no --kubeconfig, no KUBECONFIG, no "
                f"{DEFAULT_KUBECONFIG}, and not in a pod ({_one_line(exc)})"
            ) from None
        raise UsageError(f"cannot use the kubeconfig {path}: {_one_line(exc)}") from None
    assert single is not None
    return single


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


class Connection:
    """One cluster, reached through one ``AsyncClient``."""

    def __init__(self, client: AsyncClient, server: str, gateway: bool) -> None:
        self.client = client
        self.server = server
        self.gateway = gateway
        """Whether the cluster serves ``gateway.networking.k8s.io`` HTTPRoutes (weights
        need them), as found at the start."""
        self.calls = 0

    @classmethod
    async def open(cls, options: KubeOptions) -> Connection:
        """Connect, and check that the cluster answers; raise a one-line UsageError if not."""
        config = load_config(options)
        server = config.cluster.server
        client = AsyncClient(
            config=config, field_manager=FIELD_MANAGER, timeout=httpx2.Timeout(TIMEOUT)
        )
        connection = cls(client, server, gateway=False)
        try:
            connection.gateway = await connection._serves_gateway()
        except (httpx2.HTTPStatusError, TemporaryError) as exc:
            await client.close()
            raise UsageError(
                f"the Kubernetes API at {server} cannot be used: {_reason(exc)}"
            ) from None
        return connection

    async def _serves_gateway(self) -> bool:
        """Whether HTTPRoutes are served: one list of at most one of them, which is also
        the check that the cluster answers and takes the credentials (a 404 is an answer:
        no Gateway API)."""
        try:
            await self.call(_first(self.client.list(HTTPRoute, namespace=ALL_NS, chunk_size=1)))
        except httpx2.HTTPStatusError as exc:  # an unknown group's 404 is not a Status
            if exc.response.status_code == 404:
                return False
            raise
        return True

    async def call(self, call: Any) -> Any:
        """Await one call to the API server, counted."""
        self.calls += 1
        try:
            return await call
        except httpx2.TransportError as exc:
            raise TemporaryError(
                f"the Kubernetes API at {self.server} cannot be reached: {_one_line(exc)}"
            ) from None

    async def apply(self, thing: Thing) -> Thing:
        """Server-side apply of ``thing``, as branchyard, taking over any field another
        manager set; the object as stored."""
        applied: Thing = await self.call(
            self.client.apply(thing, field_manager=FIELD_MANAGER, force=True)
        )
        return applied

    async def get(self, kind: type[Thing], name: str, namespace: str | None = None) -> Thing | None:
        """The object, or None if there is none."""
        try:
            if issubclass(kind, NamespacedResource):
                found: Thing = await self.call(self.client.get(kind, name, namespace=namespace))
            else:
                found = await self.call(self.client.get(kind, name))
            return found
        except ApiError as exc:
            if exc.status.code == 404:
                return None
            raise

    async def delete(self, kind: type[Any], name: str, namespace: str | None = None) -> bool:
        """Delete the object (its dependants in the background); False if there was none."""
        try:
            background = CascadeType.BACKGROUND
            if issubclass(kind, NamespacedResource):
                await self.call(
                    self.client.delete(kind, name, namespace=namespace, cascade=background)
                )
            else:
                await self.call(self.client.delete(kind, name, cascade=background))
        except httpx2.HTTPStatusError as exc:  # an unknown group's 404 is not a Status
            if exc.response.status_code == 404:
                return False
            raise
        return True

    async def list(
        self, kind: type[Thing], namespace: str, labels: Mapping[str, str] | None = None
    ) -> list[Thing]:
        """The objects of ``kind`` in ``namespace`` (or :data:`ALL_NS`) that are
        branchyard's and carry ``labels``; one call."""
        wanted: dict[str, Any] = {**names.managed(), **(labels or {})}
        if issubclass(kind, NamespacedResource):
            listing = self.client.list(kind, namespace=namespace, labels=wanted)
        else:
            listing = self.client.list(kind, labels=wanted)
        found: list[Thing] = await self.call(_all(listing))
        return found

    async def close(self) -> None:
        await self.client.close()


async def _first(listing: Any) -> list[Any]:
    async for thing in listing:
        return [thing]
    return []


async def _all(listing: AsyncIterable[Any]) -> list[Any]:
    return [thing async for thing in listing]


def _reason(exc: Exception) -> str:
    if isinstance(exc, ApiError):
        return f"{exc.status.code} {' '.join((exc.status.message or '').split())}".strip()
    if isinstance(exc, httpx2.HTTPStatusError):
        return f"{exc.response.status_code} {exc.response.reason_phrase}"
    return _one_line(exc)
