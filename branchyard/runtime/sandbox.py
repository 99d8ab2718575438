"""The box each piece of pushed code runs in: bubblewrap, as a pod is boxed on Kubernetes.

Whoever can push a branch runs code here (docs/security.md). Every service
process, build step and dependency install runs under ``bwrap`` with its own PID
and IPC namespaces, a private /tmp, a read-only view of the system (/usr, the
parts of /etc programs need, the Python the environments link to), and of the
home only what it is given (:class:`Box`): its checkout, its environment, its
scratch area. Its /tmp is a tmpfs of :data:`TMP_SIZE` bytes at most, whose pages
count against the box's memory cgroup as well (see ``cgroups``). Paths are bound at
the place they have outside, so what a venv records (its interpreter, its scripts'
shebangs) holds inside. The network is
shared: services bind ``$PORT`` on loopback and reach their peers through it.

As root, bwrap sets the box up (mounts need it), then ``setpriv`` drops to
:data:`BOX_USER` (``nobody``, which every Linux has) with no capabilities and no
way to gain one; as any other user, bwrap makes a user namespace and the box
runs as that user. The parents of a bound path are made 0755 inside the box
(bwrap would copy the host's modes, and /root is 0700, whatever the umask), so
the box user reaches what it is given and nothing beside it.

Nothing outlives its box. ``--new-session`` puts the box's init and what it
runs in a session whose id is the init's pid (``--info-fd`` reports it):
signalling that group stops the service while the outer bwrap waits for its
exit code. ``--die-with-parent`` and the PID namespace end the box when its
parent, the daemon, dies, even by ``kill -9``: processes that called ``setsid``
or forked twice die with the namespace's init.

Not while the box is being set up, though: its init asks for its parent-death
signal only at the end of the set-up, and waits in the middle of it for the
outer bwrap's go-ahead, which never comes if the outer bwrap died with the
daemon meanwhile. So each bwrap carries :data:`MARK` in its own environment (not
the box's), naming the home it was started for (``Sandbox.owner``), and the next
daemon kills whatever still carries it (``processes.reap_boxes``).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from branchyard.errors import UsageError

BOX_USER = 65534  # nobody / nogroup
MARK = "BRANCHYARD_BOX_OF"  # in bwrap's environment, not the box's: the home it was started for
# By absolute path: the box's PATH starts with the environment's bin, which pushed code fills.
PRLIMIT = "/usr/bin/prlimit"
SETPRIV = "/usr/bin/setpriv"
LIMITS = (("nofile", 4096), ("nproc", 4096), ("core", 0))
TMP_SIZE = 256 * 1024 * 1024
# What programs read from /etc: users and groups, name resolution, TLS roots, time, linker.
ETC = (
    "passwd",
    "group",
    "hosts",
    "host.conf",
    "resolv.conf",
    "nsswitch.conf",
    "gai.conf",
    "services",
    "protocols",
    "ssl",
    "ca-certificates",
    "ca-certificates.conf",
    "localtime",
    "timezone",
    "alternatives",
    "ld.so.cache",
    "ld.so.conf",
    "ld.so.conf.d",
    "mime.types",
    "os-release",
)
TOP_LEVEL = ("bin", "sbin", "lib", "lib32", "lib64", "libx32")
_MOUNTED = (Path("/"), Path("/tmp"))  # made by bwrap with their own modes (/tmp: 1777)
INSTALL_HINT = (
    "install bubblewrap (apt-get install bubblewrap) or run `branchyard up --no-sandbox` "
    "to run pushed code unsandboxed"
)


@dataclass(frozen=True)
class Box:
    """What one boxed process gets of the machine beyond the system, each at its own path."""

    read_only: tuple[Path, ...] = ()
    writable: tuple[Path, ...] = ()
    home: Path = Path("/tmp")  # its HOME inside


NOTHING = Box()


class Attachment(Protocol):
    async def close(self) -> None: ...


class Network(Protocol):
    """A box's own network (``boxnet``): what its environment says of it, and the
    addresses the daemon opens inside it once it is set up."""

    @property
    def variables(self) -> Mapping[str, str]: ...

    async def attach(self, pid: int, env: Mapping[str, str]) -> Attachment: ...


@dataclass(frozen=True)
class Sandbox:
    bwrap: str
    system: tuple[str, ...]  # bwrap arguments binding the read-only system
    system_paths: tuple[Path, ...]  # where those mounts are
    user: int | None  # the uid and gid to drop to (as root); None: stay the daemon's user
    owner: str = ""  # the home (its absolute path) whose daemon starts these boxes
    network: Network | None = None  # a network namespace per box; None: the host's
    rlimits: tuple[tuple[str, int], ...] = LIMITS  # without nproc where a cgroup counts them
    tmp_size: int = TMP_SIZE  # bytes the box's /tmp holds (its pages count as its memory too)

    def environment(self, env: dict[str, str]) -> dict[str, str]:
        """bwrap's environment: ``env`` and the way out of the box's own network, which
        the box gets, and the mark, which it does not."""
        network = self.network.variables if self.network is not None else {}
        return {**env, **network, MARK: self.owner}

    def command(self, argv: Sequence[str], cwd: Path, box: Box, info_fd: int) -> list[str]:
        """The bwrap command line that runs ``argv`` in ``cwd`` inside ``box``."""
        drop = (
            [
                SETPRIV,
                f"--reuid={self.user}",
                f"--regid={self.user}",
                "--clear-groups",
                "--inh-caps=-all",
                "--no-new-privs",
                "--",
            ]
            if self.user is not None
            else []
        )
        return [
            self.bwrap,
            "--die-with-parent",
            "--new-session",
            "--unshare-pid",
            "--unshare-ipc",
            "--unshare-uts",
            "--unshare-cgroup-try",
            *(["--unshare-net"] if self.network is not None else []),
            *(["--unshare-user"] if self.user is None else []),
            "--info-fd",
            str(info_fd),
            *self.system,
            "--proc",
            "/proc",
            "--dev",
            "/dev",
            "--perms",
            "1777",
            "--size",
            str(self.tmp_size),
            "--tmpfs",
            "/tmp",
            *_reachable([*box.read_only, *box.writable], self.system_paths),
            *(a for path in box.read_only for a in ("--ro-bind", str(path), str(path))),
            *(a for path in box.writable for a in ("--bind", str(path), str(path))),
            "--chdir",
            str(cwd),
            "--setenv",
            "HOME",
            str(box.home),
            "--setenv",
            "TMPDIR",
            "/tmp",
            "--unsetenv",
            MARK,
            *(
                ["--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID"]
                if self.user is not None
                else []
            ),
            "--",
            PRLIMIT,
            *(f"--{name}={value}" for name, value in self.rlimits),
            *drop,
            *argv,
        ]

    def give(self, path: Path | int) -> None:
        """Make ``path`` (or the open file ``path`` names: a pipe) the box user's, for it
        to write in (or to open as ``/dev/fd/N``: a pipe is its maker's, mode 0600)."""
        if self.user is not None:
            os.chown(path, self.user, self.user)

    def describe(self) -> str:
        who = f"uid {self.user}" if self.user is not None else "the daemon's user"
        network = (
            "its own network"
            if self.network is not None
            else "the host's network (a network per box needs a root daemon)"
        )
        return f"bubblewrap: each process in its own box, as {who}, with {network}"


def _reachable(paths: Sequence[Path], system: Sequence[Path]) -> list[str]:
    """bwrap arguments making the directories above ``paths`` 0755, outermost first."""
    seen: dict[Path, None] = {}
    for path in paths:
        for parent in reversed(path.parents):
            if parent not in _MOUNTED and not any(parent.is_relative_to(s) for s in system):
                seen.setdefault(parent, None)
    parents = sorted(seen, key=lambda p: len(p.parts))
    return [a for parent in parents for a in ("--perms", "0755", "--dir", str(parent))]


def system_binds(root: Path, python_prefix: Path) -> tuple[list[str], list[Path]]:
    """The bwrap arguments that show the system read-only, and where they mount.

    /usr, the top-level links into it (or the directories, on a system not merged
    into /usr), what programs need of /etc, and the Python the environments link to.
    """
    args = ["--ro-bind", "/usr", "/usr"]
    paths = [Path("/usr")]
    for name in TOP_LEVEL:
        host = root / name
        if host.is_symlink():
            args += ["--symlink", os.readlink(host), f"/{name}"]
        elif host.is_dir():
            args += ["--ro-bind", f"/{name}", f"/{name}"]
            paths.append(Path(f"/{name}"))
    args += ["--perms", "0755", "--dir", "/etc"]  # else as on the host, which may be 0700
    for name in ETC:
        args += ["--ro-bind-try", f"/etc/{name}", f"/etc/{name}"]
    if not any(python_prefix.is_relative_to(p) for p in paths):
        args += _reachable([python_prefix], paths)
        args += ["--ro-bind", str(python_prefix), str(python_prefix)]
        paths.append(python_prefix)
    return args, paths


def detect() -> Sandbox:
    """The sandbox of this machine, tried once; UsageError saying what to do if none runs."""
    bwrap = shutil.which("bwrap")
    if bwrap is None:
        raise UsageError(f"bubblewrap (bwrap) is not installed: {INSTALL_HINT}")
    args, paths = system_binds(Path("/"), Path(sys.base_prefix))
    sandbox = Sandbox(bwrap, tuple(args), tuple(paths), BOX_USER if os.geteuid() == 0 else None)
    read, write = os.pipe()
    try:
        trial = subprocess.run(
            sandbox.command(["true"], Path("/"), NOTHING, write),
            pass_fds=(write,),
            capture_output=True,
            text=True,
            check=False,
        )
    finally:
        os.close(read)
        os.close(write)
    if trial.returncode != 0:
        why = " ".join(trial.stderr.split()) or f"exit {trial.returncode}"
        raise UsageError(f"bubblewrap cannot make a sandbox here ({why}): {INSTALL_HINT}")
    return sandbox
