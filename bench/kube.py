"""Part 5, kube: the daemon on the test control plane (``up --runtime kubernetes``).

The part starts the test control plane (scripts/k8s-test-cluster: a real API server,
its controllers and scheduler, and kwok as the node) in its temp directory and stops it
at the end. The daemon runs as deploy/branchyard.yaml would run it: authenticated as its
ServiceAccount (a token from TokenRequest) with its ClusterRole alone, ``--git-listen``
for the local repos, whose Procfile is marked ``sim-ready`` (kwok's pods pass their
readiness probe at once: no container runs, so the figures are branchyard's and the
control plane's, not a service's start).

- **Push to apply, live and routed**: each push of a commit to ``app``, split at the
  daemon's own events (its store, read-only): the ``push`` event (the watcher saw the new
  head) to the ``kubernetes`` event ``applied Deployment app-vN`` (its ConfigMap and
  Deployment applied), to the ``live`` event (the Deployment Available), to the
  ``kubernetes`` event ``Service app ... sends to vN`` (the Service's selector moved).
  Yardstick, same run, same repos: the local runtime's ``push`` to ``live``.
- **API calls per deploy**, counted by the API server: a FlowSchema per verb and
  resource the role grants, each matching the daemon's ServiceAccount (API Priority and
  Fairness), so ``apiserver_flowcontrol_dispatched_requests_total`` counts the daemon's
  requests by verb and resource; ``apiserver_request_total`` (every client) gives what
  the whole control plane served in the same window. Read with the admin kubeconfig
  before and after each deploy, once the daemon's counts stopped moving.
- **Capacity**: ``--kube-namespaces`` namespaces x 3 services (branches made in the bare
  repos, as the capacity part does): the time until all are live, and the daemon's RSS;
  the same repos on the local runtime, in the same run, as the yardstick.
"""

from __future__ import annotations

import argparse
import subprocess
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lightkube import Client, KubeConfig, codecs

from bench.common import (
    ROOT,
    BenchError,
    Daemon,
    ServiceRepo,
    Summary,
    git,
    status_kib,
    threads,
    wait_until,
)
from bench.results import Section, ms, spread
from branchyard.runtime.processes import Ports
from tests import k8s_rbac

SERVICES = ("app", "other_app", "web")
PROCFILE = "web: python -m http.server $PORT  # sim-ready\n"
SCRIPT = ROOT / "scripts" / "k8s-test-cluster"
LIVE_TIMEOUT = 120.0
QUIET_SECONDS = 1.5  # the daemon's counts unchanged this long: its work for a deploy is done
SCHEMA_PREFIX = "bench-"
DISPATCHED = "apiserver_flowcontrol_dispatched_requests_total{"
REQUESTS = "apiserver_request_total{"
MB = 1024 / 1e6  # KiB -> MB


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("kube")
    group.add_argument(
        "--kube-pushes", type=int, default=20, help="kube: pushes timed per runtime (default 20)"
    )
    group.add_argument(
        "--kube-namespaces",
        type=int,
        default=30,
        help="kube: namespaces of 3 services for the capacity figure (default 30)",
    )


# -- the control plane -------------------------------------------------------------


def _cluster(directory: Path) -> Path:
    done = subprocess.run([SCRIPT, "start", directory], capture_output=True, text=True)
    if done.returncode != 0:
        raise BenchError(f"the test control plane did not start: {done.stderr.strip()}")
    return Path(done.stdout.strip())


def _stop_cluster(directory: Path) -> None:
    subprocess.run([SCRIPT, "stop", directory], capture_output=True, check=False)


def _flow_schemas() -> dict[str, tuple[str, str, str]]:
    """A FlowSchema name per (API group, resource, verb) the role grants."""
    return {
        f"{SCHEMA_PREFIX}{verb}-{resource.replace('/', '-')}": (group, resource, verb)
        for group, resource, verb in sorted(k8s_rbac.USED)
    }


