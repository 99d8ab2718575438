"""A cgroup per box: its memory, its processes and its CPU bounded, as a pod's are.

Without them one push can starve the machine: all boxes run as one user, whose
process rlimit they share; a box's memory is capped by nothing, and the daemon,
the biggest process, is what the OOM killer takes first.

Each home's daemon owns one parent cgroup, ``branchyard-HASH`` (the hash of the
home's path), below its own cgroup in every hierarchy that holds one of
:data:`CONTROLLERS`: the cgroup v1 controllers, each mounted on its own, and
cgroup v2, where the daemon's cgroup hands those controllers down. Every box gets a
child there (:meth:`Cgroups.confine`), made and limited before anything pushed runs
in it: ``processes.LocalProcess.spawn`` moves the box's outer bwrap and what it
already forked into it before it opens the box's gate. A box's children are born
in it. When the box ends, whatever is left in its cgroup is killed and the cgroup
removed (:meth:`Cgroup.remove`); the next daemon of a home removes what a killed
one left (:meth:`Cgroups.clear`), and a daemon that stops removes its parent.

Each box's ``oom_score_adj`` is raised to :data:`BOX_OOM_SCORE_ADJ`, so that when
the whole machine runs short, the kernel takes boxes before the daemon: raising it
needs no capability (lowering the daemon's would need ``CAP_SYS_RESOURCE``).

What a machine lacks (a hierarchy not mounted, a daemon not allowed to write there)
is left unlimited and said by :meth:`Cgroups.describe`, which ``up`` logs and
``info`` shows.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import logging
import os
import signal
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

CONTROLLERS = ("memory", "pids", "cpu")
MiB = 1024 * 1024
DEFAULT_MEMORY = 512 * MiB
DEFAULT_PROCESSES = 1024  # tasks: threads count
DEFAULT_CPU = 1.0  # cores
CPU_PERIOD = 100_000  # microseconds
BOX_OOM_SCORE_ADJ = 1000
REMOVE_TRIES = 500  # of 10 ms: what is killed in a cgroup takes a moment to leave it
_UNBOUNDED = {
    "memory": "a box's memory is not capped",
    "pids": "a box's processes are not counted",
    "cpu": "a box's CPU is not bounded",
}


@dataclass(frozen=True)
class Limits:
    """What one box may use."""

    memory: int = DEFAULT_MEMORY  # bytes, swap included
    processes: int = DEFAULT_PROCESSES
    cpu: float = DEFAULT_CPU  # cores


@dataclass(frozen=True)
class Hierarchy:
    """A mounted cgroup hierarchy: where, its version, which of our controllers it
    holds, and the daemon's own cgroup in it (from its root)."""

    mount: Path
    version: int
    controllers: frozenset[str]
    own: str

    def directory(self) -> Path:
        return self.mount / self.own.lstrip("/")


def hierarchies(mountinfo: str, own_cgroups: str) -> list[Hierarchy]:
    """The hierarchies of ``/proc/self/mountinfo`` holding one of :data:`CONTROLLERS`
    (all of v2's are candidates), with the process's cgroup in each from
    ``/proc/self/cgroup``. A mount of a part of a hierarchy that does not hold the
    process's cgroup is skipped."""
    own: dict[frozenset[str], str] = {}
    for line in own_cgroups.splitlines():
        _, names, where = line.split(":", 2)
        own[frozenset(names.split(",")) if names else frozenset()] = where
    found = []
    for line in mountinfo.splitlines():
        fields = line.split()
        if "-" not in fields:
            continue
        dash = fields.index("-")
        root, point, kind = fields[3], fields[4], fields[dash + 1]
        options = set(fields[dash + 3].split(",")) if len(fields) > dash + 3 else set()
        path: str | None
        if kind == "cgroup":
            ours = frozenset(options & set(CONTROLLERS))
            path = next((p for names, p in own.items() if names and names <= options), None)
            version = 1
        elif kind == "cgroup2":
            ours, path, version = frozenset(CONTROLLERS), own.get(frozenset()), 2
        else:
            continue
        if not ours or path is None or not (path + "/").startswith(root.rstrip("/") + "/"):
            continue
        relative = path[len(root.rstrip("/")) :] or "/"
        found.append(Hierarchy(Path(point), version, ours, relative))
    return found


