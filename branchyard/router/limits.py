"""The router's vocabulary, limits and clock: the bottom of the package, importing none of it.

Durations are read as ``limits.NAME`` where they are used, so tests can shorten them.
"""

from __future__ import annotations

import time
from typing import TypeAlias

Address: TypeAlias = tuple[str, int]
"""(host, port) of a backend, e.g. ``("127.0.0.1", 40123)``."""

BASELINE = "main"
"""The namespace of every repository's default branch; peers fall back to it."""

MAX_HEAD_BYTES = 64 * 1024
"""Largest request head the router accepts before answering 431."""

HEAD_TIMEOUT_SECONDS = 30.0
"""How long a client connection may take to send a complete request head, counted from
its connection or from its previous response (so idle keep-alive connections end too)."""

CONNECT_TIMEOUT_SECONDS = 10.0
"""How long connecting to a backend may take before the client gets a 502."""

LINGER_SECONDS = 2.0
"""How long to keep discarding client bytes after answering an error ourselves."""

POOL_IDLE_SECONDS = 4.0
"""How long an idle backend connection stays in the pool (uvicorn closes after 5 s)."""

POOL_MAX_IDLE = 64
"""Most idle connections kept per backend address."""

SWEEP_SECONDS = 1.0
"""How often idle client and pooled connections are checked for their timeouts."""

LISTEN_BACKLOG = 1024

_Key: TypeAlias = tuple[str, str]
"""(namespace, service)."""

_now = time.monotonic