def _count_by_schema(admin: Path, account: tuple[str, str]) -> None:
    """FlowSchemas that put each request of the ServiceAccount in a schema of its verb and
    resource, and anything else in ``bench-other``; all at the priority of workloads."""
    namespace, name = account
    subject = {"kind": "ServiceAccount", "serviceAccount": {"namespace": namespace, "name": name}}

    def schema(name: str, precedence: int, rule: dict[str, Any]) -> dict[str, Any]:
        return {
            "apiVersion": "flowcontrol.apiserver.k8s.io/v1",
            "kind": "FlowSchema",
            "metadata": {"name": name},
            "spec": {
                "priorityLevelConfiguration": {"name": "workload-high"},
                "matchingPrecedence": precedence,
                "distinguisherMethod": {"type": "ByUser"},
                "rules": [{"subjects": [subject], **rule}],
            },
        }

    schemas = [
        schema(
            name,
            500,
            {
                "resourceRules": [
                    {
                        "verbs": [verb],
                        "apiGroups": [group],
                        "resources": [resource],
                        "clusterScope": True,
                        "namespaces": ["*"],
                    }
                ]
            },
        )
        for name, (group, resource, verb) in _flow_schemas().items()
    ]
    anything = {"verbs": ["*"], "apiGroups": ["*"], "resources": ["*"], "clusterScope": True}
    everything = {"resourceRules": [{**anything, "namespaces": ["*"]}]}
    everything["nonResourceRules"] = [{"verbs": ["*"], "nonResourceURLs": ["*"]}]
    schemas.append(schema(f"{SCHEMA_PREFIX}other", 600, everything))
    with Client(config=KubeConfig.from_file(admin)) as client:
        k8s_rbac.grant(client)
        for thing in schemas:
            client.apply(codecs.from_dict(thing), field_manager="bench", force=True)


@dataclass(frozen=True)
class Counts:
    """The daemon's requests by (verb, resource), and every client's, at one moment."""

    daemon: Counter[tuple[str, str]]
    everyone: float

    @classmethod
    def read(cls, admin: Path) -> Counts:
        schemas = {name: (verb, resource) for name, (_, resource, verb) in _flow_schemas().items()}
        schemas[f"{SCHEMA_PREFIX}other"] = ("other", "anything else")
        daemon: Counter[tuple[str, str]] = Counter()
        everyone = 0.0
        for line in k8s_rbac.read(admin, "/metrics").decode().splitlines():
            labels, _, value = line.rpartition(" ")
            if line.startswith(DISPATCHED):
                name = labels.split('flow_schema="', 1)[1].split('"', 1)[0]
                if name in schemas:
                    daemon[schemas[name]] += int(float(value))
            elif line.startswith(REQUESTS):
                found = _labels(labels)
                if found["resource"] and found["verb"] != "WATCH":
                    everyone += float(value)
        return cls(daemon, everyone)

    def __sub__(self, before: Counts) -> Counts:
        return Counts(self.daemon - before.daemon, self.everyone - before.everyone)

    @property
    def total(self) -> int:
        return sum(self.daemon.values())


def _labels(series: str) -> dict[str, str]:
    """The labels of one series, ``name{a="1",b=""}`` (no commas or quotes in values)."""
    inside = series.partition("{")[2].removesuffix("}")
    pairs = (pair.split("=", 1) for pair in inside.split(",") if pair)
    return {key: value.strip('"') for key, value in pairs}


def _quiet(admin: Path, before: Counts) -> Counts:
    """What was counted since ``before``, once the daemon's counts stopped moving."""
    last = Counts.read(admin)
    still = time.monotonic()
    deadline = still + 60
    while time.monotonic() - still < QUIET_SECONDS:
        if time.monotonic() > deadline:
            raise BenchError("the daemon's API calls did not settle within 60 s")
        time.sleep(0.25)
        now = Counts.read(admin)
        if now.daemon != last.daemon:
            still = time.monotonic()
        last = now
    return last - before


# -- the daemons -------------------------------------------------------------------


def _kube_daemon(home: Path, kubeconfig: Path, prefix: str) -> Daemon:
    return Daemon.start(
        home,
        *("--runtime", "kubernetes", "--kubeconfig", str(kubeconfig)),
        *("--namespace-prefix", prefix, "--git-listen", f"127.0.0.1:{Ports().take()}"),
        *("--drain-grace", "0", "--build-timeout", "10"),
    )


