"""The data plane: an HTTP/1.1 reverse proxy that sends each request to a live revision.

Role
----
``http://SERVICE.NAMESPACE.localhost:PORT/`` reaches the live revision of SERVICE in
NAMESPACE (``*.localhost`` resolves to loopback, so no DNS setup is needed). Service
names that are not DNS-safe are reached by their DNS-safe form: ``other_app`` answers
as ``other-app``. Services also reach each other through *peer listeners*: one stable
loopback port per (namespace, service) that always leads to the namespace's live
revision, or to the baseline's when the namespace has none. Peers get that port in
their ``<PEER>_URL`` once and never need to be told when a new revision goes live.

Where things are is in a :class:`RouteTable`, plain in-memory state (no I/O); the
:class:`Router` owns the sockets. The engine reaches both only through the traffic
seam (``runtime.Traffic``), which :class:`LocalTraffic` implements here; the local
runtime opens and closes the peer listeners.

Design
------
Routing is **per request**. Every client connection has an ``httptools`` request
parser (the C parser uvicorn uses); when a request head is complete the backend is
picked from its ``Host`` header (on a peer listener: from the listener's (namespace,
service), with the baseline fallback), so a keep-alive client moves to a new revision
at its next request, and a canary's weights apply to each request, not to each
connection. Client connections are not tied to a backend.

Backend connections come from a keep-alive pool per backend address: an idle one is
reused (the most recently used first), else a new one is opened. After the response
the connection goes back to the pool if it can carry another request (HTTP/1.1, no
``Connection: close``, the request fully sent, the response ended by its framing),
and is closed otherwise. Idle pooled connections are closed after
:data:`POOL_IDLE_SECONDS` (shorter than common backend keep-alive timeouts, so the
backend rarely closes one under us), and never more than :data:`POOL_MAX_IDLE` are
kept per backend.

The request head is rebuilt from the parsed pieces: hop-by-hop ``Connection``,
``Keep-Alive`` and ``Proxy-Connection`` are dropped (so a client's ``Connection:
close`` does not cost a backend connection), ``X-Forwarded-For`` (appended to),
``X-Forwarded-Host`` and ``X-Forwarded-Proto: http`` are added. Request bodies go
through the parser and on as they arrive (a chunked body is re-chunked piece by
piece; trailers are kept). Responses are not rebuilt: each piece the backend sends is
fed to a response parser that has no body or header callbacks (so it copies
nothing) only to find where the response ends, and is written to the client as
received. The one exception: when the client connection will close after the
response (the client asked for it, or spoke HTTP/1.0), the response head is held
until complete and gets ``Connection: close``. HEAD, 1xx, 204 and 304 answers have
no body; a response without ``Content-Length`` or chunked framing ends when the
backend closes, and then the client connection closes too.

One request at a time per client connection: the next request is forwarded only
once the previous response is complete. Pipelined requests that arrive early are
parsed and held (and the client is not read further) until their turn.

A ``101 Switching Protocols`` answer (WebSocket and other upgrades) turns the pair
into a splice: from then on bytes go both ways unparsed, half-closes pass through,
and that backend connection is never pooled.

A backend connection that ends before sending any byte of a response is retried
once on a fresh connection if it was a *reused* pooled connection (the backend may
have closed it while idle) and the request is idempotent and has no body. nginx
retries its cached upstream connections the same way. Otherwise the client gets a
502.

Draining
--------
:meth:`Router.drain` is for a backend the table no longer routes to: its idle pooled
connections close at once, requests in flight on it (and upgraded connections) may
finish, and what is left after the grace period is aborted. Connections to a
draining backend are closed instead of pooled when their response is done.
:meth:`Router.in_flight` counts busy (and connecting) connections to a backend.

Flow control and the event loop
-------------------------------
The proxy uses asyncio ``Protocol`` callbacks and httptools callbacks, with no task
or coroutine per request: data arriving on one side is parsed and written to the
other side's transport straight from ``data_received``. Only opening a backend
connection runs a task. Flow control is explicit: when one side's write buffer
passes its high-water mark (``pause_writing``) the router stops reading from the
other side, and resumes when it drains, so a slow reader never makes the router
buffer more than about one high-water mark per direction.

Errors the router answers itself, always with ``Content-Length`` and
``Connection: close``, after which it stops writing and discards what the client
still sends for a short while, so the client reads the answer instead of a reset:

- 400 when the request is not HTTP/1.x, or (main listener) has no, an empty, or
  more than one ``Host`` header;
- 404 for a host that names no known service (including ``localhost:PORT``), with a
  small HTML page linking every namespace's services;
- 431 when a request head is larger than 64 KiB;
- 503 when the service is known but has no live revision (or all weights are 0), or
  when :data:`~branchyard.router.limits.BACKEND_CONNECTIONS` requests to its backend
  are under way;
- 502 when the backend cannot be reached, closes the connection without answering,
  or answers something that is not HTTP.

A client connection that has not sent a complete request head within
:data:`HEAD_TIMEOUT_SECONDS` of connecting or of its previous response is closed
(this also ends idle keep-alive connections). Peer listeners work the same way as the
main listener; they only resolve differently, and accept any ``Host``.

A connection over one of the caps of :mod:`branchyard.router.caps` (per listener, per
source address, and a budget in all derived from the file descriptor limit) gets a 503
line and is closed as soon as it is accepted, before it is read.

Every open connection is tracked, so :meth:`Router.close` (and
:meth:`Router.close_peer_listener` for its own) can abort them and leave no socket
behind.
"""

from branchyard.router.limits import BASELINE, HEAD_TIMEOUT_SECONDS, Address
from branchyard.router.server import Router
from branchyard.router.table import RouteTable
from branchyard.router.traffic import LocalTraffic

__all__ = ["BASELINE", "HEAD_TIMEOUT_SECONDS", "Address", "LocalTraffic", "RouteTable", "Router"]
