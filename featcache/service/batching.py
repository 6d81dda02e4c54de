"""Micro-batching: concurrent requests share one forward pass, after a bounded wait.

Requests put preprocessed images on an asyncio queue; the batcher takes the first, waits
at most ``max_wait_s`` for more (up to ``max_batch``), and runs the embedder on the stack
in one of ``workers`` model threads, then gathers the next batch while that one runs. With
batching off, each request runs its own forward pass in those same threads. Each model
thread runs torch with ``cpus // workers`` intra-op threads (the service sets that), so the
cores are never oversubscribed.

Batches are padded (``Embedder.embed(..., pad_to)``) up to a few fixed sizes (1, 2, 4, 8, 12,
16, ... ``max_batch``): the frozen TorchScript graph re-specialises for every new input
shape, which costs far more than the padding rows. ``bucket_sizes()`` lists them so the service can warm each one up.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

EmbedFn = Callable[[torch.Tensor, int], dict[str, np.ndarray]]  # (images, padded batch size) -> {tap: vectors}


class MicroBatcher:
    """``await submit(x)`` returns {tap: vector} for one uint8 (3, H, W) image."""

    def __init__(self, embed: EmbedFn, max_batch: int = 16, max_wait_s: float = 0.004, enabled: bool = True,
                 on_batch: Callable[[int], None] | None = None, workers: int = 1):
        self.embed = embed
        self.max_batch = max(1, max_batch)
        self.max_wait_s = max(0.0, max_wait_s)
        self.enabled = enabled
        self.on_batch = on_batch or (lambda n: None)
        self.workers = max(1, workers)
        self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="featcache-model")
        self._queue: asyncio.Queue | None = None
        self._slots: asyncio.Semaphore | None = None
        self._worker: asyncio.Task | None = None

    async def start(self) -> None:
        if self.enabled:
            self._queue = asyncio.Queue()
            self._slots = asyncio.Semaphore(self.workers)
            self._worker = asyncio.create_task(self._run(), name="featcache-batcher")

    async def stop(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker
        self._pool.shutdown(wait=True)

    def describe(self) -> dict:
        return {"enabled": self.enabled, "max_batch": self.max_batch, "max_wait_ms": self.max_wait_s * 1000,
                "workers": self.workers}

    async def submit(self, x: torch.Tensor) -> dict[str, np.ndarray]:
        loop = asyncio.get_running_loop()
        if not self.enabled:
            out = await loop.run_in_executor(self._pool, self._forward, x[None])
            return {k: v[0] for k, v in out.items()}
        fut = loop.create_future()
        await self._queue.put((x, fut))
        return await fut

    def bucket_sizes(self) -> list[int]:
        if not self.enabled:
            return [1]
        sizes = [b for b in (1, 2, 4, 8) if b < self.max_batch]
        sizes += list(range(12, self.max_batch, 4))
        return sizes + [self.max_batch]

    def _forward(self, batch: torch.Tensor) -> dict[str, np.ndarray]:
        n = len(batch)
        self.on_batch(n)
        return self.embed(batch, next((b for b in self.bucket_sizes() if b >= n), n))

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        q = self._queue
        while True:
            await self._slots.acquire()  # a model thread is free: gather the next batch for it
            items = [await q.get()]
            deadline = loop.time() + self.max_wait_s
            while len(items) < self.max_batch:
                if not q.empty():
                    items.append(q.get_nowait())
                    continue
                left = deadline - loop.time()
                if left <= 0:
                    break
                try:
                    items.append(await asyncio.wait_for(q.get(), left))
                except TimeoutError:
                    break
            items = [(x, f) for x, f in items if not f.cancelled()]
            if not items:
                self._slots.release()
                continue
            batch = loop.run_in_executor(self._pool, self._forward, torch.stack([x for x, _ in items]))
            batch.add_done_callback(lambda done, items=items: self._deliver(done, items))

    def _deliver(self, done: asyncio.Future, items: list) -> None:
        """Hand each request its row (or the batch's failure) and free the model thread."""
        self._slots.release()
        error = asyncio.CancelledError() if done.cancelled() else done.exception()
        out = done.result() if error is None else {}
        for i, (_, f) in enumerate(items):
            if f.done():
                continue
            if error is not None:
                f.set_exception(error)
            else:
                f.set_result({k: v[i] for k, v in out.items()})
