"""Each box has its own memory, process and CPU limits in a cgroup of its own (real
cgroups: the tests run as root, as the daemon does), so one push cannot starve the
rest; the kernel takes a box before the daemon; no cgroup outlives its daemon."""

from __future__ import annotations

import http.client
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from branchyard.runtime.cgroups import Cgroups, Hierarchy, Limits, hierarchies, settings
from tests.conftest import (
    Daemon,
    ServiceRepo,
    processes_with,
    start_daemon,
    stdlib_service,
    stop_cleanly,
    wait_for,
)
from tests.leftovers import home_cgroups

SERVING = """\
import json, os
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

{before}

class Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_GET(self):
        {on_get}
        body = json.dumps({{"env": {{"PORT": os.environ["PORT"]}}, "said": said}}).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

ThreadingHTTPServer(("127.0.0.1", int(os.environ["PORT"])), Handler).serve_forever()
"""
HOG = SERVING.format(
    before="said = 'nothing'",
    on_get=(
        "global said\n"
        "        if self.path == '/hog':\n"
        "            said = len(b'x' * (1024 ** 3))  # a GiB, every page written"
    ),
)
FORKER = SERVING.format(
    before=(
        "import subprocess\n"
        "children = []\n"
        "for _ in range(3000):\n"
        "    try:\n"
        "        children.append(subprocess.Popen(['sleep', '600']))\n"
        "    except OSError:\n"
        "        break\n"
        "said = len(children)\n"
        "for child in children[:20]:  # room for the server's threads\n"
        "    child.kill()\n"
        "    child.wait()"
    ),
    on_get="pass",
)


BUSY = 'import os; os.fork(); exec("while True: pass")'  # two busy loops, one core at most


def deploy(daemon: Daemon, repo: ServiceRepo, namespace: str) -> dict[str, Any]:
    """``repo`` registered and its branch ``namespace`` pushed; what it answers once live."""
    daemon.cli("repo", "add", str(repo.origin))
    if namespace != "main":
        repo.checkout(namespace)
        repo.push(namespace)
    return wait_for(lambda: daemon.answer(repo.name, namespace), 60, f"{repo.name} live")


def cgroup_of(pid: int, controller: str) -> Path:
    """The directory of the cgroup ``pid`` is in, in ``controller``'s hierarchy (mounted
    here: a box has no /sys)."""
    own = Path(f"/proc/{pid}/cgroup").read_text()
    for hierarchy in hierarchies(Path("/proc/self/mountinfo").read_text(), own):
        if controller in hierarchy.controllers and hierarchy.version == 1:
            return hierarchy.directory()
    raise AssertionError(f"no {controller} hierarchy for {pid}")


def busy_pid(daemon: Daemon) -> int:
    for pid in processes_with(daemon.marker):
        try:
            if b"while True" in Path(f"/proc/{pid}/cmdline").read_bytes():
                return pid
        except OSError:
            continue
    raise AssertionError("no busy loop runs")


def status_of(daemon: Daemon, host: str, path: str) -> int | None:
    try:
        return daemon.get(host, path)[0]
    except (OSError, http.client.HTTPException):
        return None


def test_a_box_over_its_memory_is_killed_while_the_daemon_and_other_namespaces_serve(
    daemon: Daemon, make_repo: Callable[..., ServiceRepo]
) -> None:
    deploy(daemon, make_repo("app"), "main")
    hog = make_repo("hog", stdlib_service(**{"app.py": HOG, "branchyard.yaml": "memory: 64Mi\n"}))
    deploy(daemon, hog, "evil")
    box = cgroup_of(daemon.host_pid("hog", "evil"), "memory")
    assert (box / "memory.limit_in_bytes").read_text() == f"{64 * 1024**2}\n"
    assert (box / "memory.memsw.limit_in_bytes").read_text() == f"{64 * 1024**2}\n"

    assert status_of(daemon, "hog.evil.localhost", "/hog") != 200, "it never got its GiB"
    wait_for(
        lambda: (
            "branchyard: out of memory: the kernel killed a process of this box at its "
            "limit of 64 MiB" in daemon.cli("-n", "evil", "logs", "hog").stdout
        ),
        30,
        "the log says why",
    )
    assert daemon.process.poll() is None
    assert daemon.answer("app")["env"]["BRANCHYARD_SERVICE"] == "app"  # SERVICE's env
    wait_for(lambda: daemon.row("evil", "hog")["restarts"] >= 1, 30, "hog restarted")
    wait_for(lambda: daemon.answer("hog", "evil")["said"] == "nothing", 30, "hog serves again")


def test_a_box_forking_thousands_stops_at_its_own_limit_and_another_still_deploys(
    tmp_path: Path, make_repo: Callable[..., ServiceRepo]
) -> None:
    daemon = start_daemon(tmp_path / "home", "--box-processes", "200")
    try:
        forker = make_repo("forker", stdlib_service(**{"app.py": FORKER}))
        forked = deploy(daemon, forker, "evil")["said"]
        assert isinstance(forked, int) and 150 < forked < 200, forked
        app = deploy(daemon, make_repo("app"), "main")
        assert app["env"]["PORT"]
        box = cgroup_of(daemon.host_pid("forker", "evil"), "pids")
        assert (box / "pids.max").read_text() == "200\n"
    finally:
        stop_cleanly(daemon)


