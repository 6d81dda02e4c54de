"""Everything the service loads at start: embedder, micro-batcher, heads, index, metrics."""

from __future__ import annotations

import logging

import faiss
import torch

from ..errors import UsageError
from ..extract.embedder import embedder_for, resolve_device
from ..runtime import available_cpus
from ..store.cache import FeatureCache
from ..store.index import VectorIndex
from .batching import MicroBatcher
from .config import ServiceConfig
from .heads import HeadRegistry
from .metrics import Metrics

log = logging.getLogger(__name__)


def preflight(config: ServiceConfig) -> str:
    """Check, before loading any model, that every head and the index match the cache's fingerprint."""
    from ..classify.bundle import load_bundle

    execution(config)  # a bad --model-workers or --device fails here too
    cache = FeatureCache(config.cache)
    fp = cache.resolve_fingerprint(config.fingerprint)
    for name, path in config.heads.items():
        load_bundle(path).check(fp, f"served cache's vectors (head {name!r})")
    if config.index:
        VectorIndex.load(config.index).check(fp)
    return fp


def execution(config: ServiceConfig) -> tuple[int, bool]:
    """(forward passes run at once, micro-batching on), the defaults chosen for the device.

    On CPU: one pass per core, each on one torch thread, no batching. A single image gains
    little from intra-op threads, and a batch costs more per image than single images do
    (``benchmarks/model_passes.py``, Lite0 on 2 cores: two single-threaded passes side by side
    run 1.8x one pass on both threads at batch 1, and 1.2x themselves at batch 8). On a GPU:
    one pass at a time, batched.
    """
    if config.model_workers is not None and config.model_workers < 1:
        raise UsageError(f"--model-workers must be at least 1, got {config.model_workers}")
    gpu = resolve_device(config.device).type == "cuda"
    workers = config.model_workers or (1 if gpu else available_cpus())
    return workers, gpu if config.batching is None else config.batching


class ServiceState:
    """Built in the app's lifespan; refuses heads or an index of another fingerprint."""

    def __init__(self, config: ServiceConfig, metrics: Metrics):
        self.config = config
        self.metrics = metrics
        fp = preflight(config)  # cheap manifest checks first: no model is loaded for a foreign head or index
        cache = FeatureCache(config.cache)
        attrs = cache.group_attrs(fp)
        from ..classify.bundle import load_bundle  # tap needs of heads, read before the embedder is built

        taps = {"final"}
        for path in config.heads.values():
            taps.add(load_bundle(path).tap)
        self.index: VectorIndex | None = None
        if config.index:
            self.index = VectorIndex.load(config.index)
            self.index.check(fp)  # FingerprintMismatch: refuse to serve it
            taps.add(self.index.manifest["tap"])
        workers, batching = execution(config)
        self.embedder = embedder_for(attrs["backbone"], attrs["fingerprint"], sorted(taps), config.device,
                                     threads=max(1, available_cpus() // workers), runtime=config.runtime,
                                     precision=config.precision, cache=config.cache, streams=workers)
        self.fingerprint = self.embedder.fingerprint
        self.backbone = attrs["backbone"]
        self.heads = HeadRegistry(self.fingerprint, self.embedder.taps)
        for name, path in config.heads.items():
            self.heads.add(name, path)
        faiss.omp_set_num_threads(1)  # single queries: threads only add latency
        self.batcher = MicroBatcher(self.embedder.embed, config.max_batch, config.max_wait_ms / 1000,
                                    batching, on_batch=metrics.batch.observe, workers=workers)
        self._warm_up()

    def _warm_up(self) -> None:
        """Trace/freeze the model and run every batch shape the batcher uses twice, so no request pays for it."""
        crop = self.embedder.spec.preprocess.crop
        for n in [1] + self.batcher.bucket_sizes() * 2:
            self.embedder.embed(torch.zeros((n, 3, crop, crop), dtype=torch.uint8))

    def describe(self) -> dict:
        return {
            "fingerprint": self.fingerprint, "backbone": self.backbone.get("name", "?"),
            "precision": self.embedder.precision, "device": str(self.embedder.device), "taps": self.embedder.taps,
            "heads": [self.heads.get(n).describe() for n in self.heads.names()],
            "index": self.index.stats() if self.index else None,
            "batching": self.batcher.describe(),
            "limits": {"max_upload_bytes": self.config.max_upload_bytes, "max_pixels": self.config.max_pixels,
                       "k_max": K_MAX},
        }


K_MAX = 100
