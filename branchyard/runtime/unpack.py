"""A revision's checkout: its tree checked by the daemon, then unpacked in a box.

The daemon never unpacks pushed content with its own rights. It checks the
commit's tree from git's objects alone (:mod:`branchyard.trees`: a path twice,
``..`` or ``.git`` in a path, a link out of the checkout, files over the size
limit), makes the revision's directory and gives it to the box user. Then it
runs ``git archive`` itself, into a pipe whose other end a GNU tar (:data:`TAR`)
reads as ``/dev/fd/N`` in a box of its own: as the box user (``nobody`` when
the daemon is root), with the checkout its only writable path, taking no owner
or mode from the archive. Whatever an archive holds and whatever tar's own
flaws, they can write nothing but that directory, and the interpreter's
``tarfile`` (CVE-2025-4517 and its kin, fixed or not in the Python at hand) is
not used at all. The archive passes through the pipe as it is made, never
held whole: a big commit costs the daemon no memory.

A failure of ``git archive`` or of tar fails the revision with one line, and the
directory is removed: nothing half-written stays. Without a sandbox
(``--no-sandbox``) the same tar runs with the daemon's rights; the tree checks
still hold, and GNU tar strips ``..`` and a leading ``/`` from names and makes
links that lead up or out only at the end, but nothing else protects what such
a daemon writes, as nothing protects what it runs.
"""

from __future__ import annotations

import asyncio
import os
import shutil
from pathlib import Path

from branchyard.errors import BranchyardError, BuildFailed
from branchyard.git import Source
from branchyard.runtime.logs import Appender, last_lines, note_command
from branchyard.runtime.processes import LocalProcess, Registry, uninterrupted
from branchyard.runtime.sandbox import Box, Sandbox
from branchyard.trees import Tree

TAR = "/usr/bin/tar"  # by absolute path, as every program a box runs for the daemon
ENV = {"PATH": "/usr/bin:/bin", "LC_ALL": "C"}
_TAR_GAVE_UP = f"{TAR}: Exiting with failure status"


async def check_out(
    source: Source,
    sha: str,
    dest: Path,
    limit: int,
    log: Appender,
    registry: Registry,
    sandbox: Sandbox | None,
) -> Tree:
    """Write the tree of ``sha`` into ``dest`` (which must not exist yet; its parent
    must) once it passed the checks; the tree. BuildFailed saying why, else."""
    tree = await source.tree(sha, limit)
    dest.mkdir()
    try:
        if sandbox is not None:
            sandbox.give(dest)
        await _unpack(source, sha, dest, log, registry, sandbox)
    except BaseException:
        shutil.rmtree(dest, ignore_errors=True)
        raise
    return tree


async def _unpack(
    source: Source, sha: str, dest: Path, log: Appender, registry: Registry, sandbox: Sandbox | None
) -> None:
    read, write = os.pipe()
    try:
        if sandbox is not None:
            sandbox.give(read)  # a pipe is its maker's, 0600: the box user opens /dev/fd/N
        argv = [TAR, "-x", "--no-same-owner", "--no-same-permissions", "-f", f"/dev/fd/{read}"]
        note_command(log, ["git", "archive", "--format=tar", sha, "|", *argv])
        tar = await LocalProcess.spawn(
            argv, dest, ENV, log, registry, "checkout: tar", sandbox, Box((), (dest,)), keep=(read,)
        )
    except BaseException:
        os.close(write)
        raise
    finally:
        os.close(read)  # tar's alone: if it ends, git archive meets a closed pipe and stops
    failures = []
    try:
        try:
            await source.archive(sha, write)
        except BranchyardError as exc:
            failures.append(f"git archive: {exc.message}")
        finally:
            os.close(write)  # tar reads to the end of what git wrote
        code = await tar.wait()
    except BaseException:
        await uninterrupted(asyncio.ensure_future(tar.terminate(0)))
        raise
    if code != 0:
        failures.insert(0, _tar_said(log.path) or f"tar exited {code}")
    if failures:
        raise BuildFailed(f"cannot check out {sha[:7]}: {'; '.join(failures)}")


def _tar_said(log: Path) -> str | None:
    """The first error among the last lines tar wrote to the log (``tar: NAME: why``)."""
    said = [line for line in last_lines(log, 5) if line.startswith(f"{TAR}: ")]
    errors = [line for line in said if not line.startswith(_TAR_GAVE_UP)]
    return "tar: " + errors[0].removeprefix(f"{TAR}: ") if errors else None
