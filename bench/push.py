"""Part 1, push-to-live: from ``git push`` returning to the router's first answer from it.

Three cases, each against the real daemon, and the baseline they are set
against, measured in the same run:

- **cold start** of the sample service with no branchyard: process start to its
  first 200, started exactly as the local runtime starts it, one sample right
  before each push (so a busy machine weighs on both alike);
- **local path**: a bare repo on this machine (the watcher stats its refs);
- **polling path**: the same kind of repo served by ``git http-backend``
  (tests/githttp.py), which the daemon polls every ``--poll-interval`` seconds.
  Each push is aimed at its own point of the poll cycle, the points spread
  evenly over it (i + 0.5)/n and taken in a shuffled order, so the wait for the
  poll averages half the interval as for pushes at random times, without the
  sampling noise of random delays (the median of 20 uniform waits over a 2 s
  cycle varies by about ±200 ms from run to run). The cycle is read from the
  git HTTP server's own request log: a poll is a burst of requests;
- **dependencies**: a service with ``tinydep`` in requirements.txt: code-only
  commits (the build log must show the cached environment reused and nothing
  installed) and commits that change the dependency (a new environment);
- **frameworks**: a Flask app from PyPI, served by Flask's own server and by
  gunicorn, each with its own cold start measured the same way (its own
  environment with the same packages, filled as ``pip install`` fills one:
  bytecode compiled).

The poller asks the router with a fresh connection (``Connection: close``) every
``--poll-ms`` milliseconds, so that a router that routes per connection is not
kept on the old revision.
"""

from __future__ import annotations

import argparse
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from bench.common import Daemon, ServiceRepo, Summary, git, revision_at, wait_until
from bench.results import LATENCY_HEADER, Section, latency_row, ms, spread
from bench.services import (
    FRAMEWORKS,
    Framework,
    cold_starts,
    dependency_service,
    make_venv,
    serve_wheels,
    stdlib_service,
    wheel,
)
from tests.githttp import GitHttpServer

LIVE_TIMEOUT = 120.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("push-to-live")
    group.add_argument("--commits", type=int, default=20, help="commits per path (default 20)")
    group.add_argument(
        "--dep-commits", type=int, default=5, help="dependency-changing commits (default 5)"
    )
    group.add_argument(
        "--poll-interval",
        type=float,
        default=2.0,
        help="the daemon's --poll-interval on the polling path, seconds (default 2)",
    )
    group.add_argument(
        "--poll-ms", type=float, default=5.0, help="the bench's own poll period (default 5 ms)"
    )


@dataclass(frozen=True)
class Sample:
    began: float  # wall clock: `git push` started
    pushed: float  # wall clock: `git push` returned
    answered: float  # wall clock: the router's first answer from the new revision

    @property
    def to_live(self) -> float:
        return self.answered - self.pushed

    @property
    def push(self) -> float:
        return self.pushed - self.began


def _time_pushes(
    daemon: Daemon,
    repo: ServiceRepo,
    commits: int,
    files: Callable[[int], dict[str, str]],
    poll: float,
    before_push: Callable[[], None] = lambda: None,
    after_live: Callable[[str], None] = lambda sha: None,
) -> list[Sample]:
    """Push ``commits`` commits one after another, timing each until it answers."""
    host = f"{repo.name}.main.localhost"
    samples = []
    for number in range(1, commits + 1):
        sha = repo.commit(files(number), f"change {number}")
        before_push()
        began = time.time()
        repo.push()
        pushed = time.time()
        wait_until(
            lambda sha=sha: revision_at(daemon.router_port, host) == sha,
            LIVE_TIMEOUT,
            f"{repo.name}@{sha[:7]} through the router",
            poll,
        )
        samples.append(Sample(began, pushed, time.time()))
        after_live(sha)
    return samples


PHASES = (
    "notice: the watcher sees the push (stat or poll, ls-remote, fetch)",
    "plan: heads seen → deploy started",
    "build and start: checkout, environment, spawn, health check",
    "route: live → the bench's first answer through the router",
)


