"""What a long command shows on stderr while it works: a model-loading line, then a progress bar.

On a terminal the bar is tqdm's (percentage, done/total, rate, elapsed, ETA); elsewhere (CI logs,
``2> file``) it is a plain line every ``every`` seconds and one at the end, so logs stay readable.
Nothing is shown when disabled (``--quiet``, ``--json``). Library code calls ``loading`` freely:
it is silent unless the command line turned status lines on with ``show_status(True)``.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

_status = False  # library calls stay silent; the CLI turns status lines on


def show_status(enabled: bool) -> None:
    """Turn ``loading`` lines on or off for this process (the CLI: on unless --quiet or --json)."""
    global _status
    _status = enabled


def clock(seconds: float) -> str:
    """``75.4`` -> ``1:15``; ``3725`` -> ``1:02:05``."""
    s = int(seconds)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


@contextmanager
def loading(what: str, enabled: bool | None = None) -> Iterator[None]:
    """``loading efficientnet_lite0 ... 2.1s`` on stderr around the block (a model load, before the first image).

    On a terminal the line shows while the block runs and is wiped if it fails, so the error line stands
    alone; elsewhere it is written whole once the block is done (logs get whole lines, and no line on failure).
    """
    if not (_status if enabled is None else enabled):
        yield
        return
    tty, t0 = sys.stderr.isatty(), time.perf_counter()
    if tty:
        sys.stderr.write(f"loading {what} ...")
        sys.stderr.flush()
    try:
        yield
    except BaseException:
        if tty:
            sys.stderr.write("\r\033[K")
        raise
    seconds = f" {time.perf_counter() - t0:.1f}s\n"
    sys.stderr.write(seconds if tty else f"loading {what} ...{seconds}")
    sys.stderr.flush()


class Progress:
    """``update(n)`` as items finish; ``close()`` at the end. ``every``: seconds between plain lines (no TTY)."""

    def __init__(self, total: int, label: str, enabled: bool = True, every: float = 10.0):
        self.total, self.label, self.enabled, self.every = total, label, enabled, every
        self.done = 0
        self.start = self.last = time.perf_counter()
        self._bar = None
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=label, unit="img", file=sys.stderr, dynamic_ncols=True,
                             smoothing=0.1)
            self._stop = threading.Event()  # redraw each second: elapsed time moves during a slow first batch
            threading.Thread(target=self._tick, name="progress", daemon=True).start()
        elif enabled:
            self._line(self.start)  # the total, at once

    def _tick(self) -> None:
        while not self._stop.wait(1.0):
            bar = self._bar
            if bar is not None:
                bar.refresh()

    def update(self, n: int) -> None:
        self.done += n
        if self._bar is not None:
            self._bar.update(n)
            return
        now = time.perf_counter()
        if self.enabled and now - self.last >= self.every and self.done < self.total:
            self.last = now
            self._line(now)

    def rate(self) -> float:
        """Items per second since the start."""
        el = time.perf_counter() - self.start
        return self.done / el if el > 0 else 0.0

    def _line(self, now: float) -> None:
        elapsed, rate = now - self.start, self.rate()
        pct = 100 * self.done / self.total if self.total else 100.0
        left = (self.total - self.done) / rate if rate > 0 else None
        eta = clock(left) if left is not None else "?"
        sys.stderr.write(f"{self.label}: {self.done}/{self.total} ({pct:.0f}%)  {rate:.1f} img/s  "
                         f"elapsed {clock(elapsed)}  ETA {eta}\n")
        sys.stderr.flush()

    def close(self) -> None:
        if self._bar is not None:
            self._stop.set()
            bar, self._bar = self._bar, None
            bar.close()
        elif self.enabled and self.done:
            self._line(time.perf_counter())
            self.enabled = False  # a second close prints nothing