def _repos(root: Path, namespaces: list[str]) -> list[ServiceRepo]:
    """The sample repos, each with ``namespaces[1:]`` as branches made in the bare repo."""
    repos = []
    for name in SERVICES:
        repo = ServiceRepo.create(root, name, {"Procfile": PROCFILE})
        repo.branch_in_origin(namespaces[1:])
        repos.append(repo)
    return repos


def _fill(daemon: Daemon, repos: list[ServiceRepo], total: int) -> float:
    """Registers the repos; the seconds until ``total`` services are live."""
    began = time.monotonic()
    for repo in repos:
        daemon.add_repo(str(repo.origin))
    wait_until(lambda: daemon.live_count() >= total, 120 + 4 * total, f"{total} live", 0.05)
    return time.monotonic() - began


@dataclass(frozen=True)
class Marks:
    """One push, at the daemon's events (wall clock): pushed, noticed, applied, live,
    routed (the last two the same moment on the local runtime)."""

    pushed: float
    noticed: float
    applied: float
    live: float
    routed: float


def _event_at(
    daemon: Daemon, since: float, kind: str, slot: tuple[str, str] = ("", ""), starts: str = ""
) -> Callable[[], float | None]:
    """When the first event of ``kind`` (for ``slot``, whose message starts with ``starts``)
    since ``since`` was recorded, or None."""

    def find() -> float | None:
        for at, found, namespace, service, message in daemon.events(since):
            if (found, namespace, service) == (kind, *slot) and message.startswith(starts):
                return at
        return None

    return find


def _push(daemon: Daemon, repo: ServiceRepo, branch: str, number: int, where: str | None) -> Marks:
    """Commit, push and wait until the revision is live (and, on Kubernetes, ``where``
    being its Kubernetes namespace, its Service routed)."""
    sha = repo.commit({"change.txt": str(number)}, f"change {number}")
    pushed = time.time()
    repo.push(branch)
    ordinal = wait_until(
        lambda: daemon.live_ordinal(branch, repo.name, sha), LIVE_TIMEOUT, f"{sha[:7]} live", 0.01
    )
    slot = (branch, repo.name)
    noticed = wait_until(_event_at(daemon, pushed, "push", starts=f"{repo.name}:"), 10, "push")
    live = wait_until(_event_at(daemon, pushed, "live", slot), 10, "the live event")
    if where is None:
        return Marks(pushed, noticed, live, live, live)
    applied = f"applied Deployment {repo.name}-v{ordinal} in {where}"
    routed = f"Service {repo.name} in {where} sends to v{ordinal}"
    return Marks(
        pushed,
        noticed,
        wait_until(_event_at(daemon, pushed, "kubernetes", slot, applied), 10, applied),
        live,
        wait_until(_event_at(daemon, pushed, "kubernetes", slot, routed), 30, routed),
    )


def _spans(marks: list[Marks]) -> dict[str, Summary]:
    return {
        "git push → noticed": Summary.of([m.noticed - m.pushed for m in marks]),
        "noticed → applied": Summary.of([m.applied - m.noticed for m in marks]),
        "noticed → live": Summary.of([m.live - m.noticed for m in marks]),
        "noticed → routed": Summary.of([m.routed - m.noticed for m in marks]),
    }


# -- the run -----------------------------------------------------------------------


@dataclass
class Measured:
    """What the run found, filled as it goes."""

    kube_pushes: list[Marks] = field(default_factory=list)
    local_pushes: list[Marks] = field(default_factory=list)
    next_calls: list[Counts] = field(default_factory=list)
    calls: dict[str, Counts] = field(default_factory=dict)  # scenario -> the daemon's calls
    fill: dict[str, float] = field(default_factory=dict)  # runtime -> seconds to all live
    rss: dict[str, tuple[int, int, int]] = field(default_factory=dict)  # (RSS, peak, threads)


FIRST = "first deploy in a new Namespace (`feature` of `app`)"
NEXT = "next deploy there"
ROLLBACK = "rollback there"
PRUNED = "the last push to `main` (retention deletes the oldest revision)"
FILL = "bringing them all up"


