"""The watcher's pure parts: when a remote repo is polled next, and the fingerprint of refs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from branchyard.watcher import next_poll, refs_fingerprint
from tests.conftest import git


@pytest.mark.parametrize(
    ("due", "started", "interval", "expected"),
    [
        (0.0, 100.0, 2.0, 102.0),  # the first poll sets the cadence
        (100.0, 100.0, 2.0, 102.0),  # started on time
        (100.0, 100.08, 2.0, 102.0),  # started a little late: the cadence holds
        (100.0, 101.9, 2.0, 102.0),  # started late but before the next due time
        (100.0, 102.5, 2.0, 104.5),  # fell a whole interval behind: a new cadence
        (100.0, 102.0, 2.0, 104.0),  # exactly one interval late
    ],
)
def test_polls_keep_their_cadence(
    due: float, started: float, interval: float, expected: float
) -> None:
    assert next_poll(due, started, interval) == pytest.approx(expected)


def test_the_fingerprint_changes_with_every_ref_update_even_within_one_clock_tick(
    tmp_path: Path,
) -> None:
    git("init", "-q", "-b", "main", cwd=tmp_path)
    for subject in ("a", "b"):
        git("commit", "-q", "--allow-empty", "-m", subject, cwd=tmp_path)
    git_dir = tmp_path / ".git"
    ref = git_dir / "refs" / "heads" / "main"
    first = refs_fingerprint(git_dir)

    times = ref.stat().st_atime_ns, ref.stat().st_mtime_ns
    git("update-ref", "refs/heads/main", "HEAD~1", cwd=tmp_path)
    os.utime(ref, ns=times)  # the same size, and the same mtime as if the clock stood still
    assert refs_fingerprint(git_dir) != first

    git("branch", "feature/x", cwd=tmp_path)
    names = [entry[0] for entry in refs_fingerprint(git_dir)]
    assert str(git_dir / "refs" / "heads" / "feature" / "x") in names
    assert "HEAD" in names
