"""The benchmarks still run: push-to-live and capacity at tiny sizes, results in a temp file.

The router part needs wrk and nginx and is left to ``python -m bench``; these two
need only git and Python (and PyPI, for the Flask services of push-to-live).
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parent.parent
TINY = [
    *("--commits", "2", "--dep-commits", "1", "--poll-interval", "0.5", "--quiet-wait", "0"),
    *("--namespaces", "2", "--idle-seconds", "1", "--ps-runs", "2", "--push-samples", "1"),
]


def _row(text: str, figure: str) -> list[str]:
    for line in text.splitlines():
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        if cells and cells[0] == figure:
            return cells[1:]
    raise AssertionError(f"no row {figure!r} in:\n{text}")


def _milliseconds(cell: str) -> float:
    match = re.match(r"^(\d+(?:\.\d+)?) ms", cell)
    assert match, cell
    return float(match.group(1))


def test_the_push_and_capacity_benchmarks_run_at_tiny_sizes_and_report_every_figure(
    tmp_path: Path,
) -> None:
    results = tmp_path / "RESULTS.md"
    done = subprocess.run(
        [sys.executable, "-m", "bench", "push", "capacity", *TINY, "--results", str(results)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=110,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    text = results.read_text()

    assert "## 1. Push-to-live" in text
    assert "## 3. Capacity" in text
    assert "## 2. Router" not in text
    assert "| cores |" in text
    assert "-m bench push capacity" in text

    for figure in (
        "cold start, stdlib service (no branchyard)",
        "local path: push-to-live",
        "polling path (0.5 s): push-to-live",
        "with deps, code-only commit: push-to-live",
        "with deps, dependency change: push-to-live",
        "cold start, Flask service (no branchyard)",
        "Flask: push-to-live",
        "cold start, gunicorn service (no branchyard)",
        "gunicorn: push-to-live",
    ):
        n, p50, p95, low, high = _row(text, figure)
        assert n in ("1", "2"), (figure, n)
        assert 0 < _milliseconds(low) <= _milliseconds(p50) <= _milliseconds(high), figure
        assert _milliseconds(p95) <= _milliseconds(high), figure

    assert _row(text, "daemon RSS")[0].endswith(" MB")
    assert "6 `python`" in _row(text, "services' RSS, sum")[0]
    assert _milliseconds(
        _row(text, "`branchyard ps -A` wall time (bytecode cached), median (min … max) of 2")[0]
    )
    assert _row(text, "daemon CPU while idle (1 s)")[0].endswith(" %")

    verdicts = re.findall(r"^\| .+ \| \*\*(PASS|MISS)\*\* \|$", text, flags=re.MULTILINE)
    assert len(verdicts) == 2 * 9, verdicts  # each target in its section and at the top
    assert _row(text, "with deps, code-only commit installs nothing")[:3] == [
        "2 of 2",
        "all",
        "**PASS**",
    ]