def settings(version: int, controller: str, limits: Limits) -> list[tuple[str, str, bool]]:
    """The files that set ``limits`` in one controller's cgroup: (name, value, required);
    one not required is written where the kernel has it (swap accounting)."""
    quota = max(1000, round(limits.cpu * CPU_PERIOD))
    table: dict[tuple[int, str], list[tuple[str, str, bool]]] = {
        (1, "memory"): [
            ("memory.limit_in_bytes", str(limits.memory), True),
            ("memory.memsw.limit_in_bytes", str(limits.memory), False),
        ],
        (1, "pids"): [("pids.max", str(limits.processes), True)],
        (1, "cpu"): [
            ("cpu.cfs_period_us", str(CPU_PERIOD), True),
            ("cpu.cfs_quota_us", str(quota), True),
        ],
        (2, "memory"): [
            ("memory.max", str(limits.memory), True),
            ("memory.swap.max", "0", False),
        ],
        (2, "pids"): [("pids.max", str(limits.processes), True)],
        (2, "cpu"): [("cpu.max", f"{quota} {CPU_PERIOD}", True)],
    }
    return table[version, controller]


def parent_name(owner: str) -> str:
    """The name of the parent cgroup of the boxes the daemon of ``owner`` (a home's
    absolute path) starts."""
    return "branchyard-" + hashlib.sha256(owner.encode()).hexdigest()[:12]


def parents(owner: str, pid: int | str = "self") -> list[Path]:
    """Where the parent cgroups of ``owner`` are for a daemon with ``pid``, whether they
    exist or not (the tests look there for what is left)."""
    found = hierarchies(
        Path(f"/proc/{pid}/mountinfo").read_text(), Path(f"/proc/{pid}/cgroup").read_text()
    )
    return [h.directory() / parent_name(owner) for h in found]


def _write(path: Path, value: str) -> None:
    with path.open("w") as file:
        file.write(value)


def _members(directory: Path) -> list[int]:
    try:
        return [int(pid) for pid in (directory / "cgroup.procs").read_text().split()]
    except OSError:
        return []


