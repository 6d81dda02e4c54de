"""Everything the service loads at start: embedder, micro-batcher, heads, index, metrics."""

from __future__ import annotations

import logging

import faiss
import torch

from ..extract.embedder import embedder_for
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

    cache = FeatureCache(config.cache)
    fp = cache.resolve_fingerprint(config.fingerprint)
    for name, path in config.heads.items():
        load_bundle(path).check(fp, f"served cache's vectors (head {name!r})")
    if config.index:
        VectorIndex.load(config.index).check(fp)
    return fp


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
        self.embedder = embedder_for(attrs["backbone"], attrs["fingerprint"], sorted(taps), config.device)
        self.fingerprint = self.embedder.fingerprint
        self.backbone = attrs["backbone"]
        self.heads = HeadRegistry(self.fingerprint, self.embedder.taps)
        for name, path in config.heads.items():
            self.heads.add(name, path)
        faiss.omp_set_num_threads(1)  # single queries: threads only add latency
        self.batcher = MicroBatcher(self.embedder.embed, config.max_batch, config.max_wait_ms / 1000,
                                    config.batching, on_batch=metrics.batch.observe)
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
