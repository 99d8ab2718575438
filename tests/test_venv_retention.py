"""Environments are kept up to ``KEEP``, least recently used first out, never one a kept
build uses; ``gc`` removes every one no build uses (docs/rollouts.md, retention)."""

from __future__ import annotations

import os
from pathlib import Path

from branchyard.runtime.venvs import _READY, KEEP, VenvCache


class NoRegistry:
    def add_process(self, pgid: int, started: str, what: str) -> None:
        raise AssertionError("no process is started here")

    def remove_process(self, pgid: int) -> None:
        raise AssertionError("no process is started here")


def made(root: Path, count: int) -> list[Path]:
    """``count`` ready environments, the first used longest ago."""
    venvs = []
    for n in range(count):
        venv = root / f"env{n:02d}"
        venv.mkdir(parents=True)
        (venv / _READY).touch()
        os.utime(venv / _READY, (1_000_000 + n, 1_000_000 + n))
        venvs.append(venv)
    return venvs


def test_the_least_recently_used_environments_past_keep_go_but_one_in_use_stays(
    tmp_path: Path,
) -> None:
    cache = VenvCache(tmp_path / "venvs", NoRegistry())
    venvs = made(cache.root, KEEP + 3)
    cache._in_use[venvs[0]] = 1  # the oldest, but a kept build uses it
    assert cache._prune() == 2
    left = sorted(p.name for p in cache.root.iterdir())
    assert left == sorted(v.name for v in [venvs[0], *venvs[3:]])
    assert len(left) == KEEP + 1


def test_gc_removes_every_environment_no_build_uses(tmp_path: Path) -> None:
    cache = VenvCache(tmp_path / "venvs", NoRegistry())
    venvs = made(cache.root, 4)
    cache._in_use[venvs[2]] = 2
    cache.release(venvs[2])  # one user of two let go: still in use
    assert cache.gc() == 3
    assert [p.name for p in cache.root.iterdir()] == [venvs[2].name]
    cache.release(venvs[2])
    assert cache.gc() == 1
    assert list(cache.root.iterdir()) == []