def _children(pids: Iterable[int]) -> list[int]:
    """The processes whose parent is one of ``pids``."""
    wanted = set(pids)
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            parent = int(entry.joinpath("stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        if parent in wanted:
            found.append(int(entry.name))
    return found


class Cgroup:
    """One box's cgroup, in each controller; :meth:`remove` when the box has ended."""

    def __init__(self, directories: Sequence[Path], limits: Limits) -> None:
        self.directories = tuple(directories)
        self.limits = limits

    def out_of_memory(self) -> bool:
        """Whether the kernel killed a process here for going over the memory limit."""
        for directory in self.directories:
            for name in ("memory.oom_control", "memory.events"):
                with contextlib.suppress(OSError):
                    for line in (directory / name).read_text().splitlines():
                        key, _, count = line.partition(" ")
                        if key == "oom_kill" and count.strip() not in ("", "0"):
                            return True
        return False

    async def remove(self) -> bool:
        """Kill what is left in the cgroup and remove it; False if it could not be (the
        next daemon removes it)."""
        return await _remove(self.directories)


async def _remove(directories: Sequence[Path]) -> bool:
    left = [d for d in directories if d.exists()]
    for _ in range(REMOVE_TRIES):
        for directory in left:
            for pid in _members(directory):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        still = []
        for directory in left:
            try:
                directory.rmdir()
            except FileNotFoundError:
                pass
            except OSError:
                still.append(directory)
        left = still
        if not left:
            return True
        await asyncio.sleep(0.01)
    logger.warning("cannot remove the cgroups %s", ", ".join(map(str, left)))
    return False


class Cgroups:
    """The parent cgroups of one home's boxes (see the module's docstring)."""

    def __init__(self, parents: dict[Path, Hierarchy], defaults: Limits = Limits()) -> None:
        self._parents = parents
        self.defaults = defaults
        self._numbers = itertools.count(1)

    @classmethod
    def detect(cls, owner: str, defaults: Limits = Limits()) -> Cgroups:
        """The parents of ``owner``'s boxes, made in each hierarchy where the daemon
        may make them; a hierarchy where it may not is left out."""
        try:
            found = hierarchies(
                Path("/proc/self/mountinfo").read_text(), Path("/proc/self/cgroup").read_text()
            )
        except OSError:
            found = []
        made: dict[Path, Hierarchy] = {}
        for hierarchy in found:
            parent = hierarchy.directory() / parent_name(owner)
            try:
                parent.mkdir(exist_ok=True)
                if hierarchy.version == 2:
                    hierarchy = _delegate(parent, hierarchy)
            except OSError:
                continue
            if hierarchy.controllers:
                made[parent] = hierarchy
            else:
                with contextlib.suppress(OSError):
                    parent.rmdir()
        return cls(made, defaults)

    @property
    def controllers(self) -> frozenset[str]:
        return frozenset(c for h in self._parents.values() for c in h.controllers)

    def describe(self) -> str:
        """One line: what is limited per box, and what this machine cannot limit."""
        have = self.controllers
        limits = self.defaults
        said = {
            "memory": f"memory {limits.memory // MiB} MiB",
            "pids": f"{limits.processes} processes",
            "cpu": f"{limits.cpu:g} CPU",
        }
        parts = [", ".join(said[c] for c in CONTROLLERS if c in have) + " per box"] if have else []
        parts += [f"no {c} cgroup here: {_UNBOUNDED[c]}" for c in CONTROLLERS if c not in have]
        return "; ".join(parts)

    def confine(self, pids: Sequence[int], limits: Limits | None = None) -> Cgroup:
        """A new cgroup with ``limits`` (the defaults unless given) holding ``pids``
        and every process they forked, whose ``oom_score_adj`` is raised."""
        limits = limits or self.defaults
        name = f"box-{next(self._numbers)}-{pids[0]}"
        directories = []
        for parent, hierarchy in self._parents.items():
            directory = parent / name
            directory.mkdir()
            directories.append(directory)
            for controller in hierarchy.controllers:
                for file, value, required in settings(hierarchy.version, controller, limits):
                    if required or (directory / file).exists():
                        _write(directory / file, value)
        cgroup = Cgroup(directories, limits)
        moving = list(pids)
        while moving:  # parents first: what they fork after their move is born inside
            for pid in moving:
                with contextlib.suppress(ProcessLookupError, FileNotFoundError):
                    for directory in directories:
                        _write(directory / "cgroup.procs", str(pid))
                    _write(Path(f"/proc/{pid}/oom_score_adj"), str(BOX_OOM_SCORE_ADJ))
            moving = [pid for pid in _children(moving) if pid not in pids]
            pids = [*pids, *moving]
        return cgroup

    async def clear(self) -> int:
        """Remove the cgroups a daemon of this home left, killing what still runs in
        them; how many."""
        left = sorted({d.name for parent in self._parents for d in parent.iterdir() if d.is_dir()})
        for name in left:
            await _remove([parent / name for parent in self._parents])
        return len(left)

    async def close(self) -> None:
        """Remove the parents (once every box has ended)."""
        await self.clear()
        await _remove(list(self._parents))


def _delegate(parent: Path, hierarchy: Hierarchy) -> Hierarchy:
    """``hierarchy`` (v2) with the controllers its parent cgroup can hand to the boxes'
    (those the daemon's own cgroup hands down), enabled for them."""
    available = set((parent / "cgroup.controllers").read_text().split())
    ours = frozenset(c for c in hierarchy.controllers if c in available)
    if ours:
        _write(parent / "cgroup.subtree_control", " ".join(f"+{c}" for c in sorted(ours)))
    return Hierarchy(hierarchy.mount, 2, ours, hierarchy.own)
