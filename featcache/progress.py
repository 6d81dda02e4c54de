"""A small progress line on stderr: done/total, items/s, ETA. Quiet when not wanted."""

from __future__ import annotations

import sys
import time


class Progress:
    def __init__(self, total: int, label: str, enabled: bool = True, every: float = 0.25):
        self.total, self.label, self.enabled = total, label, enabled
        self.tty = sys.stderr.isatty()
        self.every = every if self.tty else 10.0
        self.done = 0
        self.start = self.last = time.perf_counter()

    def update(self, n: int) -> None:
        self.done += n
        now = time.perf_counter()
        if self.enabled and (now - self.last >= self.every or self.done >= self.total):
            self.last = now
            self._print(now)

    def rate(self) -> float:
        el = time.perf_counter() - self.start
        return self.done / el if el > 0 else 0.0

    def _print(self, now: float) -> None:
        rate = self.rate()
        left = (self.total - self.done) / rate if rate > 0 else float("inf")
        eta = f"{int(left // 60)}m{int(left % 60):02d}s" if left != float("inf") else "?"
        line = f"{self.label} {self.done}/{self.total}  {rate:.1f} img/s  ETA {eta}"
        sys.stderr.write(("\r" + line) if self.tty else line + "\n")
        sys.stderr.flush()

    def close(self) -> None:
        if self.enabled and self.tty:
            sys.stderr.write("\n")
