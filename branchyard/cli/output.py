"""How commands show things: tables (fitted to the terminal when there is one), ages and
event lines. Pure text in, text out, but for the terminal's width."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING

from branchyard.text import printable

if TYPE_CHECKING:  # the shapes of the answers; importing them costs a command ~20 ms
    from branchyard import shapes


def age(since: float | None) -> str:
    """How long ago: ``42s``, ``5m``, ``3h``, ``2d``; ``-`` for never."""
    if since is None:
        return "-"
    seconds = max(0, int(time.time() - since))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def table(
    header: list[str], rows: list[list[str]], width: int | None = None, squeeze: int = -1
) -> str:
    """Columns two spaces apart. With a ``width``, the ``squeeze`` column is cut (ending
    in "…") so that the lines fit it, if that column alone can make them fit."""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    if width is not None and squeeze >= 0:
        over = sum(widths) + 2 * (len(widths) - 1) - width
        widths[squeeze] = max(len(header[squeeze]), widths[squeeze] - max(0, over))
        rows = [
            [_cut(c, widths[squeeze]) if i == squeeze else c for i, c in enumerate(r)] for r in rows
        ]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip()
        for r in [header, *rows]
    )


def _cut(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def terminal_width() -> int | None:
    """The width to fit tables to: $COLUMNS, else the terminal's; None when piped."""
    import shutil

    if "COLUMNS" not in os.environ and not sys.stdout.isatty():
        return None
    return shutil.get_terminal_size().columns


def event_time(at: float) -> str:
    """Local time with its offset from UTC: ``2026-11-28 23:20:41+01:00``."""
    from datetime import datetime

    return datetime.fromtimestamp(at).astimezone().isoformat(sep=" ", timespec="seconds")


def event_line(event: shapes.Event) -> str:
    """One event on one line, without terminal escapes."""
    when = event_time(event["at"])
    where = f"{event['namespace']}:{event['service']}" if event["namespace"] else "-"
    return printable(f"{when}  {event['kind']:<10} {where:<24} {event['message']}")


def shares(weights: Mapping[str, int]) -> str:
    """Traffic shares by revision, in revision order: ``v9=90 v10=10`` (JSON gives the
    ordinals as strings)."""
    return " ".join(f"v{rev}={pct}" for rev, pct in sorted(weights.items(), key=_ordinal))


def _ordinal(share: tuple[str, int]) -> int:
    return int(share[0])