def _breakdown(daemon: Daemon, service: str, samples: list[Sample]) -> list[list[float]] | None:
    """Each push's time split at the store's events (push, deploy, live), or None."""
    events = daemon.events(samples[0].began - 1)
    phases: list[list[float]] = [[] for _ in PHASES]
    for sample in samples:
        window = [e for e in events if sample.began <= e[0] <= sample.answered]
        heads = next((e for e in window if e[1] == "push" and e[4].startswith(service)), None)
        deploy = next((e for e in window if e[1] == "deploy" and e[3] == service), None)
        live = next((e for e in window if e[1] == "live" and e[3] == service), None)
        if heads is None or deploy is None or live is None:
            return None
        marks = [sample.pushed, heads[0], deploy[0], live[0], sample.answered]
        for index in range(len(PHASES)):
            phases[index].append(marks[index + 1] - marks[index])
    return phases


def _poll_waits(
    samples: list[Sample],
    phases: list[list[float]] | None,
    request_times: list[float],
    interval: float,
) -> list[float]:
    """For each push, from `git push` returning to the start of the poll that saw it.

    That poll is the burst of git HTTP requests (ls-remote, then the fetch) that
    ended just before the daemon recorded the new heads. It may have started
    while `git push` was still running (a negative wait): the ref moves before
    the push returns.
    """
    if phases is None:
        return []
    starts = _poll_starts(request_times, min(0.3, interval / 2))
    waits = []
    for sample, notice in zip(samples, phases[0], strict=True):
        before = [at for at in starts if at <= sample.pushed + notice]
        if not before:
            return []
        waits.append(before[-1] - sample.pushed)
    return waits


class _TimedRequests(list[tuple[str, str, bytes]]):
    """The git HTTP server's request log, with the wall-clock time of each request."""

    def __init__(self, existing: list[tuple[str, str, bytes]]) -> None:
        super().__init__(existing)
        self.times: list[float] = []

    def append(self, item: tuple[str, str, bytes]) -> None:
        self.times.append(time.time())
        super().append(item)


def _poll_starts(request_times: list[float], gap: float) -> list[float]:
    """The start of each burst of requests: one poll (ls-remote, and a fetch if heads moved)."""
    return [at for i, at in enumerate(request_times) if i == 0 or at - request_times[i - 1] >= gap]


class _Aim:
    """Sleeps until the poll cycle is at the next of n evenly spread points, shuffled."""

    def __init__(self, request_times: list[float], interval: float, n: int) -> None:
        self._times = request_times
        self._interval = interval
        self._phases = [(i + 0.5) / n for i in range(n)]
        random.Random(1).shuffle(self._phases)

    def __call__(self) -> None:
        while not self._times:  # no poll seen yet: one comes within an interval
            time.sleep(0.01)
        last_poll = _poll_starts(self._times, min(0.3, self._interval / 2))[-1]
        now = time.time()
        at = last_poll + self._phases.pop() * self._interval
        while at < now:
            at += self._interval
        time.sleep(at - now)


def _first_deploy(daemon: Daemon, repo: ServiceRepo, url: str, poll: float) -> float:
    sha = git("rev-parse", "HEAD", cwd=repo.clone)
    started = time.monotonic()
    daemon.add_repo(url)
    wait_until(
        lambda: revision_at(daemon.router_port, f"{repo.name}.main.localhost") == sha,
        LIVE_TIMEOUT,
        f"the first deploy of {repo.name}",
        poll,
    )
    return time.monotonic() - started


def _overheads(values: list[float], baseline: float) -> list[float]:
    return [value - baseline for value in values]


@dataclass(frozen=True)
class FrameworkRun:
    framework: Framework
    first: float  # repo add → first answer (creates and fills the environment)
    cold: Summary  # its cold start with no branchyard, one sample before each push
    to_live: Summary
    overhead: Summary
    phases: list[list[float]] | None


