"""Results: each part returns a :class:`Section`; :func:`write` puts them in RESULTS.md.

A full run rewrites the file. A part run alone replaces its own section (between
``<!-- bench:PART:begin -->`` and ``<!-- bench:PART:end -->``) and keeps the
others, each of which carries its own date and command. The table of targets at
the top is rebuilt from every section's target rows.
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench.common import BenchError, Summary, git, machine

ORDER = ("push", "router", "capacity", "sandbox", "kube", "node")
_TARGET_ROW = re.compile(r"^\| .+ \| \*\*(PASS|MISS)\*\* \|$")


@dataclass(frozen=True)
class Target:
    what: str
    figure: str
    goal: str
    passed: bool

    def row(self) -> str:
        verdict = "PASS" if self.passed else "MISS"
        return f"| {self.what} | {self.figure} | {self.goal} | **{verdict}** |"


@dataclass
class Section:
    key: str
    title: str
    command: str
    lines: list[str] = field(default_factory=list)
    targets: list[Target] = field(default_factory=list)
    started: float = field(default_factory=time.time)
    load: tuple[float, float, float] = field(default_factory=os.getloadavg)
    load_end: tuple[float, float, float] | None = None
    revision: str = ""  # the branchyard measured, as product_revision() says
    seconds: float = 0.0

    def add(self, *lines: str) -> None:
        self.lines.extend(lines)

    def table(self, header: list[str], rows: list[list[str]]) -> None:
        self.lines.append("| " + " | ".join(header) + " |")
        self.lines.append("|" + "|".join("---" for _ in header) + "|")
        self.lines.extend("| " + " | ".join(row) + " |" for row in rows)
        self.lines.append("")

    def target(self, what: str, figure: str, goal: str, passed: bool) -> None:
        self.targets.append(Target(what, figure, goal, passed))

    def render(self) -> str:
        when = time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(self.started))
        out = [
            f"<!-- bench:{self.key}:begin -->",
            f"## {self.title}",
            "",
            f"Run {when}, took {self.seconds:.0f} s, load average {_load(self.load)} at the "
            f"start and {_load(self.load_end)} at the end, branchyard "
            f"{self.revision or '?'}: `{self.command}`",
            "",
            *self.lines,
        ]
        if self.targets:
            out += ["### Targets", "", "| target | figure | goal | result |", "|---|---|---|---|"]
            out += [t.row() for t in self.targets]
            out.append("")
        out.append(f"<!-- bench:{self.key}:end -->")
        return "\n".join(out)


def _load(load: tuple[float, float, float] | None) -> str:
    return "?" if load is None else " ".join(f"{x:.2f}" for x in load)


def ms(seconds: float) -> str:
    value = seconds * 1000
    return f"{value:.1f} ms" if abs(value) < 10 else f"{value:.0f} ms"


def spread(summary: Summary, unit: str = "ms") -> str:
    """``median (min ... max)`` in one cell."""
    if unit == "ms":
        return f"{ms(summary.median)} ({ms(summary.low)} … {ms(summary.high)})"
    return f"{summary.median:.{unit}f} ({summary.low:.{unit}f} … {summary.high:.{unit}f})"


def latency_row(name: str, summary: Summary) -> list[str]:
    return [
        name,
        str(summary.n),
        ms(summary.median),
        ms(summary.p95),
        ms(summary.low),
        ms(summary.high),
    ]


LATENCY_HEADER = ["figure", "n", "p50", "p95", "min", "max"]


def _sections_in(text: str) -> dict[str, str]:
    found = {}
    for key in ORDER:
        match = re.search(
            rf"<!-- bench:{key}:begin -->.*?<!-- bench:{key}:end -->", text, flags=re.DOTALL
        )
        if match:
            found[key] = match.group(0)
    return found


def product_revision() -> str:
    """The commit measured, and whether the product's files differed from it."""
    root = Path(__file__).resolve().parent.parent
    try:
        commit = git("rev-parse", "--short", "HEAD", cwd=root)
        changed = git("status", "--porcelain", "--", "branchyard", "pyproject.toml", cwd=root)
    except BenchError:
        return "?"
    files = len(changed.splitlines())
    return f"commit {commit}" + (f" plus uncommitted changes in {files} files" if files else "")


def write(
    path: Path, sections: list[Section], command: str, full: bool, revision: str | None = None
) -> None:
    previous = {} if full or not path.exists() else _sections_in(path.read_text())
    rendered = {**previous, **{s.key: s.render() for s in sections}}
    info = machine()
    info["branchyard"] = revision or product_revision()
    header = [
        "# branchyard benchmarks",
        "",
        "Written by `bench/` (see bench/README.md). Every figure is the median with its "
        "min and max (and p95 where there are enough samples); every process talks to "
        "127.0.0.1 only.",
        "",
        f"Last written {time.strftime('%Y-%m-%d %H:%M:%S %Z')} by `{command}`"
        + ("" if full else " (one part; the other sections keep their own run line)"),
        "",
        "| machine | |",
        "|---|---|",
        *(f"| {key} | {value} |" for key, value in info.items()),
        "",
        "## Targets at a glance",
        "",
        "| target | figure | goal | result |",
        "|---|---|---|---|",
    ]
    for key in ORDER:
        if key in rendered:
            header += [line for line in rendered[key].splitlines() if _TARGET_ROW.match(line)]
    header.append("")
    body = [rendered[key] + "\n" for key in ORDER if key in rendered]
    path.write_text("\n".join(header) + "\n" + "\n".join(body))
