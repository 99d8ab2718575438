"""Retrying what may pass by itself: capped exponential backoff.

A temporary error (:func:`~branchyard.errors.is_temporary`: a git server that
cannot be reached, a network that is down) is tried again after 2 s, then 4 s,
8 s, ... at most 60 s apart, for as long as it lasts; a permanent one is raised
at once. The sleep is an argument, so tests drive the waits without waiting.
While a try is pending, :meth:`Retry.note` says so on one line:
``fetch failed (will retry in 4 s): fatal: unable to access ...``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

from branchyard.errors import is_temporary, reason_of

T = TypeVar("T")
Sleep = Callable[[float], Awaitable[None]]


@dataclass(frozen=True)
class Backoff:
    """How long to wait after failures in a row: ``first``, times ``factor`` after each
    further failure, at most ``cap`` (seconds)."""

    first: float = 2.0
    factor: float = 2.0
    cap: float = 60.0

    def delay(self, failures: int) -> float:
        """Seconds to wait after ``failures`` failures in a row (the first is 1)."""
        return min(self.cap, self.first * self.factor ** max(failures - 1, 0))


BACKOFF = Backoff()


@dataclass(frozen=True)
class Retry:
    """A temporary failure about to be tried again: the ``failures`` in a row so far,
    the last ``error``, and the ``delay`` before the next try."""

    failures: int
    delay: float
    error: BaseException

    def note(self, what: str) -> str:
        """One line for a person: ``WHAT failed (will retry in N s): why``."""
        return f"{what} failed (will retry in {self.delay:g} s): {reason_of(self.error)}"


async def retry(
    attempt: Callable[[], Awaitable[T]],
    on_retry: Callable[[Retry], None],
    *,
    backoff: Backoff = BACKOFF,
    sleep: Sleep = asyncio.sleep,
) -> T:
    """What ``attempt()`` returns, trying again after each temporary error (told to
    ``on_retry`` before the wait) until it succeeds; a permanent error is raised."""
    failures = 0
    while True:
        try:
            return await attempt()
        except Exception as exc:
            if not is_temporary(exc):
                raise
            failures += 1
            pending = Retry(failures, backoff.delay(failures), exc)
            on_retry(pending)
            await sleep(pending.delay)