def _framework(
    daemon: Daemon, framework: Framework, workdir: Path, commits: int, poll: float
) -> FrameworkRun:
    """Pushes of a framework service, each after one sample of its own cold start."""
    repo = ServiceRepo.create(workdir / "local", framework.name.lower(), framework.files())
    checkout = repo.export(workdir / f"run-{repo.name}")
    venv = make_venv(workdir / f"venv-{repo.name}", repo.clone / "requirements.txt")
    first = _first_deploy(daemon, repo, str(repo.origin), poll)
    cold: list[float] = []
    samples = _time_pushes(
        daemon,
        repo,
        commits,
        framework.files,
        poll,
        before_push=lambda: cold.extend(cold_starts(checkout, venv, 1, poll, framework.procfile)),
    )
    baseline = Summary.of(cold)
    to_live = [x.to_live for x in samples]
    return FrameworkRun(
        framework,
        first,
        baseline,
        Summary.of(to_live),
        Summary.of(_overheads(to_live, baseline.median)),
        _breakdown(daemon, repo.name, samples),
    )


def run(args: argparse.Namespace, workdir: Path, command: str) -> Section:
    section = Section("push", "1. Push-to-live", command)
    started = time.monotonic()
    poll = args.poll_ms / 1000
    rows: list[list[str]] = []

    # Baselines: the services' own cold start, no branchyard, one sample right before
    # each push of the local and the code-only series, so both see the same machine.
    plain = ServiceRepo.create(workdir / "local", "app", stdlib_service())
    plain_run = plain.export(workdir / "run-plain")
    plain_venv = make_venv(workdir / "venv-plain")
    wheels = workdir / "wheels"
    served = serve_wheels(wheels)
    requirement = served.requirement(wheel(wheels, "1.0"))
    deps = ServiceRepo.create(workdir / "local", "depapp", dependency_service(requirement))
    deps_run = deps.export(workdir / "run-deps")
    deps_venv = make_venv(workdir / "venv-deps", deps.clone / "requirements.txt")
    cold_plain: list[float] = []
    cold_with_deps: list[float] = []

    # The local path, then the dependency cases, on one daemon.
    with Daemon.start(workdir / "home-local", *served.flags) as daemon:
        first_plain = _first_deploy(daemon, plain, str(plain.origin), poll)
        local = _time_pushes(
            daemon,
            plain,
            args.commits,
            lambda n: stdlib_service(n),
            poll,
            before_push=lambda: cold_plain.extend(cold_starts(plain_run, plain_venv, 1, poll)),
        )
        local_phases = _breakdown(daemon, plain.name, local)
        first_deps = _first_deploy(daemon, deps, str(deps.origin), poll)
        clean = []

        def installed_nothing(sha: str) -> None:
            log = daemon.cli("logs", "--build", deps.name)
            clean.append("reusing environment" in log and "install" not in log)

        code_only = _time_pushes(
            daemon,
            deps,
            args.commits,
            lambda n: dependency_service(requirement, n),
            poll,
            before_push=lambda: cold_with_deps.extend(cold_starts(deps_run, deps_venv, 1, poll)),
            after_live=installed_nothing,
        )
        installs = []

        def installed(sha: str) -> None:
            installs.append("install" in daemon.cli("logs", "--build", deps.name))

        dep_change = _time_pushes(
            daemon,
            deps,
            args.dep_commits,
            lambda n: dependency_service(
                served.requirement(wheel(wheels, f"1.{n}")), args.commits + n
            ),
            poll,
            after_live=installed,
        )
        code_phases = _breakdown(daemon, deps.name, code_only)
        change_phases = _breakdown(daemon, deps.name, dep_change)
        frameworks = [
            _framework(daemon, framework, workdir, args.commits, poll) for framework in FRAMEWORKS
        ]

    # The polling path: git http-backend on loopback, the daemon polling it.
    interval = args.poll_interval
    polled = ServiceRepo.create(workdir / "http", "polled", stdlib_service())
    with (
        GitHttpServer(polled.origin.parent) as server,
        Daemon.start(workdir / "home-poll", "--poll-interval", f"{interval:g}") as daemon,
    ):
        first_polled = _first_deploy(daemon, polled, f"{server.url}/polled.git", poll)
        server.requests = requests = _TimedRequests(server.requests)
        polling = _time_pushes(
            daemon,
            polled,
            args.commits,
            lambda n: stdlib_service(n),
            poll,
            before_push=_Aim(requests.times, interval, args.commits),
        )
        http_requests = len(server.requests)
        polling_phases = _breakdown(daemon, polled.name, polling)
        poll_waits = _poll_waits(polling, polling_phases, requests.times, interval)
    shutil.rmtree(workdir / "home-poll", ignore_errors=True)

    cold = Summary.of(cold_plain)
    cold_deps = Summary.of(cold_with_deps)
    rows.append(latency_row("cold start, stdlib service (no branchyard)", cold))
    rows.append(latency_row("cold start, service with tinydep (no branchyard)", cold_deps))
    local_s = Summary.of([x.to_live for x in local])
    local_over = Summary.of(_overheads([x.to_live for x in local], cold.median))
    polling_s = Summary.of([x.to_live for x in polling])
    polling_over = Summary.of(_overheads([x.to_live for x in polling], cold.median))
    code_s = Summary.of([x.to_live for x in code_only])
    code_over = Summary.of(_overheads([x.to_live for x in code_only], cold_deps.median))
    change_s = Summary.of([x.to_live for x in dep_change])
    change_over = Summary.of(_overheads([x.to_live for x in dep_change], cold_deps.median))
    rows += [
        latency_row("local path: push-to-live", local_s),
        latency_row("local path: overhead (push-to-live - cold start p50)", local_over),
        latency_row(f"polling path ({interval:g} s): push-to-live", polling_s),
        latency_row("polling path: overhead (push-to-live - cold start p50)", polling_over),
        latency_row("with deps, code-only commit: push-to-live", code_s),
        latency_row("with deps, code-only commit: overhead", code_over),
        latency_row("with deps, dependency change: push-to-live", change_s),
        latency_row("with deps, dependency change: overhead", change_over),
        latency_row("`git push` itself (local bare repo)", Summary.of([x.push for x in local])),
    ]
    for run in frameworks:
        name = run.framework.name
        rows += [
            latency_row(f"cold start, {name} service (no branchyard)", run.cold),
            latency_row(f"{name}: push-to-live", run.to_live),
            latency_row(f"{name}: overhead (push-to-live - cold start p50)", run.overhead),
        ]

    section.add(
        "Each commit changes the service's code and is pushed only after the previous one "
        "answered through the router. Push-to-live runs from `git push` returning to the "
        "router's first answer from the new revision (fresh connection every "
        f"{args.poll_ms:g} ms). Overhead is push-to-live minus the median cold start of "
        "the same service, started the way the runtime starts it (`/bin/sh -c 'python "
        "app.py'` in a `uv venv` environment) but with no branchyard, one sample taken "
        "right before each push of the local and code-only series. On the polling path "
        f"the daemon runs with `--poll-interval {interval:g}` and each push starts at its "
        "own point of the poll cycle (read from the git server's request log), the "
        "points spread evenly over the cycle and taken in shuffled order: the wait for "
        "the poll averages half the interval, as for pushes at random times, without "
        "the noise of random delays. The framework services are one Flask app, served "
        "by Flask's own server (`python app.py`) and by gunicorn (`gunicorn --bind "
        "127.0.0.1:$PORT app:app`), installed from PyPI "
        f"({', '.join(sorted({r for f in FRAMEWORKS for r in f.requirements}))}); "
        "each one's cold start is measured in an environment of its own with the same "
        "packages, filled with bytecode compiled as `pip install` does.",
        "",
    )
    section.table(LATENCY_HEADER, rows)
    cases = {
        "local": local_phases,
        f"polling ({interval:g} s)": polling_phases,
        "deps, code-only": code_phases,
        "deps, dependency change": change_phases,
        **{run.framework.name: run.phases for run in frameworks},
    }
    if all(phases is not None for phases in cases.values()):
        section.add(
            "Where the time goes: each push split at the daemon's own events (its store's "
            "`push`, `deploy` and `live` rows), p50 (min … max) per phase. *Build and "
            "start* contains the service's own cold start.",
            "",
        )
        section.table(
            ["phase", *cases],
            [
                [phase, *(spread(Summary.of(p[index])) for p in cases.values() if p)]
                for index, phase in enumerate(PHASES)
            ],
        )
        if polling_phases is not None and poll_waits:
            fetching = [n - w for n, w in zip(polling_phases[0], poll_waits, strict=True)]
            section.add(
                "On the polling path, *notice* is the wait for the poll that saw the push, "
                f"p50 {spread(Summary.of(poll_waits))} (half the interval is "
                f"{ms(interval / 2)}; negative when the poll started while `git push` was "
                "still running), then `git ls-remote` and the fetch over HTTP, p50 "
                f"{spread(Summary.of(fetching))} (the poll's burst of requests to the git "
                "HTTP server, to the daemon recording the new heads).",
                "",
            )
    else:
        section.add("(No breakdown: the daemon's store did not have the expected events.)", "")
    section.add(
        "Ratios (p50): "
        f"local push-to-live / cold start = {local_s.median / cold.median:.1f}x; "
        f"code-only with deps / its cold start = {code_s.median / cold_deps.median:.1f}x; "
        f"dependency change / code-only = {change_s.median / code_s.median:.1f}x; "
        f"polling p50 - interval/2 = {ms(polling_s.median - interval / 2)}"
        + "".join(
            f"; {run.framework.name} push-to-live / its cold start = "
            f"{run.to_live.median / run.cold.median:.1f}x"
            for run in frameworks
        )
        + ".",
        "",
        f"First deploys (repo add → first answer): stdlib service {ms(first_plain)}, with "
        f"tinydep (creates and fills the environment) {ms(first_deps)}, over HTTP "
        f"{ms(first_polled)}"
        + "".join(
            f", {run.framework.name} (installs from PyPI) {ms(run.first)}" for run in frameworks
        )
        + f". The git HTTP server saw {http_requests} requests.",
        "",
        f"Build logs (`branchyard logs --build depapp` after each commit went live): "
        f"{sum(clean)} of {len(clean)} code-only commits reused the environment and "
        f"installed nothing; {sum(installs)} of {len(installs)} dependency changes installed.",
        "",
        "Yardsticks: Argo CD polls every 3 min by default, Flux users commonly set 1 min; "
        "Rio rebuilt an image per commit, which took minutes.",
        "",
    )
    section.target(
        "local path: overhead p50", ms(local_over.median), "≤ 300 ms", local_over.median <= 0.3
    )
    goal = interval / 2 + 0.3
    section.target(
        f"polling path ({interval:g} s): push-to-live p50",
        ms(polling_s.median),
        f"≤ interval/2 + 300 ms = {ms(goal)}",
        polling_s.median <= goal,
    )
    section.target(
        "with deps, code-only commit: overhead p50",
        ms(code_over.median),
        "≤ 500 ms",
        code_over.median <= 0.5,
    )
    section.target(
        "with deps, code-only commit installs nothing",
        f"{sum(clean)} of {len(clean)}",
        "all",
        all(clean) and bool(clean),
    )
    for run in frameworks:
        section.target(
            f"{run.framework.name}: overhead p50",
            ms(run.overhead.median),
            "≤ 300 ms",
            run.overhead.median <= 0.3,
        )
    section.seconds = time.monotonic() - started
    return section
