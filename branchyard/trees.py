"""What a pushed commit's tree may hold: decided from git's listing, before anything is written.

A default bare repository takes any tree a push brings (``receive.fsckObjects``
is off), and ``git archive`` writes what the tree holds as it is. A tree with
two entries of one name (a symlink ``a`` and a directory ``a``: git fsck's
``duplicateEntries``) makes an archive whose extraction follows the link out of
its directory (CVE-2025-4517 in Python's ``tarfile``). So the daemon reads the
tree (``git ls-tree -r -t -z --long --full-tree``, parsed by
:func:`parse_ls_tree`) and refuses, with a one-line reason naming the path:

- a path twice;
- a path component that is empty, ``.``, ``..`` or ``.git`` (in any case: a
  checkout on a case-insensitive file system takes ``.GIT`` for ``.git``);
- a symlink whose target is absolute, or leads out of the checkout once it is
  resolved against the link's directory, through the tree's other links
  (:func:`link_refusal`);
- files that add up to more than a limit (:data:`MAX_CHECKOUT`): a 1.5 GB file
  compresses to a few MB in a push.

Nothing here reads git or the disk: :class:`branchyard.git.Source` does, and
hands the listing and the link targets in.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from branchyard.text import shown

LINK = "120000"  # a symlink's mode in a tree
MAX_CHECKOUT = 1 << 30
"""Bytes a commit's files may add up to (``up --max-checkout-size`` sets another)."""
MAX_HOPS = 40  # links followed in resolving one, as the kernel's ELOOP limit
_SHOWN = 200  # characters of a path a reason shows


@dataclass(frozen=True)
class Entry:
    """One line of ``git ls-tree --long``: a blob, a tree or a submodule (``commit``)."""

    mode: str
    kind: str
    oid: str
    size: int  # a blob's bytes; 0 for a tree or a submodule
    path: str


@dataclass(frozen=True)
class Tree:
    """A commit's tree that passed the checks: its root tree's id and its entries by path."""

    root: str
    entries: Mapping[str, Entry]

    def oid(self, path: str) -> str | None:
        """The object id at ``path`` (the root tree's for ""), or None if there is none."""
        if path == "":
            return self.root
        entry = self.entries.get(path)
        return entry.oid if entry is not None else None

    def kind(self, path: str) -> str | None:
        if path == "":
            return "tree"
        entry = self.entries.get(path)
        return entry.kind if entry is not None else None


def parse_ls_tree(raw: bytes) -> list[Entry]:
    """The entries of ``git ls-tree -z --long`` output (``MODE TYPE OID SIZE<TAB>PATH<NUL>``).
    Paths are kept byte for byte (undecodable bytes as surrogates)."""
    entries = []
    for record in raw.split(b"\0"):
        if not record:
            continue
        meta, _, path = record.partition(b"\t")
        mode, kind, oid, size = meta.decode().split()
        entries.append(
            Entry(
                mode,
                kind,
                oid,
                int(size) if size.isdigit() else 0,
                path.decode(errors="surrogateescape"),
            )
        )
    return entries


def path_refusal(entries: Iterable[Entry]) -> str | None:
    """Why these paths cannot be checked out (the first of them), or None."""
    seen: set[str] = set()
    for entry in entries:
        name = shown(entry.path, _SHOWN)
        if entry.path in seen:
            return f"{name} is in the commit twice (a malformed tree, as git fsck says)"
        seen.add(entry.path)
        for part in entry.path.split("/"):
            if part in ("", ".", "..") or part.lower() == ".git":
                what = repr(part) if part else "an empty name"
                return f"{name} cannot be checked out: its path holds {what}"
    return None


def size_refusal(entries: Iterable[Entry], limit: int) -> str | None:
    """Why the files are too big to check out, or None."""
    total = sum(entry.size for entry in entries if entry.kind == "blob")
    if total <= limit:
        return None
    return (
        f"the commit's files add up to {human_size(total)}, over the checkout limit of "
        f"{human_size(limit)} (up --max-checkout-size)"
    )


def leaves(path: str, links: Mapping[str, str]) -> bool:
    """Whether the link at ``path`` leads out of the checkout: its target is absolute, or
    walking it from the link's directory, through the other ``links`` (path to target)
    met on the way, goes above the root. A link chain longer than :data:`MAX_HOPS` (a
    loop) counts as leading out: it never resolves to anything inside."""
    where = path.split("/")[:-1]
    todo = list(reversed(links[path].split("/")))
    if links[path].startswith("/"):
        return True
    hops = 0
    while todo:
        part = todo.pop()
        if part in ("", "."):
            continue
        if part == "..":
            if not where:
                return True
            where.pop()
            continue
        where.append(part)
        target = links.get("/".join(where))
        if target is None:
            continue
        hops += 1
        if hops > MAX_HOPS or target.startswith("/"):
            return True
        where.pop()
        todo.extend(reversed(target.split("/")))
    return False


def link_refusal(links: Mapping[str, str]) -> str | None:
    """Why a symlink of the tree (``links``: path to target) cannot be checked out, or None."""
    for path in sorted(links):
        if leaves(path, links):
            target = shown(links[path], _SHOWN)
            return f"symlink {shown(path, _SHOWN)} points outside the checkout (to {target})"
    return None


def human_size(size: int) -> str:
    """``size`` bytes in the largest binary unit that keeps it at 1 or more (``1.5 GiB``)."""
    if size < 1024:
        return f"{size} bytes"
    value, unit = size / 1024, "KiB"
    for bigger in ("MiB", "GiB"):
        if value < 1024:
            break
        value, unit = value / 1024, bigger
    return f"{value:.1f} {unit}"
