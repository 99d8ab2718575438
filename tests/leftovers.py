"""What a daemon left behind, found by what it made rather than by what it inherited.

A daemon marks each bwrap it starts with its home (``BRANCHYARD_BOX_OF``), records
each process group in its store's process table, puts its boxes in the cgroups
``branchyard-<hash of its home>``, mounts nothing outside its boxes' own mount
namespaces, and gives each box a network namespace. So what is left of it is:
bwraps with its home's mark, recorded groups still running (same pid, same start
time), cgroups of its home, mounts under its home, and the network namespaces its
boxes had (looked up while it ran: :func:`box_namespaces`) still held by a process,
an open file or a mount. A process the test itself passed a variable to is no part
of this: a box's process that escaped every one of these would not be found by an
inherited variable either, since a box's environment is explicit.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
from dataclasses import dataclass
from pathlib import Path

from branchyard.runtime import cgroups
from branchyard.runtime.processes import start_time
from branchyard.runtime.sandbox import MARK


def _pids() -> list[int]:
    return [int(entry.name) for entry in Path("/proc").iterdir() if entry.name.isdigit()]


def boxes(home: Path) -> list[int]:
    """Pids of the bwraps started for ``home`` (its mark in their environment)."""
    mark = f"{MARK}={home.resolve()}".encode()
    found = []
    for pid in _pids():
        with contextlib.suppress(OSError):
            if mark in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
                found.append(pid)
    return found


def recorded(home: Path) -> list[str]:
    """The process groups in ``home``'s process table that still run (what each is)."""
    store = home / "state.db"
    if not store.exists():
        return []
    with contextlib.closing(sqlite3.connect(f"file:{store}?mode=ro", uri=True)) as db:
        rows = db.execute("SELECT pgid, started, what FROM processes").fetchall()
    return [f"{what} (group {pgid})" for pgid, started, what in rows if start_time(pgid) == started]


def home_cgroups(home: Path) -> list[Path]:
    """The cgroups of ``home``'s daemon that are still there (it runs in the tests')."""
    return [parent for parent in cgroups.parents(str(home.resolve())) if parent.exists()]


def _unescaped(point: str) -> str:
    return point.replace("\\040", " ").replace("\\011", "\t").replace("\\134", "\\")


def mounts(home: Path) -> list[str]:
    """Mount points under ``home`` in this mount namespace (one at ``home`` is the test's)."""
    root = home.resolve()
    points = [
        _unescaped(line.split()[4])
        for line in Path("/proc/self/mountinfo").read_text().splitlines()
    ]
    return [point for point in points if root in Path(point).parents]


def _namespace(link: Path) -> str:
    try:
        return os.readlink(link)
    except OSError:
        return ""


def box_namespaces(home: Path) -> dict[str, int]:
    """The network namespaces (``net:[inode]``) of the processes in ``home``'s boxes now:
    those of its bwraps and of the processes in its cgroups, less this machine's own; each
    with a file descriptor of it, held open here. Holding it keeps the namespace, and so
    its inode number, from going to a namespace made later (the kernel hands a freed
    one's number out again)."""
    pids = set(boxes(home))
    for parent in home_cgroups(home):
        for procs in parent.rglob("cgroup.procs"):
            with contextlib.suppress(OSError):
                pids.update(int(pid) for pid in procs.read_text().split())
    own = _namespace(Path("/proc/self/ns/net"))
    found: dict[str, int] = {}
    for pid in pids:
        try:
            fd = os.open(f"/proc/{pid}/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            continue
        name = f"net:[{os.fstat(fd).st_ino}]"
        if name == own or name in found:
            os.close(fd)
        else:
            found[name] = fd
    return found


def held(namespaces: set[str]) -> list[str]:
    """Those of ``namespaces`` still held, each with what holds it: a process in it, an
    open file or a mount (other than this process's own hold: :func:`box_namespaces`)."""
    if not namespaces:
        return []
    found: set[str] = set()
    for pid in set(_pids()) - {os.getpid()}:
        links = [Path(f"/proc/{pid}/ns/net")]
        with contextlib.suppress(OSError):
            links += list(Path(f"/proc/{pid}/fd").iterdir())
        found.update(
            f"{name} by {_described(pid)} ({link.name})"
            for link in links
            if (name := _namespace(link)) in namespaces
        )
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        if line.split()[3] in namespaces:  # a namespace bind-mounted: its root is net:[…]
            found.add(f"{line.split()[3]} mounted at {_unescaped(line.split()[4])}")
    return sorted(found)


def descendants(pid: int) -> dict[int, str]:
    """The processes under ``pid`` now (its children, theirs, ...), with their start times."""
    parents: dict[int, list[int]] = {}
    for child in _pids():
        with contextlib.suppress(OSError, IndexError):
            stat = Path(f"/proc/{child}/stat").read_text()
            parents.setdefault(int(stat.rsplit(")", 1)[1].split()[1]), []).append(child)
    found: dict[int, str] = {}
    todo = list(parents.get(pid, []))
    while todo:
        child = todo.pop()
        if started := start_time(child):  # not gone meanwhile
            found[child] = started
        todo += parents.get(child, [])
    return found


@dataclass(frozen=True)
class Made:
    """What a running daemon has made, looked at just before it is stopped: what runs
    under it, and its boxes' network namespaces (after it stops they are nowhere to be
    looked up), held until :meth:`close`."""

    processes: dict[int, str]
    held_namespaces: dict[str, int]

    @property
    def namespaces(self) -> set[str]:
        return set(self.held_namespaces)

    def close(self) -> None:
        for fd in self.held_namespaces.values():
            os.close(fd)

    @classmethod
    def by(cls, pid: int, home: Path) -> Made:
        return cls(descendants(pid), box_namespaces(home))

    def running(self) -> list[str]:
        """Those of its processes that still run (the same pid, started at the same time)."""
        return [
            _described(pid) for pid, started in self.processes.items() if start_time(pid) == started
        ]


NOTHING_MADE = Made({}, {})


def left_behind(home: Path, made: Made = NOTHING_MADE) -> dict[str, list[str]]:
    """What is left of ``home``'s daemons (and of what one of them ``made``), by kind;
    nothing left is an empty dict."""
    left = {
        "processes it ran": made.running(),
        "bwraps with the home's mark": [_described(pid) for pid in boxes(home)],
        "recorded process groups": recorded(home),
        "cgroups": [str(cgroup) for cgroup in home_cgroups(home)],
        "mounts": mounts(home),
        "network namespaces": held(made.namespaces),
    }
    return {kind: found for kind, found in left.items() if found}


def _described(pid: int) -> str:
    try:
        return f"{pid}: " + Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return str(pid)
