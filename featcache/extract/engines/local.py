"""The in-process engine: threads (or processes) for reading and decoding, one model.

On a CPU the decode and model stages share the same cores, so they alternate: a decode
phase with one thread per core (torch ops single-threaded), then a model phase with all
cores in torch. Running them at once would oversubscribe the cores. On a GPU, decoding of
the next batches (in worker processes: the forward pass needs the GIL) overlaps the forward
pass of the current one. Files are read and hashed in windows of bounded size; only contents
that are new to the fingerprint are decoded, from the very bytes that were hashed.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from typing import TYPE_CHECKING

import numpy as np

from ..sources import Item
from ..stages import decode_bytes, read_file
from ..writer import CacheWriter

if TYPE_CHECKING:
    from ...progress import Progress
    from ...store.cache import FeatureCache
    from ..pipeline import Extraction, Target
    from ..sources import Listing

WINDOW_BYTES = 256 * 1024 * 1024  # file bytes held in memory at once (besides a single larger file)


def _decoder_init() -> None:
    import torch

    torch.set_num_threads(1)


def windows(items: list[Item], size: Callable[[], int], max_bytes: int = WINDOW_BYTES) -> Iterator[list[Item]]:
    """Consecutive slices of at most ``size()`` items and (unless one item alone is larger) ``max_bytes``.
    ``size`` is asked per slice: it grows once a model is built and the batch size known."""
    out: list[Item] = []
    held = 0
    for it in items:
        if out and (len(out) >= size() or held + it.size > max_bytes):
            yield out
            out, held = [], 0
        out.append(it)
        held += it.size
    if out:
        yield out


class LocalEngine:
    """Runs the stages in this process. The model (and the decoder processes a GPU wants) is touched only
    for work: files whose content the cache holds are read and hashed, nothing more."""

    def __init__(self, ex: Extraction):
        self.ex = ex
        self.cfg = ex.cfg

    @property
    def batch_size(self) -> int:
        return self.ex.batch_size  # builds the models: asked only where there is work

    def window(self) -> int:
        """Files read per slice: four batches, once the batch size is known (before: the CPU's)."""
        known = self.ex.loaded or self.cfg.device == "cpu" or self.cfg.batch_size
        return max(64, 4 * (self.batch_size if known else 8))

    def run(self, cache: FeatureCache, listing: Listing) -> tuple[CacheWriter, Progress]:
        """The extraction prepared (targets, writer), then its work."""
        writer, progress = self.ex.prepare(cache, listing)
        self.process(writer, listing.items, progress)
        return writer, progress

    def process(self, writer: CacheWriter, items: list[Item], progress: Progress, new: bool = True) -> None:
        """Taps added to existing rows first (each fingerprint's catch-up), then the listed files."""
        with ThreadPoolExecutor(self.ex.workers, thread_name_prefix="featcache") as pool, contextlib.ExitStack() as stack:
            self.pool, self._stack, self._decoders = pool, stack, None
            for target in self.ex.targets:
                if target.catch_up is not None:
                    self._catch_up(writer, target, progress)
            if new:
                self._new(writer, items, progress)

    @property
    def decoders(self):
        """Threads on a CPU; on a GPU, processes (the forward pass holds the GIL), started at the first decode."""
        if self._decoders is None:
            use = self.ex.gpu if self.cfg.decode_processes is None else self.cfg.decode_processes
            self._decoders = self.pool
            if use:
                ctx = multiprocessing.get_context("spawn")  # never fork a process that holds CUDA state
                self._decoders = self._stack.enter_context(
                    ProcessPoolExecutor(self.ex.workers, mp_context=ctx, initializer=_decoder_init))
        return self._decoders

    def _read(self, paths: list) -> list:
        t = time.perf_counter()
        reads = list(self.pool.map(lambda p: read_file(p, self.cfg.max_file_bytes), paths))
        self.ex.timings["hash"] += time.perf_counter() - t
        return reads

    def _new(self, writer: CacheWriter, items: list[Item], progress: Progress) -> None:
        pending: list[tuple[int, bytes]] = []
        for window in windows(items, self.window):
            for it, r in zip(window, self._read([it.path for it in window])):
                if r.error:
                    writer.unreadable(it.key, r.error)
                    progress.update(1)
                    continue
                action, row = writer.register(it, r.sha256)
                if action == "new":
                    pending.append((row, r.data))
                else:
                    progress.update(1)
            full = len(pending) - len(pending) % self.batch_size if pending else 0
            if full:
                self._embed_into(writer, pending[:full], progress)
                pending = pending[full:]
        if pending:
            self._embed_into(writer, pending, progress)
        writer.commit()

    def _embed_into(self, writer: CacheWriter, work: list[tuple[int, bytes]], progress: Progress) -> None:
        results = self.compute([d for _, d in work], [writer.needs(row) for row, _ in work])
        for (row, _), result in zip(work, results):
            writer.add(row, result)
        progress.update(len(work))

    def _catch_up(self, writer: CacheWriter, target: Target, progress: Progress) -> None:
        """New taps for a fingerprint's existing rows: the same bytes, or the row keeps NaN there."""
        group, catch = target.group, target.catch_up
        rows = group.image_rows()
        status = group.status()
        table = writer.cache.images()
        todo = range(catch.start, group.rows)
        start = 0
        while start < len(todo):
            window = todo[start : start + self.window()]
            start += len(window)
            ok = [r for r in window if status[r] == 0]
            reads = dict(zip(ok, self._read([table.path[rows[r]] for r in ok])))
            results: dict[int, dict | str | None] = {r: None for r in window}
            data = []
            for r in ok:
                read = reads[r]
                if read.error:
                    results[r] = read.error
                elif read.sha256 != table.sha256[rows[r]]:
                    results[r] = "content changed: the file now holds other bytes than when it was extracted"
                else:
                    data.append(r)
            only = frozenset([target.fingerprint])
            for r, res in zip(data, self.compute([reads[r].data for r in data], [only] * len(data))):
                results[r] = res[target.fingerprint] if isinstance(res, dict) else f"not computed: {res}"
            for r in window:
                catch.add(r, results[r])
            progress.update(len(window))
        catch.commit()
        writer.counts["extracted"] += len(todo)

    # -- decode + model ---------------------------------------------------------------
    def compute(self, datas: list[bytes], needs: list[frozenset[str]]) -> list[dict[str, dict[str, np.ndarray]] | str]:
        """For each file's bytes, {fingerprint: {tap: vector}} for the fingerprints it needs (or the reason
        it failed), in order, batch by batch; each file is decoded once for all backbones."""
        if not datas:
            return []
        import torch

        ex, bs = self.ex, self.batch_size
        mp = self.cfg.max_pixels
        batches = [range(i, min(i + bs, len(datas))) for i in range(0, len(datas), bs)]
        depth = 2 if ex.gpu else 0  # batches decoded ahead of the model
        pending: list[list[Future]] = []
        out: list[dict[str, dict[str, np.ndarray]] | str] = []
        for i in range(len(batches)):
            if not ex.gpu:
                torch.set_num_threads(1)  # decode phase: one thread per worker
            t = time.perf_counter()
            while len(pending) <= min(depth, len(batches) - 1 - i):
                pending.append([self.decoders.submit(decode_bytes, datas[j], ex.preprocess, mp)
                                for j in batches[i + len(pending)]])
            decoded = [f.result() for f in pending.pop(0)]
            ex.timings["decode"] += time.perf_counter() - t

            results: list[dict | str] = [{} if isinstance(d, list) else d for d in decoded]
            t = time.perf_counter()
            for k, target in enumerate(ex.targets):
                fp = target.fingerprint
                ok = [j for j, d in enumerate(decoded) if isinstance(d, list) and fp in needs[batches[i][j]]]
                if not ok:
                    continue
                emb = target.embedder
                if not ex.gpu:
                    torch.set_num_threads(emb.threads)  # model phase: all cores
                images = torch.from_numpy(np.stack([decoded[j][k] for j in ok]))
                vectors = emb.embed(images, pad_to=None if ex.gpu else bs)  # CPU: one graph shape
                for n, j in enumerate(ok):
                    results[j][fp] = {tap: v[n] for tap, v in vectors.items()}
            ex.timings["model"] += time.perf_counter() - t
            out += results
        return out
