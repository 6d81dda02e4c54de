"""Everything the service loads at start: embedder, micro-batcher, heads, index, metrics.

Start-up reads in two steps. ``preflight`` reads manifests only (the cache's attributes, each
head's and the index's ``manifest.json``) and refuses a head or index of another fingerprint,
or an index of another cache, before anything heavy loads. ``ServiceState`` then loads each
head bundle and the index once, from the ``Plan`` preflight returned.

An ensemble head (``classify.bundle``, several member fingerprints) needs every member's
fingerprint in the served cache; the service then loads one embedder per member fingerprint
besides the served one (``embedders``), each with the taps the heads read, and keeps a
``Catalogue`` of each for classifying a cached image by its hash. Members' passes are not
micro-batched: each runs in a model thread pool of its own, as the served backbone's do
with batching off.
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import faiss
import torch

from ..errors import FingerprintMismatch, UsageError
from ..extract.embedder import Embedder, embedder_for, resolve_device
from ..progress import loading
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
    """What preflight found: the served cache and fingerprint, and every tap the heads and index need
    (``members``: the other fingerprints ensemble heads read, with their taps)."""

    cache: FeatureCache
    fingerprint: str
    taps: tuple[str, ...]
    workers: int
    batching: bool
    members: dict[str, tuple[str, ...]] = field(default_factory=dict)


def preflight(config: ServiceConfig) -> Plan:
    """Check, from manifests alone, that every head and the index belong to the served cache."""
    workers, batching = execution(config)  # a bad --model-workers or --device fails here too
    cache = FeatureCache(config.cache)
    heads = {name: head_manifest(path) for name, path in config.heads.items()}
    manifest = read_manifest(config.index) if config.index else None
    fp = _served_fingerprint(config, cache, heads, manifest)
    taps = {"final"}
    members: dict[str, set[str]] = {}
    for name, head in heads.items():
        if head.is_ensemble:
            for m in head.members:
                if m.fingerprint not in cache.fingerprints():
                    raise FingerprintMismatch(
                        f"ensemble head {name!r} reads fingerprint {m.fingerprint} ({m.backbone.get('name')}), which "
                        f"cache {cache.root} does not hold ({', '.join(cache.fingerprints())}); extract the images "
                        "with that backbone too (featcache extract --backbone A B ...)")
                (taps if m.fingerprint == fp else members.setdefault(m.fingerprint, set())).add(m.tap)
            continue
        head.check(fp, f"served cache's vectors (head {name!r})")
        taps.add(head.tap)
    if manifest is not None:
        check_fingerprint(manifest, fp)
        check_cache(manifest, cache)
        taps.add(manifest["tap"])
    return Plan(cache, fp, tuple(sorted(taps)), workers, batching, {f: tuple(sorted(t)) for f, t in members.items()})


def _served_fingerprint(config: ServiceConfig, cache: FeatureCache, heads: dict, index: dict | None) -> str:
    """``--fingerprint``, or the cache's only one. With an ensemble head and no ``--fingerprint``: the first
    fingerprint every head and the index read (members in the head's order), so an ensemble (whose cache
    holds several) serves without one; when none is common, the cache's own rule (one, or say which)."""
    if config.fingerprint is not None or not any(h.is_ensemble for h in heads.values()):
        return cache.resolve_fingerprint(config.fingerprint)
    reads = [[m.fingerprint for m in h.members] for h in heads.values()] + ([[index["fingerprint"]]] if index else [])
    common = [f for f in reads[0] if all(f in r for r in reads[1:]) and f in cache.fingerprints()]
    return common[0] if common else cache.resolve_fingerprint(None)


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
        threads = max(1, available_cpus() // plan.workers)
        with loading(attrs["backbone"]["name"]):
            self.embedder = embedder_for(attrs["backbone"], attrs["fingerprint"], list(plan.taps), config.device,
                                         threads=threads, runtime=config.runtime, precision=config.precision,
                                         cache=config.cache, streams=plan.workers)
        self.fingerprint = self.embedder.fingerprint
        self.backbone = attrs["backbone"]
        extra = {}  # the other backbones ensemble heads read
        for fp, taps in plan.members.items():
            a = plan.cache.group_attrs(fp)
            with loading(a["backbone"]["name"]):
                extra[fp] = embedder_for(a["backbone"], a["fingerprint"], list(taps), config.device, threads=threads,
                                         runtime=config.runtime, precision=config.precision, cache=config.cache,
                                         streams=plan.workers)
        self.embedders = {self.fingerprint: self.embedder, **extra}
        self.heads = HeadRegistry(self.fingerprint, self.embedder.taps, {fp: e.taps for fp, e in extra.items()})
        for name, path in config.heads.items():
            self.heads.add(name, path)
        self.catalogue = Catalogue(plan.cache, plan.fingerprint)
        self.catalogues = {self.fingerprint: self.catalogue, **{fp: Catalogue(plan.cache, fp) for fp in extra}}
        self.thumbnails = ThumbnailCache(config.thumbnail_cache_bytes)
        # Decodes get threads of their own: one waiting on the decode memory budget must not hold a
        # thread of the default pool that classify, search and reviews use.
        self.decoders = ThreadPoolExecutor(available_cpus(), thread_name_prefix="featcache-decode")
        self.reviews = Reviews(self.catalogue, self.index.manifest["tap"] if self.index else "final")
        faiss.omp_set_num_threads(1)  # single queries: threads only add latency
        self.batcher = MicroBatcher(self.embedder.embed, config.max_batch, config.max_wait_ms / 1000,
                                    plan.batching, on_batch=metrics.batch.observe, workers=plan.workers)
        self.batchers = {self.fingerprint: self.batcher, **{
            fp: MicroBatcher(e.embed, config.max_batch, config.max_wait_ms / 1000, plan.batching,
                             on_batch=metrics.batch.observe, workers=plan.workers)
            for fp, e in extra.items()}}
        for fp, emb in self.embedders.items():
            with loading(f"{emb.spec.name} warm-up"):
                self._warm_up(emb, self.batchers[fp])

    @staticmethod
    def _warm_up(embedder: Embedder, batcher: MicroBatcher) -> None:
        """Trace/freeze the model and run every batch shape the batcher uses twice, so no request pays for it."""
        crop = embedder.spec.preprocess.crop
        for n in [1] + batcher.bucket_sizes() * 2:
            embedder.embed(torch.zeros((n, 3, crop, crop), dtype=torch.uint8))

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
