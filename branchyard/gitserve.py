"""Read-only git over smart HTTP: the daemon's copies of local repos, for pods to fetch.

On Kubernetes a pod's init container fetches its revision's commit with git. A remote
repo is fetched from its URL; a repo registered by a local path has no address a pod can
reach, so the daemon serves it here, at ``URL/NAME`` (or ``URL/NAME.git``), ``NAME`` being
the repo's registered name (``branchyard up --git-listen``, docs/kubernetes.md).

What it serves, and nothing else:

- only ``git upload-pack`` (fetch, clone, ls-remote) ever runs: a push
  (``git-receive-pack``) is answered 403 and starts no process;
- only registered local repos, looked up by name through the function the daemon gives
  (the name is a key, never joined into a path); any other path is 404;
- a commit is fetched by its sha, reachable from a branch or not (a rollback's commit
  after a force-push), with ``uploadpack.allowAnySHA1InWant`` given to that one process
  (``git -c``), never written into the repo.

Each request is one ``git upload-pack --stateless-rpc`` (the protocol's stateless form,
as ``git http-backend`` runs it), an asyncio subprocess whose output is sent in chunks of
:data:`CHUNK` bytes as git writes them, each awaited by the connection's flow control, and
whose input is the request body (un-gzipped as it comes): no pack is ever held whole. A
client that goes away kills its process; one that takes no chunk for
:data:`STALL_SECONDS` is cut off and its process killed, and :meth:`GitServer.stop` ends
them all, so that no fetch holds up the daemon's stop.

Every git process runs as the daemon's user and costs a few megabytes, so at most
:data:`GIT_PROCESSES` run at once; :data:`GIT_WAITING` more requests wait for their
turn, and any further one is answered 503 with Retry-After at once, with no process. A
request body that is not complete after :data:`BODY_SECONDS` is cut (408, its process
killed): 300 requests that never finished their bodies once made 300 git processes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import signal
import zlib
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route
from starlette.types import Message, Receive, Scope, Send

log = logging.getLogger(__name__)

CHUNK = 64 * 1024
"""Bytes read from git and sent on at a time."""

STALL_SECONDS = 60.0
"""A client that takes a chunk no sooner than this is cut off, and its git killed."""

GIT_PROCESSES = 4
"""Most ``git upload-pack`` processes at once, all clients together."""

GIT_WAITING = 32
"""Most requests waiting for one of those; the next is refused (503, Retry-After)."""

BODY_SECONDS = 10.0
"""How long a request body (the client's wants and haves: kilobytes, sent at once) may
take to arrive in full, from the start of its git process on."""

WILDCARDS = ("0.0.0.0", "::")
"""Hosts that listen on every address: no URL a pod could use."""

_CONFIG = ("-c", "uploadpack.allowAnySHA1InWant=true")
_ENV = {"GIT_TERMINAL_PROMPT": "0", "LC_ALL": "C"}
_PROTOCOL = re.compile(r"[A-Za-z0-9=:._-]{1,64}")  # a Git-Protocol header: version=2


@dataclass(frozen=True)
class Address:
    """Where the git server listens, and the URL pods fetch from (None: its own)."""

    host: str
    port: int
    url: str | None = None

    def url_at(self, port: int) -> str:
        """The URL pods fetch from, the server listening on ``port``."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return self.url or f"http://{host}:{port}"


def address_of(listen: str, url: str | None, default_host: str) -> Address:
    """``--git-listen`` (``HOST:PORT``, ``[IPV6]:PORT``, ``PORT``) and ``--git-url``
    checked together; :class:`ValueError` says what is wrong, in one line."""
    host, _, port = listen.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ValueError(f"--git-listen {listen!r}: write an IPv6 address in brackets, [::1]:PORT")
    host = host or default_host
    if not re.fullmatch(r"[0-9]{1,5}", port) or int(port) > 65535:
        raise ValueError(f"--git-listen {listen!r} is not HOST:PORT (a port from 0 to 65535)")
    if url is not None:
        if not re.fullmatch(r"https?://[^/\s?#]+(/[^\s?#]*)?", url):
            raise ValueError(f"--git-url {url!r} is not an http:// or https:// URL")
        url = url.rstrip("/")
    elif host in WILDCARDS:
        raise ValueError(
            f"--git-listen {listen!r} listens on every address: "
            "say with --git-url which one pods fetch from"
        )
    return Address(host, int(port), url)


class GitServer:
    """The ASGI app (:attr:`app`) serving the repos ``locate`` finds by name."""

    def __init__(self, locate: Callable[[str], Path | None]) -> None:
        self._locate = locate
        self._fetches = _Fetches()
        self.app = Starlette(
            routes=[
                Route("/{name}/info/refs", self._info_refs, methods=["GET"]),
                Route("/{name}/git-upload-pack", self._upload_pack, methods=["POST"]),
                Route("/{name}/git-receive-pack", _read_only, methods=["POST"]),
            ]
        )

    def stop(self) -> None:
        """End every fetch in progress (the daemon stops), so none holds it up."""
        self._fetches.stop()

    def _git_dir(self, request: Request) -> Path | None:
        name: str = request.path_params["name"]
        found = self._locate(name)
        if found is None and name.endswith(".git"):
            found = self._locate(name.removesuffix(".git"))
        return found

    async def _info_refs(self, request: Request) -> Response:
        service = request.query_params.get("service")
        if service == "git-receive-pack":
            return await _read_only(request)
        git_dir = self._git_dir(request)
        if service != "git-upload-pack" or git_dir is None:
            return _NOT_FOUND  # the dumb protocol, or no such repo
        env = _env(request)
        v2 = "version=2" in env.get("GIT_PROTOCOL", "")
        return _Upload(
            self._fetches,
            ["--advertise-refs", "--", str(git_dir)],
            env,
            "application/x-git-upload-pack-advertisement",
            b"" if v2 else b"001e# service=git-upload-pack\n0000",
        )

    async def _upload_pack(self, request: Request) -> Response:
        git_dir = self._git_dir(request)
        if git_dir is None:
            return _NOT_FOUND
        return _Upload(
            self._fetches,
            ["--", str(git_dir)],
            _env(request),
            "application/x-git-upload-pack-result",
            gzipped=request.headers.get("content-encoding") == "gzip",
        )


_NOT_FOUND = PlainTextResponse("no such repository\n", status_code=404)
_BUSY = PlainTextResponse(
    f"busy: {GIT_PROCESSES} fetches run and {GIT_WAITING} wait; retry\n",
    status_code=503,
    headers={"Retry-After": "5"},
)
_CUT = [(b"content-type", b"text/plain; charset=utf-8"), (b"connection", b"close")]
_CUT_LINE = f"request body not complete after {BODY_SECONDS:g} s: cut\n".encode()


async def _read_only(request: Request) -> Response:
    return PlainTextResponse("read-only: branchyard serves fetches, not pushes\n", 403)


def _env(request: Request) -> dict[str, str]:
    env = {**os.environ, **_ENV}
    protocol = request.headers.get("git-protocol", "")
    if _PROTOCOL.fullmatch(protocol):
        env["GIT_PROTOCOL"] = protocol
    return env


class _Fetches:
    """The git processes running for clients, their turns, and whether the server stops."""

    def __init__(self) -> None:
        self.running: set[asyncio.subprocess.Process] = set()
        self.stopping = asyncio.Event()
        self.turns = asyncio.Semaphore(GIT_PROCESSES)
        self.waiting = 0

    @contextlib.asynccontextmanager
    async def turn(self) -> AsyncIterator[bool]:
        """Wait for a turn to run git, held while the block runs; False at once when
        :data:`GIT_WAITING` requests wait already, or the server stops."""
        if self.turns.locked() and self.waiting >= GIT_WAITING:
            yield False
            return
        self.waiting += 1
        try:
            await self.turns.acquire()
        finally:
            self.waiting -= 1
        try:
            yield not self.stopping.is_set()
        finally:
            self.turns.release()

    def stop(self) -> None:
        self.stopping.set()
        for process in self.running:
            _kill(process)


class _Upload(Response):
    """One ``git upload-pack --stateless-rpc ARGS``: the request body in, its output out,
    both streamed. A client that disconnects, or :meth:`GitServer.stop`, kills it."""

    def __init__(
        self,
        fetches: _Fetches,
        args: list[str],
        env: dict[str, str],
        media_type: str,
        prefix: bytes = b"",
        gzipped: bool = False,
    ) -> None:
        # Response's own __init__ would announce an empty body (Content-Length: 0)
        self.status_code = 200
        self.background = None
        self.raw_headers = [(b"content-type", media_type.encode()), (b"cache-control", b"no-cache")]
        self._fetches = fetches
        self._args = args
        self._env = env
        self._prefix = prefix
        self._gzipped = gzipped
        self._cut = False  # the request body took longer than BODY_SECONDS

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async with self._fetches.turn() as mine:
            if mine:
                await self._serve(receive, send)
            else:
                await _BUSY(scope, receive, send)

    async def _serve(self, receive: Receive, send: Send) -> None:
        process = await asyncio.create_subprocess_exec(
            "git",
            *_CONFIG,
            "upload-pack",
            "--stateless-rpc",
            "--strict",
            *self._args,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=self._env,
            start_new_session=True,  # with the pack-objects it starts, killed as one group
        )
        self._fetches.running.add(process)
        feeding = asyncio.create_task(self._feed(receive, process))
        errors = asyncio.create_task(_last_line(process))
        try:
            async with contextlib.aclosing(self._messages(process)) as messages:
                async for message in messages:
                    if not await self._sent(send, message):
                        # uvicorn closes a connection whose answer was left unfinished
                        log.warning("git: a fetch ended: its client stalled, or the daemon stops")
                        break
        finally:
            feeding.cancel()
            _kill(process)  # it has ended, unless its client went away half-way
            await process.wait()
            self._fetches.running.discard(process)
            line = await errors
            if process.returncode and process.returncode > 0:  # failed, not killed
                log.warning("git upload-pack: %s", line or f"exit code {process.returncode}")

    async def _messages(self, process: asyncio.subprocess.Process) -> AsyncGenerator[Message]:
        """The answer: its head once git answers, then git's output a chunk at a time,
        as git writes it; a 408 (and the connection's end) if the request body was cut."""
        assert process.stdout is not None
        chunk = self._prefix or await process.stdout.read(CHUNK)
        if self._cut:
            yield {"type": "http.response.start", "status": 408, "headers": _CUT}
            yield {"type": "http.response.body", "body": _CUT_LINE, "more_body": False}
            return
        yield {"type": "http.response.start", "status": 200, "headers": self.raw_headers}
        while chunk:
            yield {"type": "http.response.body", "body": chunk, "more_body": True}
            chunk = await process.stdout.read(CHUNK)
        yield {"type": "http.response.body", "body": b"", "more_body": False}

    async def _sent(self, send: Send, message: Message) -> bool:
        """Send ``message`` (which waits while the client has not taken the one before);
        False if it took :data:`STALL_SECONDS`, or the server stops meanwhile."""
        sending = asyncio.ensure_future(send(message))
        stopping = asyncio.ensure_future(self._fetches.stopping.wait())
        try:
            await asyncio.wait(
                (sending, stopping), timeout=STALL_SECONDS, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            stopping.cancel()
        if not sending.done():
            sending.cancel()
            return False
        sending.result()
        return True

    async def _feed(self, receive: Receive, process: asyncio.subprocess.Process) -> None:
        """Write the request body to git; kill git if the client goes away first."""
        assert process.stdin is not None
        inflate = zlib.decompressobj(16 + zlib.MAX_WBITS) if self._gzipped else None
        try:
            async with asyncio.timeout(BODY_SECONDS):
                with contextlib.suppress(ConnectionError, zlib.error):  # git ended; not gzip
                    while (message := await receive())["type"] == "http.request":
                        data = message.get("body", b"")
                        while data:
                            if inflate is None:
                                out, data = data, b""
                            else:  # a chunk at a time, however well it was compressed
                                out = inflate.decompress(data, CHUNK)
                                data = inflate.unconsumed_tail
                            process.stdin.write(out)
                            await process.stdin.drain()
                        if not message.get("more_body", False):
                            break
        except TimeoutError:
            log.warning("git: a request body was not complete after %g s: cut", BODY_SECONDS)
            self._cut = True
            _kill(process)
            return
        process.stdin.close()
        while (await receive())["type"] != "http.disconnect":
            pass
        _kill(process)


def _kill(process: asyncio.subprocess.Process) -> None:
    """Kill git and its pack-objects, unless it has ended (and its pid may be reused)."""
    if process.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)


async def _last_line(process: asyncio.subprocess.Process) -> str:
    """The last line git wrote on stderr, its reason when it fails (all of it is read, so
    git never blocks on a full pipe)."""
    assert process.stderr is not None
    last = ""
    while line := await process.stderr.readline():
        last = line.decode(errors="replace").strip() or last
    return last
