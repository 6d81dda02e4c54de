"""Appending rows past a ledger cheaply: whole chunks from memory, one round trip per commit, in the background.

zarr rewrites a chunk it only partly overwrites by reading and decoding it first, and each
synchronous call is a hop to zarr's event loop. A writer that appends in row order knows the rows
of its last, partly filled chunk already, so ``Column`` keeps them and writes whole chunks (no
read). ``Batch`` gathers every array write of a commit into one call, all chunks at once, and
moves the ledgers only after all of them are written, in the order given. ``Batch.start`` lets
the caller go on (with the next commit's rows) while a batch is written; one batch writes at a
time in this process, and ``settle`` waits for it, re-raising its error.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Awaitable, Callable
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import zarr
from zarr.core.sync import sync  # what zarr's own synchronous API runs its coroutines with

from ..errors import CacheError

_writing: list[Future] = []  # the batch being written in the background (at most one)
_lock = threading.Lock()
_pool: ThreadPoolExecutor | None = None


def _forget_the_parents_writer() -> None:
    """A forked child has no commit thread (and no batch of its own in flight): it starts its own."""
    global _pool, _writing, _lock
    _pool, _writing, _lock = None, [], threading.Lock()


os.register_at_fork(after_in_child=_forget_the_parents_writer)


def round_up(n: int, chunk: int) -> int:
    return -(-n // chunk) * chunk


def capacity(shape: int, rows: int, chunk: int) -> int:
    """Rows an array grows to when it must hold ``rows``: doubling, in whole chunks."""
    return round_up(max(rows, 2 * shape), chunk)


def settle() -> None:
    """Wait until no batch is being written; re-raise the error of one that failed.

    Called before anything in this process reads or rewrites chunks a batch may be writing: the next
    batch, a chunk read back from the store, rows rewritten in place, sealing the cache.
    """
    with _lock:
        while _writing:
            _writing.pop(0).result()


def writing() -> bool:
    """Whether a batch is being written right now."""
    return bool(_writing) and not _writing[0].done()


class Batch:
    """The writes of one commit: all array chunks concurrently, then each ledger in the order given.

    A killed process leaves whole chunk files (zarr's local store writes each by rename) and the
    ledgers that had moved: rows past a ledger are never visible, so nothing half-written is.
    """

    def __init__(self) -> None:
        self._writes: dict[Column, Callable[[], Awaitable[None]]] = {}
        self._ledgers: list[Callable[[], Awaitable[None]]] = []

    def write(self, column: Column, write: Callable[[], Awaitable[None]]) -> None:
        if column in self._writes:  # two writes of one chunk at once: the last to land would win
            raise ValueError(f"{column.array.path} is written twice in one commit")
        self._writes[column] = write

    def ledger(self, move: Callable[[], Awaitable[None]]) -> None:
        self._ledgers.append(move)

    def run(self) -> None:
        """Write it all now; return when every ledger has moved."""
        self.start()
        settle()

    def start(self) -> None:
        """Write it all in the background, once the batch before it is written (``settle`` waits for it)."""
        global _pool
        settle()
        if not (self._writes or self._ledgers):
            return
        with _lock:
            if _pool is None:
                _pool = ThreadPoolExecutor(1, thread_name_prefix="featcache-commit")
            _writing.append(_pool.submit(sync, self._run()))

    async def _run(self) -> None:
        try:
            await asyncio.gather(*(w() for w in self._writes.values()))
            for move in self._ledgers:
                await move()
        except BaseException:
            for column in self._writes:  # what they keep assumed this batch landed
                column.broken = True
            raise


class Column:
    """One array (1-D, or 2-D rows x dim) written in row order, as whole chunks.

    It keeps the rows of the last chunk it left partly filled, so the next append rewrites that chunk
    from memory; any other start (a writer's first append, rows rewritten in place since) reads the
    chunk's rows below ``start`` once. Rows past the end in the last chunk get the fill value: they
    are past the ledger. A chunk it wrote with nothing but fill values (a column of "" errors while
    nothing fails) is not written again while it stays so.

    What it keeps describes the batches queued so far (the next one continues from them); once a batch
    of it fails, ``settle`` raises that error and the column refuses to append (a new writer reads it back).
    """

    def __init__(self, array: zarr.Array):
        # every chunk is written as it is: the writer knows which hold only fill values, zarr need not scan them
        self.array = array.with_config({"write_empty_chunks": True})
        self.chunk = array.chunks[0]
        self._tail_start = 0
        self._tail: np.ndarray | None = None  # rows [_tail_start, _tail_start + len(_tail))
        self._blank: int | None = None  # first row of a chunk this column wrote holding only fill values
        self.broken = False

    def forget(self) -> None:
        """Rows were rewritten in place behind this column's back: read the last chunk again next time."""
        self._tail = self._blank = None

    def append(self, batch: Batch, start: int, values: np.ndarray) -> None:
        """Queue ``values`` for rows ``start...`` in ``batch`` (the array grows first where needed)."""
        if self.broken:
            raise CacheError(f"an earlier commit to {self.array.path} failed; this writer cannot go on")
        if not len(values):
            return
        chunk = self.chunk
        first = start - start % chunk
        end = start + len(values)
        stop = round_up(end, chunk)
        block = np.empty((stop - first, *self.array.shape[1:]), dtype=self.array.dtype)
        if start > first:
            block[: start - first] = self._head(first, start)
        block[start - first : end - first] = values
        block[end - first :] = self.array.fill_value
        chunks = [(c, block[c - first : c - first + chunk]) for c in range(first, stop, chunk)
                  if not (c == self._blank and self._is_blank(block[c - first : c - first + chunk]))]
        last = end - end % chunk
        self._tail_start, self._tail = last, block[last - first : end - first].copy()
        self._blank = stop - chunk if self._is_blank(block[stop - chunk - first :]) else None

        async def write() -> None:
            arr = self.array.async_array
            if chunks and arr.shape[0] < stop:
                await arr.resize((capacity(arr.shape[0], stop, chunk), *arr.shape[1:]))
            # chunk by chunk: zarr takes a value shaped like its chunk as it is, without a merge copy
            await asyncio.gather(*(arr.setitem(slice(c, c + chunk), part) for c, part in chunks))

        batch.write(self, write)

    def _is_blank(self, part: np.ndarray) -> bool:
        fill = self.array.fill_value
        if fill != fill:  # NaN
            return bool(np.isnan(part.flat[0])) and bool(np.isnan(part).all())
        return bool(part.flat[0] == fill) and bool((part == fill).all())

    def _head(self, first: int, start: int) -> np.ndarray:
        """Rows [first, start) of the chunk being rewritten: from memory when this column queued them."""
        tail = self._tail
        if tail is not None and self._tail_start == first and first + len(tail) == start:
            return tail
        settle()  # the chunk as stored, once no batch is writing it
        return self.array[first:start]
