"""Part 3, capacity: many namespaces of several services on one daemon.

Three stdlib sample repos (``app``, ``other_app``, ``web``), each with
``--namespaces`` branches (``main`` plus ``env-01``, ``env-02``, ...) created
directly in the bare repos, so ``--namespaces 30`` gives 90 services, each of
which sees the other two as peers. The bench registers the repos through the API
and measures: the time until every service answers through the router, the
daemon's memory and threads, the services' memory (found by a marker variable
in their environment), ``branchyard ps -A`` latency (the real CLI, started fresh
each time, as a person runs it), the daemon's own CPU use while nothing happens,
and how soon one push is live with all services present.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

from bench.common import (
    BRANCHYARD,
    ROOT,
    Daemon,
    ServiceRepo,
    Summary,
    cli_env,
    command_name,
    cpu_seconds,
    get,
    git,
    revision_at,
    status_kib,
    threads,
    wait_until,
)
from bench.results import Section, ms, spread
from bench.services import stdlib_service

SERVICES = ("app", "other_app", "web")
SETTLE_SECONDS = 2.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("capacity")
    group.add_argument(
        "--namespaces", type=int, default=30, help="namespaces of 3 services (default 30)"
    )
    group.add_argument(
        "--idle-seconds", type=float, default=30, help="idle CPU window (default 30)"
    )
    group.add_argument("--ps-runs", type=int, default=20, help="ps -A runs (default 20)")
    group.add_argument(
        "--against",
        metavar="REF",
        help="also time ps -A of branchyard at REF (its daemon with the same services), "
        "interleaved with this checkout's",
    )
    group.add_argument(
        "--push-samples", type=int, default=5, help="pushes with everything up (default 5)"
    )


def _namespaces(count: int) -> list[str]:
    return ["main", *(f"env-{n:02d}" for n in range(1, count))]


def _host(service: str, namespace: str) -> str:
    return f"{service.replace('_', '-')}.{namespace}.localhost"


def _serves(port: int, service: str, namespace: str) -> bool:
    try:
        status, body = get(port, _host(service, namespace), timeout=5)
    except OSError:
        return False
    return status == 200 and f'"namespace": "{namespace}"'.encode() in body


def _fill(daemon: Daemon, repos: list[ServiceRepo], namespaces: list[str]) -> float:
    """Registers the repos and waits until every service answers; how long it took."""
    began = time.monotonic()
    for repo in repos:
        daemon.add_repo(str(repo.origin))
    pending = {(ns, repo.name) for ns in namespaces for repo in repos}

    def all_live() -> bool:
        for slot in sorted(pending):
            if _serves(daemon.router_port, slot[1], slot[0]):
                pending.discard(slot)
        return not pending

    total = len(pending)
    wait_until(all_live, 60 + total * 2, f"all {total} services live", 0.05)
    return time.monotonic() - began


def _cached(env: dict[str, str], prefix: Path) -> dict[str, str]:
    """``env`` with the bytecode cache on, kept in ``prefix``."""
    kept = {k: v for k, v in env.items() if k != "PYTHONDONTWRITEBYTECODE"}
    return {**kept, "PYTHONPYCACHEPREFIX": str(prefix)}


def _ps(daemon: Daemon, env: dict[str, str], total: int) -> None:
    argv = [str(BRANCHYARD), "--home", str(daemon.home), "ps", "-A"]
    done = subprocess.run(argv, env=env, capture_output=True, text=True, check=True)
    if len(done.stdout.splitlines()) != total + 1:
        raise AssertionError(f"ps -A listed the wrong services:\n{done.stdout}")


@contextlib.contextmanager
def _against(
    ref: str, workdir: Path, repos: list[ServiceRepo], namespaces: list[str]
) -> Iterator[Daemon]:
    """The daemon of branchyard at ``ref`` (a git worktree of this checkout), with the same
    services as this bench's, all answering."""
    checkout = workdir / "against"
    git("worktree", "add", "--detach", str(checkout), ref, cwd=ROOT)
    try:
        with Daemon.start(workdir / "home-against", root=checkout) as daemon:
            _fill(daemon, repos, namespaces)
            yield daemon
    finally:
        git("worktree", "remove", "--force", str(checkout), cwd=ROOT)


