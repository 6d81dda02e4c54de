"""The batch extraction job: list, then read -> hash -> skip known content -> decode -> embed -> commit.

``Extraction`` holds what a run needs (config, embedder, the cache's feature group, the writer)
and hands the stages to an engine (``engines.local`` in this process, ``engines.ray`` on a Ray
cluster). The writer commits through the ledger either way, so a killed job of either engine
resumes with every image stored exactly once.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field

from ..errors import UsageError
from ..progress import Progress
from ..runtime import available_cpus
from ..store.cache import FeatureCache, FeatureGroup, writer_lock
from .backbone import Backbone
from .decode import DEFAULT_MAX_PIXELS
from .embedder import Embedder
from .engines import ENGINES
from .registry import DEFAULT_BACKBONE, resolve
from .runtimes.calibration import Calibration
from .sources import Item, Listing, list_source
from .stages import DEFAULT_MAX_FILE_BYTES
from .writer import CacheWriter, TapCatchUp


@dataclass
class ExtractConfig:
    source: str | None  # folder or CSV; None with ``Extraction.run(listing)``
    cache: str
    backbone: str | list[str] = DEFAULT_BACKBONE  # several: each image is decoded once and embedded by each
    weights: str | None = None
    taps: list[str] = field(default_factory=lambda: ["final"])
    precision: str = "auto"
    runtime: str = "auto"  # auto | torch | openvino (extract/runtimes)
    device: str = "auto"
    batch_size: int | None = None
    workers: int | None = None
    labels: str = "folder"
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_file_bytes: int = DEFAULT_MAX_FILE_BYTES
    commit_every: int = 512
    progress: bool = True
    decode_processes: bool | None = None  # None: processes on GPU (the forward pass needs the GIL), threads on CPU
    engine: str = "local"
    ray_address: str | None = None  # "auto", HOST:PORT, or None: a Ray cluster on this machine
    actors: int | None = None  # embedding actors (ray engine)
    gpus_per_actor: float | None = None  # None: 1 where the cluster has GPUs, else 0
    cpus_per_actor: float | None = None


def cached_images(cache: FeatureCache) -> Listing:
    """The files behind every image the cache holds (orphans, whose file holds other bytes now, left out)."""
    from pathlib import Path

    table = cache.images()
    return Listing([Item(Path(p), k, lbl) for k, p, lbl in zip(table.key.tolist(), table.path, table.label.tolist())
                    if k])


class Target:
    """One backbone of a run: its embedder and the cache group of its fingerprint."""

    def __init__(self, embedder: Embedder):
        self._embedder = embedder
        self.group: FeatureGroup | None = None
        self.catch_up: TapCatchUp | None = None  # taps added to the group after its rows were written

    @property
    def fingerprint(self) -> str:
        return self._embedder.fingerprint

    @property
    def spec(self):
        return self._embedder.spec

    @property
    def embedder(self) -> Embedder:
        """The embedder, computing every tap the fingerprint's group holds (so all taps advance together)."""
        emb = self._embedder
        if self.group is not None and set(self.group.taps) != set(emb.taps):
            emb = Embedder(emb.backbone, sorted(self.group.taps), str(emb.device), emb.precision, emb.threads,
                           runtime=emb.runtime, calibration=emb.calibration)
            self._embedder = emb
        return emb

    def description(self) -> dict:
        """What rebuilds this embedder elsewhere (a Ray worker): ``embedder_for``'s inputs + the fingerprint."""
        emb = self._embedder
        return {"description": emb.spec.describe(), "canon": emb.canon, "fingerprint": emb.fingerprint,
                "runtime": emb.runtime}

    def open(self, cache: FeatureCache, commit_every: int) -> None:
        emb = self._embedder
        self.group = cache.feature_group(emb.fingerprint, emb.canon, emb.spec.describe(),
                                         emb.backbone.tap_dims(emb.taps))
        lagging = min(self.group.tap_rows.values()) < self.group.rows
        self.catch_up = TapCatchUp(self.group, commit_every) if lagging else None