def _deploys(admin: Path, sa: Path, workdir: Path, pushes: int, measured: Measured) -> None:
    """Pushes and their calls on Kubernetes, then the same repos' pushes on the local
    runtime."""
    repos = _repos(workdir / "repos", ["main"])
    app = repos[0]
    before = Counts.read(admin)
    with _kube_daemon(workdir / "home-kube", sa, "p-") as daemon:
        _fill(daemon, repos, len(repos))
        _quiet(admin, before)
        for number in range(pushes):
            before = Counts.read(admin)
            measured.kube_pushes.append(_push(daemon, app, "main", number, "p-main"))
            measured.next_calls.append(_quiet(admin, before))
        app.checkout("feature", new=True)
        for number, scenario in enumerate((FIRST, NEXT), start=pushes):
            before = Counts.read(admin)
            _push(daemon, app, "feature", number, "p-feature")
            measured.calls[scenario] = _quiet(admin, before)
        before = Counts.read(admin)
        routed = _event_at(
            daemon, time.time(), "kubernetes", ("feature", app.name), "Service app in p-feature"
        )
        daemon.cli("-n", "feature", "rollback", app.name)
        wait_until(routed, LIVE_TIMEOUT, "the rollback routed")
        measured.calls[ROLLBACK] = _quiet(admin, before)
    app.checkout("main")
    git("push", "-q", "origin", "--delete", "feature", cwd=app.clone)
    with Daemon.start(workdir / "home-local", "--drain-grace", "0") as daemon:
        _fill(daemon, repos, len(repos))
        for number in range(pushes):
            measured.local_pushes.append(_push(daemon, app, "main", 1000 + number, None))


def _capacity(admin: Path, sa: Path, workdir: Path, count: int, measured: Measured) -> None:
    namespaces = ["main", *(f"env-{n:02d}" for n in range(1, count))]
    repos = _repos(workdir / "capacity", namespaces)
    total = len(namespaces) * len(repos)
    before = Counts.read(admin)
    with _kube_daemon(workdir / "home-kube-capacity", sa, "c-") as daemon:
        measured.rss["kubernetes, idle"] = _memory(daemon)
        measured.fill["kubernetes"] = _fill(daemon, repos, total)
        measured.calls[FILL] = _quiet(admin, before)
        measured.rss["kubernetes"] = _memory(daemon)
    with Daemon.start(workdir / "home-local-capacity", "--drain-grace", "0") as daemon:
        measured.rss["local, idle"] = _memory(daemon)
        measured.fill["local"] = _fill(daemon, repos, total)
        time.sleep(2)
        measured.rss["local"] = _memory(daemon)


def _memory(daemon: Daemon) -> tuple[int, int, int]:
    return (
        status_kib(daemon.pid, "VmRSS"),
        status_kib(daemon.pid, "VmHWM"),
        threads(daemon.pid),
    )


def run(args: argparse.Namespace, workdir: Path, command: str) -> Section:
    section = Section("kube", "5. Kubernetes (the test control plane)", command)
    started = time.monotonic()
    workdir.mkdir(parents=True, exist_ok=True)
    cluster = workdir / "cluster"
    admin = _cluster(cluster)
    try:
        _count_by_schema(admin, k8s_rbac.account())
        sa = k8s_rbac.service_account_kubeconfig(admin, workdir / "branchyard.kubeconfig")
        measured = Measured()
        _deploys(admin, sa, workdir, args.kube_pushes, measured)
        _capacity(admin, sa, workdir, args.kube_namespaces, measured)
    finally:
        _stop_cluster(cluster)
    _write(section, measured, args)
    section.seconds = time.monotonic() - started
    return section


