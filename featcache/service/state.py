"""Everything the service loads at start: embedder, micro-batcher, heads, index, metrics.

Start-up reads in two steps. ``preflight`` reads manifests only (the cache's attributes, each
head's and the index's ``manifest.json``) and refuses a head or index of another fingerprint,
or an index of another cache, before anything heavy loads. ``ServiceState`` then loads each
head bundle and the index once, from the ``Plan`` preflight returned.
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import faiss
import torch

from ..errors import UsageError
from ..extract.embedder import embedder_for, resolve_device
from ..runtime import available_cpus
from ..store.cache import FeatureCache
from ..store.index import VectorIndex, check_cache, check_fingerprint, read_manifest
from .batching import MicroBatcher
from .catalogue import Catalogue
from .config import ServiceConfig
from .heads import HeadRegistry, head_manifest
from .metrics import Metrics
from .review import Reviews
from .thumbnails import ThumbnailCache

log = logging.getLogger(__name__)
K_MAX = 100  # most neighbours one search returns


@dataclass(frozen=True)
class Plan:
    """What preflight found: the served cache and fingerprint, and every tap the heads and index need."""

    cache: FeatureCache
    fingerprint: str
    taps: tuple[str, ...]
    workers: int
    batching: bool


def preflight(config: ServiceConfig) -> Plan:
    """Check, from manifests alone, that every head and the index belong to the served cache."""
    workers, batching = execution(config)  # a bad --model-workers or --device fails here too
    cache = FeatureCache(config.cache)
    fp = cache.resolve_fingerprint(config.fingerprint)
    taps = {"final"}
    for name, path in config.heads.items():
        head = head_manifest(path)
        head.check(fp, f"served cache's vectors (head {name!r})")
        taps.add(head.tap)
    if config.index:
        manifest = read_manifest(config.index)
        check_fingerprint(manifest, fp)
        check_cache(manifest, cache)
        taps.add(manifest["tap"])
    return Plan(cache, fp, tuple(sorted(taps)), workers, batching)


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
    """Built in the app's lifespan from a preflight ``Plan`` (made here when not given)."""

    def __init__(self, config: ServiceConfig, metrics: Metrics, plan: Plan | None = None):
        self.config = config
        self.metrics = metrics
        plan = plan or preflight(config)
        self.index: VectorIndex | None = None
        if config.index:
            self.index = VectorIndex.load(config.index)
            self.index.check(plan.fingerprint)  # the files may have changed since preflight read the manifest
            check_cache(self.index.manifest, plan.cache)
        attrs = plan.cache.group_attrs(plan.fingerprint)
        self.embedder = embedder_for(attrs["backbone"], attrs["fingerprint"], list(plan.taps), config.device,
                                     threads=max(1, available_cpus() // plan.workers), runtime=config.runtime,
                                     precision=config.precision, cache=config.cache, streams=plan.workers)
        self.fingerprint = self.embedder.fingerprint
        self.backbone = attrs["backbone"]
        self.heads = HeadRegistry(self.fingerprint, self.embedder.taps)
        for name, path in config.heads.items():
            self.heads.add(name, path)
        self.catalogue = Catalogue(plan.cache, plan.fingerprint)
        self.thumbnails = ThumbnailCache(config.thumbnail_cache_bytes)
        # Decodes get threads of their own: one waiting on the decode memory budget must not hold a
        # thread of the default pool that classify, search and reviews use.
        self.decoders = ThreadPoolExecutor(available_cpus(), thread_name_prefix="featcache-decode")
        self.reviews = Reviews(self.catalogue, self.index.manifest["tap"] if self.index else "final")
        faiss.omp_set_num_threads(1)  # single queries: threads only add latency
        self.batcher = MicroBatcher(self.embedder.embed, config.max_batch, config.max_wait_ms / 1000,
                                    plan.batching, on_batch=metrics.batch.observe, workers=plan.workers)
        self._warm_up()

    def _warm_up(self) -> None:
        """Trace/freeze the model and run every batch shape the batcher uses twice, so no request pays for it."""
        crop = self.embedder.spec.preprocess.crop
        for n in [1] + self.batcher.bucket_sizes() * 2:
            self.embedder.embed(torch.zeros((n, 3, crop, crop), dtype=torch.uint8))

    def describe(self) -> dict:
        return {
            "fingerprint": self.fingerprint, "images": len(self.catalogue), "backbone": self.backbone.get("name", "?"),
            "precision": self.embedder.precision, "device": str(self.embedder.device), "taps": self.embedder.taps,
            "heads": [self.heads.get(n).describe() for n in self.heads.names()],
            "index": self.index.stats() if self.index else None,
            "batching": self.batcher.describe(),
            "limits": {"max_upload_bytes": self.config.max_upload_bytes, "max_pixels": self.config.max_pixels,
                       "max_header_bytes": self.config.max_header_bytes, "k_max": K_MAX},
            "thumbnails": self.thumbnails.describe(),
        }