class Extraction:
    """One run of ``featcache extract`` (one or several backbones); ``run()`` returns the summary dict."""

    def __init__(self, cfg: ExtractConfig, embedder: Embedder | list[Embedder] | None = None):
        if cfg.engine not in ENGINES:
            raise UsageError(f"--engine must be one of {ENGINES}, got {cfg.engine!r}")
        for name in ("max_pixels", "max_file_bytes", "commit_every"):
            if getattr(cfg, name) < 1:
                raise UsageError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(cfg, name)}")
        self.cfg = cfg
        if cfg.engine == "ray":  # before any work: without Ray this is a one-line error
            from .engines.ray import require_ray

            require_ray(cfg.ray_address)
        if embedder is None:
            names = [cfg.backbone] if isinstance(cfg.backbone, str) else list(cfg.backbone)
            calibration = (lambda: Calibration.from_source(cfg.source)) if cfg.source else None
            embedder = [Embedder(Backbone.load(resolve(n, cfg.weights)), cfg.taps, cfg.device, cfg.precision,
                                 runtime=cfg.runtime, calibration=calibration) for n in dict.fromkeys(names)]
        embedders = embedder if isinstance(embedder, list) else [embedder]
        fps = [e.fingerprint for e in embedders]
        if len(set(fps)) != len(fps):
            raise UsageError("two of the backbones give the same fingerprint (the same network, weights and "
                             "preprocessing): name each once")
        self.targets = [Target(e) for e in embedders]
        self.preprocess = [e.spec.preprocess for e in embedders]
        self.gpu = any(e.device.type == "cuda" for e in embedders)
        self.workers = cfg.workers or available_cpus()
        self.batch_size = cfg.batch_size or (64 if self.gpu else 8)
        self.timings: Counter = Counter()

    def run(self, listing: Listing | None = None) -> dict:
        """Extract ``cfg.source`` (or the given listing) into the cache."""
        if listing is None:
            if self.cfg.source is None:
                raise UsageError("no SOURCE to extract")
            listing = list_source(self.cfg.source, self.cfg.labels)
        t0 = time.perf_counter()
        with writer_lock(self.cfg.cache):
            cache = FeatureCache(self.cfg.cache, create=True)
            summary = self._run(cache, listing)
        summary["seconds"] = round(time.perf_counter() - t0, 3)
        summary["timings"] = {k: round(v, 3) for k, v in self.timings.items()}
        summary["images_per_second"] = round(summary["extracted"] / max(summary["timings"].get("extract", 0), 1e-9), 2)
        return summary

    def _run(self, cache: FeatureCache, listing: Listing) -> dict:
        for t in self.targets:
            t.open(cache, self.cfg.commit_every)
        writer = CacheWriter(cache, {t.fingerprint: t.group for t in self.targets}, self.cfg.commit_every)
        for f in listing.failed:
            writer.unreadable(f["key"], f["error"])
        total = len(listing.items) + sum(t.group.rows - t.catch_up.start for t in self.targets if t.catch_up)
        name = "+".join(t.spec.name for t in self.targets)
        progress = Progress(total, f"extract {name}", self.cfg.progress and total > 0)
        t0 = time.perf_counter()
        self._engine().run(writer, listing.items, progress)
        progress.close()
        self.timings["extract"] += time.perf_counter() - t0
        self.timings.update(writer.timings)
        backbones = []
        for t in self.targets:
            emb = t.embedder
            b = {"fingerprint": emb.fingerprint, "backbone": emb.spec.name, "device": str(emb.device),
                 "precision": emb.precision, "taps": sorted(t.group.taps)}
            if t.catch_up is not None:
                self.timings.update(t.catch_up.timings)
                if t.catch_up.missing:
                    b["tap_rows_missing"] = dict(t.catch_up.missing)
            backbones.append(b)
        summary = {"cache": str(cache.root), **backbones[0], "backbones": backbones, "engine": self.cfg.engine,
                   **writer.summary(), "skipped_non_image_suffix": listing.skipped, "batch_size": self.batch_size,
                   "workers": self.workers}
        return summary

    def _engine(self):
        if self.cfg.engine == "ray":
            from .engines.ray import RayEngine

            return RayEngine(self)
        from .engines.local import LocalEngine

        return LocalEngine(self)


def extract(cfg: ExtractConfig) -> dict:
    return Extraction(cfg).run()