def _write(section: Section, measured: Measured, args: argparse.Namespace) -> None:
    kube, local = _spans(measured.kube_pushes), _spans(measured.local_pushes)
    section.add(
        "The daemon runs `up --runtime kubernetes --git-listen ...` against the test control "
        "plane (scripts/k8s-test-cluster: a real kube-apiserver, controller-manager and "
        "scheduler, kwok as the node; no container runs, and pods marked `sim-ready` are "
        "Ready at once), authenticated as deploy/branchyard.yaml's ServiceAccount with its "
        "ClusterRole alone. Three local repos (`app`, `other_app`, `web`, Procfile "
        f"`{PROCFILE.strip()}`); {len(measured.kube_pushes)} commits pushed to `app` on "
        "`main`, each once the one before was routed. The points are the daemon's own "
        "events (its store): `push` (the watcher saw the new head), `kubernetes` `applied "
        "Deployment app-vN in NS` (ConfigMap and Deployment applied), `live` (the "
        "Deployment Available), `kubernetes` `Service app in NS sends to vN` (the Service's "
        "selector moved). Yardstick, same run: the same repos and pushes on the local "
        "runtime (sandboxed), where live and routed are one moment.",
        "",
    )
    section.table(
        ["span, median (min … max)", "Kubernetes", "local runtime"],
        [
            [
                name,
                spread(kube[name]),
                spread(local[name]) if name != "noticed → applied" else "no apply",
            ]
            for name in kube
        ],
    )
    section.add(
        "API calls per deploy, counted by the API server: one FlowSchema per verb and "
        "resource of the role, matching the daemon's ServiceAccount, so "
        "`apiserver_flowcontrol_dispatched_requests_total` counts its requests by verb and "
        "resource (a server-side apply is a `patch`); read with the admin kubeconfig "
        f"before and after, once the daemon's counts had not moved for {QUIET_SECONDS:g} s. "
        "A call that creates a missing object is still a `patch` there (the API server "
        "checks `create` too). The last row is `apiserver_request_total` over the same "
        "window, every client but watches: the daemon, and the controllers, the scheduler "
        "and kwok making and updating the ReplicaSet, the pod, its binding and status, the "
        "Deployment's status, the EndpointSlice.",
        "",
    )
    scenarios = {name: measured.calls[name] for name in (FIRST, NEXT, ROLLBACK)}
    scenarios[PRUNED] = measured.next_calls[-1]
    rows = sorted({key for counts in scenarios.values() for key in counts.daemon})
    table = [
        [f"`{verb}` {resource}", *(str(c.daemon[(verb, resource)]) for c in scenarios.values())]
        for verb, resource in rows
    ]
    table.append(["**the daemon, in all**", *(f"**{c.total}**" for c in scenarios.values())])
    table.append(
        [
            "every client (`apiserver_request_total`)",
            *(f"{c.everyone:.0f}" for c in scenarios.values()),
        ]
    )
    section.table(["calls", *scenarios], table)
    calls = Summary.of([float(c.total) for c in measured.next_calls])
    section.add(
        f"Each of the {calls.n} pushes to `main` (the next deploy of a service whose "
        f"Namespace exists): {calls.median:.0f} calls by the daemon, median "
        f"({calls.low:.0f} … {calls.high:.0f}); the pushes before the slot has more "
        "revisions than retention keeps make the fewest.",
        "",
    )
    total = args.kube_namespaces * len(SERVICES)
    rss = measured.rss
    section.add(
        f"Capacity: {args.kube_namespaces} namespaces x {len(SERVICES)} services = {total} "
        "(branches made in the bare repos, the repos registered through the API), on "
        "Kubernetes and, the yardstick, on the local runtime, one after the other in this "
        "run. RSS is `VmRSS` in MB, right after the daemon started and 2 s after all were live "
        f"({measured.calls[FILL].total} API calls by the daemon to bring {total} up on "
        "Kubernetes).",
        "",
    )
    section.table(
        ["figure", "Kubernetes", "local runtime"],
        [
            [
                f"repo add → all {total} live",
                ms(measured.fill["kubernetes"]),
                ms(measured.fill["local"]),
            ],
            *(
                [
                    label,
                    f"{rss['kubernetes' + when][index] * MB:.1f} MB",
                    f"{rss['local' + when][index] * MB:.1f} MB",
                ]
                for label, when, index in (
                    ("daemon RSS, just started", ", idle", 0),
                    (f"daemon RSS, {total} live", "", 0),
                    ("daemon peak RSS (VmHWM)", "", 1),
                )
            ),
            ["daemon threads", str(rss["kubernetes"][2]), str(rss["local"][2])],
        ],
    )
    section.target(
        f"Kubernetes: daemon RSS with {total} services",
        f"{rss['kubernetes'][0] * MB:.1f} MB",
        "≤ 150 MB",
        rss["kubernetes"][0] * MB <= 150,
    )
