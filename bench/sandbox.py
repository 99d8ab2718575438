"""Part 4, sandbox: what the box costs a service's cold start, side by side.

The same sample service (``bench/services.py``), from the same checkout and
environment, is started through the local runtime's own spawn
(:meth:`~branchyard.runtime.processes.LocalProcess.spawn`) with and without the
sandbox, the two taking turns so that both see the same machine. Each sample
runs from the spawn to the service's first 200. A second pair of series starts
``true`` in the same two ways, until it exits: the box's own set-up and
tear-down, with no Python start-up to hide in.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import time
from pathlib import Path

from bench.common import LOOPBACK, BenchError, ServiceRepo, Summary, free_port, get
from bench.results import LATENCY_HEADER, Section, latency_row, ms
from bench.services import PROCFILE, make_venv, stdlib_service
from branchyard.errors import UsageError
from branchyard.runtime.logs import Appender
from branchyard.runtime.processes import LocalProcess
from branchyard.runtime.sandbox import Box, Sandbox, detect

TARGET = 0.020  # seconds the box may add to a cold start (median against median)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("sandbox")
    group.add_argument(
        "--sandbox-samples", type=int, default=30, help="starts per series (default 30)"
    )


class _Nowhere:
    """The store's process registry, which the bench does not keep."""

    def add_process(self, pgid: int, started: str, what: str) -> None:
        pass

    def remove_process(self, pgid: int) -> None:
        pass


async def _cold_start(
    argv: list[str], cwd: Path, env: dict[str, str], log: Path, box: tuple[Sandbox, Box] | None
) -> float:
    """Seconds from the spawn to the first 200 (``PORT`` in ``env``), or to the exit of
    a command that serves nothing (no ``PORT``)."""
    sandbox, inside = box if box else (None, Box())
    started = time.monotonic()
    output = Appender(log)
    process = await LocalProcess.spawn(argv, cwd, env, output, _Nowhere(), "bench", sandbox, inside)
    try:
        if "PORT" not in env:
            await process.wait()
            return time.monotonic() - started
        deadline = started + 30
        while time.monotonic() < deadline:
            try:
                if get(int(env["PORT"]), LOOPBACK, timeout=2.0)[0] == 200:
                    return time.monotonic() - started
            except OSError:
                pass
            if process.returncode is not None:
                raise BenchError(f"the sample service exited with {process.returncode}")
            await asyncio.sleep(0.001)
        raise BenchError("the sample service did not answer within 30 s")
    finally:
        await process.terminate(1.0)
        output.close()


def run(args: argparse.Namespace, workdir: Path, command: str) -> Section:
    section = Section("sandbox", "4. Sandbox start-up", command)
    started = time.monotonic()
    try:
        sandbox = detect()
    except UsageError as exc:
        raise BenchError(exc.message) from None
    repo = ServiceRepo.create(workdir, "app", stdlib_service())
    checkout = repo.export(workdir / "checkout")
    venv = make_venv(workdir / "venv")
    scratch = workdir / "scratch"
    scratch.mkdir()
    sandbox.give(scratch)
    box = Box((checkout, venv), (scratch,), home=scratch)
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("BRANCHYARD_")},
        "PATH": f"{venv / 'bin'}{os.pathsep}{os.environ.get('PATH', os.defpath)}",
        "VIRTUAL_ENV": str(venv),
        "PYTHONUNBUFFERED": "1",
    }
    web = ["/bin/sh", "-c", PROCFILE.removeprefix("web:").strip()]
    log = workdir / "service.log"
    series: dict[str, list[float]] = {"plain": [], "boxed": [], "true": [], "true boxed": []}

    async def sample() -> None:
        for _ in range(args.sandbox_samples):
            port = {**env, "PORT": str(free_port())}
            series["plain"].append(await _cold_start(web, checkout, port, log, None))
            series["boxed"].append(await _cold_start(web, checkout, port, log, (sandbox, box)))
            series["true"].append(await _cold_start(["true"], checkout, env, log, None))
            boxed_true = await _cold_start(["true"], checkout, env, log, (sandbox, box))
            series["true boxed"].append(boxed_true)

    asyncio.run(sample())
    shutil.rmtree(scratch, ignore_errors=True)
    summaries = {name: Summary.of(values) for name, values in series.items()}
    section.add(
        f"The sample service's cold start, spawn to first 200, through the runtime's own "
        f"spawn, {args.sandbox_samples} samples each, the series taking turns. The box: "
        f"{sandbox.describe()}.",
        "",
    )
    section.table(
        LATENCY_HEADER,
        [
            latency_row("service, no sandbox", summaries["plain"]),
            latency_row("service, sandboxed", summaries["boxed"]),
            latency_row("`true`, no sandbox", summaries["true"]),
            latency_row("`true`, sandboxed", summaries["true boxed"]),
        ],
    )
    added = summaries["boxed"].median - summaries["plain"].median
    bare = summaries["true boxed"].median - summaries["true"].median
    section.add(
        f"The box adds {ms(added)} to the service's cold start (p50 against p50) and "
        f"{ms(bare)} to a bare `true`.",
        "",
    )
    section.target("sandbox: added to a cold start, p50", ms(added), "≤ 20 ms", added <= TARGET)
    section.seconds = time.monotonic() - started
    return section
