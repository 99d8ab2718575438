"""LocalProcess over real children, boxed and not: SIGTERM first, SIGKILL only for a
child still there when the grace is over, and the group reported reaped; a daemon killed
before it recorded a child leaves nothing running. Ports for services: free, and outside
the ephemeral range."""

from __future__ import annotations

import asyncio
import signal
import socket
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from branchyard.errors import TemporaryError
from branchyard.runtime.logs import Appender
from branchyard.runtime.processes import LocalProcess, Ports, ephemeral_range, service_ports
from branchyard.runtime.sandbox import Sandbox, detect
from tests.conftest import processes_with, wait_for

# The child says when its SIGTERM handler is in place, and says it got the signal, with
# os.write. A print in the handler raised "reentrant call" when the signal came between
# print("ready")'s write and the end of its flush, which runs signal handlers while it
# holds stdout's lock (CPython's _bufferedwriter_flush_unlocked): the child exited 1
# (once in a CI run under load).
HANDLER = (
    "import os, signal, sys, time\n"
    "def on_term(*_):\n"
    "    os.write(1, b'got SIGTERM\\n')\n"
    "    {then}\n"
    "signal.signal(signal.SIGTERM, on_term)\n"
    "os.write(1, b'ready\\n')\n"
    "while True:\n"
    "    time.sleep(1)\n"
)
KEEPS_RUNNING = HANDLER.format(then="pass")
EXITS = HANDLER.format(then="sys.exit(3)")


# A daemon as far as spawning goes, killed (-9) at the worst moment: its child is spawned
# and not yet recorded. argv: sandboxed|unsandboxed, the log, the marker for the child's env.
KILLED_BEFORE_RECORDING = """\
import asyncio, os, signal, sys
from pathlib import Path
from branchyard.errors import TemporaryError
from branchyard.runtime.logs import Appender
from branchyard.runtime.processes import LocalProcess, Ports, ephemeral_range, service_ports
from branchyard.runtime.sandbox import detect

class KilledWhileRecording:
    def add_process(self, pgid, started, what):
        os.kill(os.getpid(), signal.SIGKILL)

    def remove_process(self, pgid):
        pass

mode, log, marker = sys.argv[1:]
argv = ["/bin/sh", "-c", "echo ran; exec sleep 60"]
env = {"PATH": "/usr/bin:/bin", "MARK": marker}
sandbox = detect() if mode == "sandboxed" else None
log = Appender(Path(log))
spawn = LocalProcess.spawn(argv, Path("/"), env, log, KilledWhileRecording(), "x", sandbox)
asyncio.run(spawn)
"""


class Registry:
    def __init__(self) -> None:
        self.live: set[int] = set()

    def add_process(self, pgid: int, started: str, what: str) -> None:
        self.live.add(pgid)

    def remove_process(self, pgid: int) -> None:
        self.live.remove(pgid)


async def spawn_ready(
    code: str, log: Path, registry: Registry, sandbox: Sandbox | None
) -> LocalProcess:
    """``code`` running under python3, once it printed ``ready`` (its handler is set)."""
    argv, env = ["python3", "-c", code], {"PATH": "/usr/bin:/bin"}
    process = await LocalProcess.spawn(
        argv, Path("/"), env, Appender(log), registry, "child", sandbox
    )
    assert registry.live == {process.pid}
    async with asyncio.timeout(30):
        while b"ready\n" not in log.read_bytes():
            assert process.returncode is None, log.read_text()
            await asyncio.sleep(0.01)
    return process


@pytest.fixture(params=["unsandboxed", "sandboxed"])
def sandbox(request: pytest.FixtureRequest) -> Sandbox | None:
    return None if request.param == "unsandboxed" else detect()


def test_a_child_that_carries_on_after_sigterm_is_killed_once_the_grace_is_over(
    tmp_path: Path, sandbox: Sandbox | None
) -> None:
    log = tmp_path / "log"

    async def scenario() -> None:
        registry = Registry()
        process = await spawn_ready(KEEPS_RUNNING, log, registry, sandbox)
        await process.terminate(1)
        # bwrap reports its child's death by a signal as 128 + the signal
        killed = -signal.SIGKILL if sandbox is None else 128 + signal.SIGKILL
        assert process.returncode == killed, log.read_text()
        assert registry.live == set()
        assert not Path(f"/proc/{process.pid}").exists()

    asyncio.run(scenario())
    assert log.read_text() == "ready\ngot SIGTERM\n"  # it had the SIGTERM, then the grace


def test_a_child_that_exits_on_sigterm_within_the_grace_is_not_killed(
    tmp_path: Path, sandbox: Sandbox | None
) -> None:
    log = tmp_path / "log"

    async def scenario() -> None:
        registry = Registry()
        process = await spawn_ready(EXITS, log, registry, sandbox)
        await process.terminate(60)
        assert process.returncode == 3
        assert registry.live == set()

    asyncio.run(scenario())
    assert log.read_text() == "ready\ngot SIGTERM\n"


def test_a_daemon_killed_before_it_recorded_a_child_leaves_nothing_running(
    tmp_path: Path, sandbox: Sandbox | None
) -> None:
    """The child waits until it is recorded, so a restarted daemon can always reap it:
    one whose daemon died first never runs its command and exits by itself."""
    log, marker = tmp_path / "log", f"MARK_{uuid.uuid4().hex}"
    mode = "unsandboxed" if sandbox is None else "sandboxed"
    daemon = [sys.executable, "-c", KILLED_BEFORE_RECORDING, mode, str(log), marker]
    assert subprocess.run(daemon, check=False).returncode == -signal.SIGKILL
    wait_for(lambda: not processes_with(marker), 10, "the unrecorded child gone")
    assert log.read_text() == ""


@pytest.mark.parametrize(
    ("ephemeral", "first", "last", "count"),
    [
        ((32768, 60999), 10000, 65535, 22768 + 4536),  # Linux's default range
        ((1024, 65535), None, None, 0),  # everything ephemeral: no port is safe
        ((10000, 20000), 20001, 65535, 45535),  # below LOWEST_PORT is never offered
        ((60000, 65535), 10000, 59999, 50000),
    ],
)
def test_services_get_ports_outside_the_ephemeral_range(
    ephemeral: tuple[int, int], first: int | None, last: int | None, count: int
) -> None:
    ports = service_ports(ephemeral)
    assert len(ports) == count
    assert (ports[0] if ports else None, ports[-1] if ports else None) == (first, last)
    assert not [port for port in ports if ephemeral[0] <= port <= ephemeral[1]]


def test_a_port_held_by_anyone_or_handed_out_is_not_handed_out() -> None:
    low = service_ports(ephemeral_range())[0]
    with socket.socket() as elsewhere:
        elsewhere.bind(("127.0.0.1", low))  # another program holds the first candidate
        ports = Ports([low, low + 1, low + 2])
        taken = {ports.take(), ports.take()}
        assert taken == {low + 1, low + 2}
        with pytest.raises(TemporaryError, match="no free loopback port"):
            ports.take()
        ports.give_back(low + 2)
        assert ports.take() == low + 2
