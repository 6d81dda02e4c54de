"""A process-wide budget of bytes that image decodes may hold at once.

Each decode reserves its estimated peak (computed from the header, before any pixel is
decoded) and gives it back when done, so N concurrent decodes (the extractor's workers,
the service's request threads) can never add up past the budget: a decode that would
waits its turn, in arrival order; one that could never fit is refused with ``TooLarge``.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import threading
from collections import deque
from collections.abc import Iterator

from ..errors import TooLarge, UsageError

ENV = "FEATCACHE_DECODE_MEMORY_MB"
DEFAULT_MB = 1024
MB = 1 << 20


class MemoryBudget:
    """A counting semaphore of bytes with first-come-first-served waiting."""

    def __init__(self, limit: int):
        self._cond = threading.Condition()
        self._queue: deque[int] = deque()
        self._tickets = itertools.count()
        self._limit = limit
        self.in_use = 0
        self.peak = 0  # highest ``in_use`` seen (for tests and benchmarks)

    @property
    def limit(self) -> int:
        return self._limit

    def set_limit(self, limit: int) -> None:
        if limit <= 0:
            raise UsageError(f"the decode memory budget must be positive, got {limit} bytes")
        with self._cond:
            self._limit = limit
            self._cond.notify_all()

    @contextlib.contextmanager
    def reserve(self, nbytes: int, what: str) -> Iterator[None]:
        """Hold ``nbytes`` of the budget for the duration of the block (waits until they are free)."""
        with self._cond:
            ticket = next(self._tickets)
            self._queue.append(ticket)
            try:
                while True:
                    if nbytes > self._limit:
                        raise TooLarge(f"too large: decoding {what} needs about {_mb(nbytes)} MB, above the decode "
                                       f"memory budget of {_mb(self._limit)} MB ({ENV})")
                    if self._queue[0] == ticket and self.in_use + nbytes <= self._limit:
                        break
                    self._cond.wait()
            finally:
                self._queue.remove(ticket)
                self._cond.notify_all()
            self.in_use += nbytes
            self.peak = max(self.peak, self.in_use)
        try:
            yield
        finally:
            with self._cond:
                self.in_use -= nbytes
                self._cond.notify_all()


def _mb(n: int) -> int:
    return -(-n // MB)


def _default_limit() -> int:
    raw = os.environ.get(ENV, "")
    try:
        mb = int(raw) if raw else DEFAULT_MB
    except ValueError:
        raise UsageError(f"{ENV} must be a whole number of megabytes, got {raw!r}") from None
    if mb <= 0:
        raise UsageError(f"{ENV} must be positive, got {mb}")
    return mb * MB


DECODE_BUDGET = MemoryBudget(_default_limit())


def set_decode_budget(nbytes: int) -> None:
    """Set the process-wide decode budget (e.g. a share of the machine per worker process)."""
    DECODE_BUDGET.set_limit(nbytes)