def run(args: argparse.Namespace, workdir: Path, command: str) -> Section:
    section = Section("capacity", "3. Capacity", command)
    started = time.monotonic()
    namespaces = _namespaces(args.namespaces)
    repos = []
    for name in SERVICES:
        repo = ServiceRepo.create(workdir / "capacity", name, stdlib_service())
        repo.branch_in_origin(namespaces[1:])
        repos.append(repo)
    total = len(namespaces) * len(repos)

    with Daemon.start(workdir / "home-capacity") as daemon:
        all_live_seconds = _fill(daemon, repos, namespaces)
        peak_kib = status_kib(daemon.pid, "VmHWM")

        time.sleep(SETTLE_SECONDS)
        rss_kib = status_kib(daemon.pid, "VmRSS")
        thread_count = threads(daemon.pid)
        service_pids = daemon.service_pids()
        services_kib = sum(status_kib(pid, "VmRSS") for pid in service_pids)
        by_command: dict[str, list[int]] = {}
        for pid in service_pids:
            by_command.setdefault(command_name(pid), []).append(status_kib(pid, "VmRSS"))

        cpu_before = cpu_seconds(daemon.pid)
        idle_began = time.monotonic()
        time.sleep(args.idle_seconds)
        idle_cpu = (cpu_seconds(daemon.pid) - cpu_before) / (time.monotonic() - idle_began)

        # As after a normal install, with the bytecode cached (in a temp prefix, so the
        # work tree stays clean); and as this environment runs it, which may forbid that.
        plain = cli_env(os.environ)
        cached = _cached(plain, workdir / "pycache")
        ps_times: list[float] = []
        ps_plain_times: list[float] = []
        against_times: list[float] = []
        api_times: list[float] = []
        clis = [(daemon, cached, ps_times), (daemon, plain, ps_plain_times)]
        with contextlib.ExitStack() as stack:
            if args.against:
                other = stack.enter_context(_against(args.against, workdir, repos, namespaces))
                env = _cached(cli_env(os.environ, other.root), workdir / "pycache-against")
                clis.append((other, env, against_times))
            for who, env, _ in clis:
                _ps(who, env, total)  # fills the bytecode cache
            for run_number in range(args.ps_runs):
                for who, env, times in clis[:: 1 if run_number % 2 else -1]:
                    began_ps = time.monotonic()
                    _ps(who, env, total)
                    times.append(time.monotonic() - began_ps)
                began_api = time.monotonic()
                daemon.services()
                api_times.append(time.monotonic() - began_api)

        namespace = namespaces[len(namespaces) // 2]
        app = repos[0]
        if namespace != "main":
            git("fetch", "-q", "origin", cwd=app.clone)
            app.checkout(namespace, new=False)
        push_times = []
        for number in range(1, args.push_samples + 1):
            sha = app.commit(stdlib_service(number), f"change {number}")
            app.push(namespace)
            pushed = time.monotonic()
            wait_until(
                lambda sha=sha: revision_at(daemon.router_port, _host(app.name, namespace)) == sha,
                120,
                f"{app.name}@{sha[:7]} in {namespace}",
            )
            push_times.append(time.monotonic() - pushed)
        leftover_before_stop = len(daemon.service_pids())
        stop_seconds = daemon.stop()

    mb = 1024 / 1e6  # kB (KiB) -> MB
    ps = Summary.of(ps_times)
    ps_plain = Summary.of(ps_plain_times)
    no_bytecode = os.environ.get("PYTHONDONTWRITEBYTECODE")
    api = Summary.of(api_times)
    pushes = Summary.of(push_times)
    section.add(
        f"{len(namespaces)} namespaces x {len(repos)} stdlib services = {total} services "
        f"(branches made in the bare repos; the repos registered through the API). "
        f"RSS is `VmRSS` from /proc, in MB (10⁶ bytes); idle CPU is the daemon's own "
        f"utime+stime (not its children's) over {args.idle_seconds:g} s, taken "
        f"{SETTLE_SECONDS:g} s after everything answered.",
        "",
    )
    section.table(
        ["figure", "value"],
        [
            ["repo add → all services answer through the router", ms(all_live_seconds)],
            ["daemon RSS", f"{rss_kib * mb:.1f} MB"],
            ["daemon peak RSS (VmHWM)", f"{peak_kib * mb:.1f} MB"],
            ["daemon threads", str(thread_count)],
            [
                "services' RSS, sum",
                f"{services_kib * mb:.1f} MB in {len(service_pids)} processes: "
                + ", ".join(
                    f"{len(sizes)} `{name}` ({sum(sizes) * mb:.1f} MB)"
                    for name, sizes in sorted(by_command.items())
                ),
            ],
            [
                f"`branchyard ps -A` wall time (bytecode cached), median (min … max) of {ps.n}",
                spread(ps),
            ],
            [
                "the same, in this environment as it is"
                + (" (PYTHONDONTWRITEBYTECODE set: no bytecode cache)" if no_bytecode else ""),
                spread(ps_plain),
            ],
            ["the API call alone (`GET /api/services`)", spread(api)],
            [f"daemon CPU while idle ({args.idle_seconds:g} s)", f"{idle_cpu * 100:.2f} %"],
            [
                f"one push to `{namespace}` live, all {total} present, median (min … max)",
                spread(pushes),
            ],
            ["daemon stop (SIGTERM → exit, every service stopped)", ms(stop_seconds)],
        ],
    )
    if against_times:
        other_ps = Summary.of(against_times)
        pairs = zip(ps_times, against_times, strict=True)
        ratio = statistics.median(here / there for here, there in pairs)
        section.add(
            f"Side by side with `{args.against}` (its daemon with the same {total} services, "
            f"its CLI; runs interleaved): `ps -A` median (min … max) {spread(other_ps)} there, "
            f"{spread(ps)} here; pairwise ratio here/there, median of {ps.n}: {ratio:.2f}.",
            "",
        )
    section.add(
        f"Push samples: {', '.join(ms(t) for t in push_times)}. Service processes "
        f"just before stopping: {leftover_before_stop}; after: 0.",
        "",
    )
    section.target("daemon RSS", f"{rss_kib * mb:.1f} MB", "≤ 150 MB", rss_kib * mb <= 150)
    section.target(
        "daemon idle CPU", f"{idle_cpu * 100:.2f} % of a core", "≤ 2 %", idle_cpu <= 0.02
    )
    section.target("`ps -A` latency (median)", ms(ps.median), "≤ 200 ms", ps.median <= 0.2)
    section.seconds = time.monotonic() - started
    return section