def test_a_busy_box_has_the_cpu_share_its_yaml_says_and_the_kernel_takes_it_first(
    daemon: Daemon, make_repo: Callable[..., ServiceRepo]
) -> None:
    busy = make_repo(
        "busy",
        stdlib_service(
            Procfile=f"web: python app.py\nworker: python -c '{BUSY}'\n",
            **{"branchyard.yaml": "cpu: 500m\n"},
        ),
    )
    deploy(daemon, busy, "main")
    pid = wait_for(lambda: busy_pid(daemon), 15, "the busy loop")
    box = cgroup_of(pid, "cpu")
    assert box.parent == cgroup_of(daemon.process.pid, "cpu") / box.parent.name
    assert str(pid) in (box / "tasks").read_text().split()
    assert (box / "cpu.cfs_period_us").read_text() == "100000\n"
    assert (box / "cpu.cfs_quota_us").read_text() == "50000\n"  # half a core, as it says
    wait_for(
        lambda: (
            int(
                dict(line.split() for line in (box / "cpu.stat").read_text().splitlines())[
                    "nr_throttled"
                ]
            )
            > 0
        ),
        30,
        "the kernel throttles the busy box",
    )
    daemons = int(Path(f"/proc/{daemon.process.pid}/oom_score_adj").read_text())
    boxes = int(Path(f"/proc/{pid}/oom_score_adj").read_text())
    assert daemons < boxes == 1000
    info = daemon.cli("info").stdout  # the defaults, for boxes whose yaml says nothing
    assert "limits  memory 512 MiB, 1024 processes, 1 CPU per box\n" in info


def test_the_next_daemon_removes_the_cgroups_a_killed_one_left(
    tmp_path: Path, make_repo: Callable[..., ServiceRepo]
) -> None:
    home = tmp_path / "home"
    first = start_daemon(home)
    deploy(first, make_repo("app"), "main")
    boxes = [box for parent in home_cgroups(home) for box in parent.iterdir() if box.is_dir()]
    assert boxes
    first.kill()
    assert all(box.exists() for box in boxes), "nothing removed them"
    second = start_daemon(home)
    try:
        wait_for(lambda: second.answer("app"), 60, "app live again")
        assert not [box for box in boxes if box.exists()]
    finally:
        stop_cleanly(second)


V1 = "32 31 0:29 / /sys/fs/cgroup/{name} rw,relatime - cgroup cgroup rw,{name}"
MOUNTS = "\n".join(
    [
        "31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755",
        V1.format(name="cpu,cpuacct"),
        V1.format(name="memory"),
        V1.format(name="devices"),
        "39 31 0:36 /lxc/box /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids",
        "41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw",
    ]
)
OWN = "\n".join(
    ["4:memory:/session/7", "3:pids:/lxc/box/inner", "2:cpu,cpuacct:/", "1:devices:/", "0::/s"]
)


def test_the_hierarchies_with_our_controllers_are_found_with_the_daemons_cgroup_in_each() -> None:
    assert hierarchies(MOUNTS, OWN) == [
        Hierarchy(Path("/sys/fs/cgroup/cpu,cpuacct"), 1, frozenset({"cpu"}), "/"),
        Hierarchy(Path("/sys/fs/cgroup/memory"), 1, frozenset({"memory"}), "/session/7"),
        Hierarchy(Path("/sys/fs/cgroup/pids"), 1, frozenset({"pids"}), "/inner"),
        Hierarchy(Path("/sys/fs/cgroup/unified"), 2, frozenset({"memory", "pids", "cpu"}), "/s"),
    ]
    outside = OWN.replace("/lxc/box/inner", "/elsewhere")
    assert [h.mount.name for h in hierarchies(MOUNTS, outside)] == [
        "cpu,cpuacct",
        "memory",
        "unified",
    ]


LIMITS = Limits(memory=64 * 1024**2, processes=300, cpu=0.5)


@pytest.mark.parametrize(
    ("version", "controller", "expected"),
    [
        (
            1,
            "memory",
            [
                ("memory.limit_in_bytes", "67108864", True),
                ("memory.memsw.limit_in_bytes", "67108864", False),
            ],
        ),
        (1, "pids", [("pids.max", "300", True)]),
        (1, "cpu", [("cpu.cfs_period_us", "100000", True), ("cpu.cfs_quota_us", "50000", True)]),
        (2, "memory", [("memory.max", "67108864", True), ("memory.swap.max", "0", False)]),
        (2, "pids", [("pids.max", "300", True)]),
        (2, "cpu", [("cpu.max", "50000 100000", True)]),
    ],
)
def test_the_limits_are_written_to_each_controllers_files(
    version: int, controller: str, expected: list[tuple[str, str, bool]]
) -> None:
    assert settings(version, controller, LIMITS) == expected


@pytest.mark.parametrize(
    ("controllers", "said"),
    [
        (
            {"memory", "pids", "cpu"},
            "memory 64 MiB, 300 processes, 0.5 CPU per box",
        ),
        (
            {"pids"},
            "300 processes per box; no memory cgroup here: a box's memory is not capped; "
            "no cpu cgroup here: a box's CPU is not bounded",
        ),
        (
            set(),
            "no memory cgroup here: a box's memory is not capped; no pids cgroup here: "
            "a box's processes are not counted; no cpu cgroup here: a box's CPU is not bounded",
        ),
    ],
)
def test_what_cannot_be_limited_here_is_said_in_one_line(controllers: set[str], said: str) -> None:
    found = {
        Path(f"/cg/{name}"): Hierarchy(Path(f"/cg/{name}"), 1, frozenset({name}), "/")
        for name in controllers
    }
    assert Cgroups(found, LIMITS).describe() == said
