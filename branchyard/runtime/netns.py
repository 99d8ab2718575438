"""Sockets inside a box's network namespace, made from the daemon's side of it.

Each box has a network namespace of its own (``bwrap --unshare-net``): a loopback
interface and nothing else, as a pod has its own network. The daemon reaches into
it without giving the box any way out: a socket belongs to the namespace it was
made in, whatever thread or process uses it later. So the daemon's thread switches
into the box's namespace (``setns``, which needs ``CAP_SYS_ADMIN``: a root daemon),
makes the socket, and switches back at once; two system calls, with nothing else
run in between. The socket then works from the daemon's event loop like any other:

- a connected socket reaches the service's ``$PORT`` on the box's own loopback
  (the router and the health check);
- a listening socket on the box's loopback is an address the box may reach: a
  peer's ``<PEER>_URL`` (served by the router), the egress proxy, a host port the
  operator exposed (see ``boxnet``).

Nothing else on the machine is reachable from inside the box: not the API, the
dashboard, the git server, other boxes, and no host port can be bound there.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import socket
from collections.abc import Iterator

CLONE_NEWNET = 0x40000000
LISTEN_BACKLOG = 512
_libc = ctypes.CDLL(None, use_errno=True)
_own: int | None = None  # the daemon's own namespace, opened before the first switch
log = logging.getLogger(__name__)


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


def _own_namespace() -> int:
    global _own
    if _own is None:
        _own = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    return _own


@contextlib.contextmanager
def _inside(fd: int) -> Iterator[None]:
    """Run the body in the namespace ``fd`` on this thread, then come back.

    Coming back cannot fail for a process that could go in; if it ever did, this
    thread would make every later socket inside a box, so the daemon stops at once.
    """
    own = _own_namespace()
    _setns(fd)
    try:
        yield
    finally:
        try:
            _setns(own)
        except OSError as exc:
            log.critical("cannot return to the daemon's network namespace: %s", exc)
            os._exit(70)


class NetworkNamespace:
    """A box's network namespace, held open by a file descriptor until :meth:`close`."""

    def __init__(self, fd: int) -> None:
        self._fd = fd

    @classmethod
    def of(cls, pid: int) -> NetworkNamespace:
        """The namespace the process ``pid`` (a box's init) is in."""
        return cls(os.open(f"/proc/{pid}/ns/net", os.O_RDONLY | os.O_CLOEXEC))

    def new_socket(self, family: int = socket.AF_INET) -> socket.socket:
        """A new TCP socket that lives in this namespace, not blocking."""
        with _inside(self._fd):
            made = socket.socket(family, socket.SOCK_STREAM)
        made.setblocking(False)
        return made

    def listen(self, host: str, port: int) -> socket.socket:
        """A socket listening on ``host:port`` inside this namespace."""
        made = self.new_socket()
        try:
            made.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            made.bind((host, port))
            made.listen(LISTEN_BACKLOG)
        except BaseException:
            made.close()
            raise
        return made

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def can_enter() -> str | None:
    """None if this process can make sockets in other namespaces, else why not."""
    try:
        with _inside(_own_namespace()):
            pass
    except OSError as exc:
        return exc.strerror or str(exc)
    return None
