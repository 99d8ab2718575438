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

PEER_LISTENER_CONNECTIONS = 512
"""Most client connections one peer listener (one (namespace, service)) holds at once;
the next is refused at once with a 503 line."""

MAIN_LISTENER_CONNECTIONS = 2048
"""Most client connections the main listener holds at once, kept out of the peer
listeners' reach: a flood through every peer listener leaves the main one its share."""

CLIENT_CONNECTIONS = 1024
"""Most client connections from one source address, loopback excepted (every local
client is 127.0.0.1: loopback connections are capped per listener instead)."""

BACKEND_CONNECTIONS = 512
"""Most connections to one backend address that serve a request (or are being opened)
at once; a request over it gets a 503 at once."""

RESERVED_FDS = 2048
"""File descriptors the router never takes, at the least (a quarter of the limit when
that is more): for the API and the git server (512 connections each), the store, logs,
mirrors and the pipes of the boxes."""

MIN_ROUTER_FDS = 256
"""File descriptors the router may take however low the limit (``ulimit -n``) is."""

_Key: TypeAlias = tuple[str, str]
"""(namespace, service)."""

_now = time.monotonic
