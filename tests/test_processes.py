"""LocalProcess.terminate over real children, boxed and not: SIGTERM first, SIGKILL only
for a child still there when the grace is over, and the group reported reaped."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

import pytest

from branchyard.runtime.processes import LocalProcess
from branchyard.runtime.sandbox import Sandbox, detect

# The child says when its SIGTERM handler is in place, and says it got the signal.
HANDLER = (
    "import signal, sys, time\n"
    "def on_term(*_):\n"
    "    print('got SIGTERM', flush=True)\n"
    "    {then}\n"
    "signal.signal(signal.SIGTERM, on_term)\n"
    "print('ready', flush=True)\n"
    "while True:\n"
    "    time.sleep(1)\n"
)
KEEPS_RUNNING = HANDLER.format(then="pass")
EXITS = HANDLER.format(then="sys.exit(3)")


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
    process = await LocalProcess.spawn(argv, Path("/"), env, log, registry, "child", sandbox)
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
        assert process.returncode == (-signal.SIGKILL if sandbox is None else 128 + signal.SIGKILL)
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
