"""The batch extraction job: list, then read -> hash -> skip known content -> decode -> embed -> commit.

``Extraction`` holds what a run needs (config, embedder, the cache's feature group, the writer)
and hands the stages to an engine (``engines.local`` in this process, ``engines.ray`` on a Ray
cluster). The writer commits through the ledger either way, so a killed job of either engine
resumes with every image stored exactly once.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ..errors import NotFoundError, UsageError
from ..progress import Progress
from ..runtime import available_cpus
from ..store.cache import FeatureCache, FeatureGroup, writer_lock
from .engines import ENGINES
from .headers import DEFAULT_MAX_PIXELS
from .keep import Kept, kept_group
from .registry import DEFAULT_BACKBONE, resolve
from .runtimes import check_device
from .sources import Item, Listing, list_source
from .spec import BackboneSpec
from .stages import DEFAULT_MAX_FILE_BYTES
from .writer import CacheWriter, TapCatchUp

if TYPE_CHECKING:  # torch: imported only when a model is built
    from .embedder import Embedder


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
    """One backbone of a run: its fingerprint, the cache group of it, and its embedder, built on first use.

    The fingerprint is known before any model: from the embedder a first run builds, or from the
    group the cache already holds (``keep.Kept``, also what the Ray engine makes of the fingerprint its
    actors report), whose model is loaded only when an image, or a tap to catch up, needs it.
    """

    def __init__(self, spec: BackboneSpec, taps: list[str], fingerprint: str, canon: dict, runtime: str,
                 build: Callable[[list[str]], Embedder], embedder: Embedder | None = None,
                 dims: dict[str, int] | None = None):
        self.spec, self.taps, self.fingerprint, self.canon = spec, list(dict.fromkeys(taps)), fingerprint, canon
        self._runtime, self._build, self._embedder, self._dims = runtime, build, embedder, dims
        self.group: FeatureGroup | None = None
        self.catch_up: TapCatchUp | None = None  # taps added to the group after its rows were written

    @classmethod
    def built(cls, emb: Embedder) -> Target:
        """A target whose embedder exists already (a first run, or one handed to ``Extraction``)."""
        return cls(emb.spec, emb.taps, emb.fingerprint, emb.canon, emb.runtime, lambda taps: emb, emb)

    @classmethod
    def kept(cls, spec: BackboneSpec, taps: list[str], kept: Kept, device: str, cache: str) -> Target:
        """A target keeping an existing group: ``embedder_for`` rebuilds (and checks) its fingerprint when needed."""
        def build(wanted: list[str]) -> Embedder:
            from .embedder import embedder_for

            return embedder_for(spec.describe(), kept.canon, wanted, device, runtime=kept.runtime, cache=cache)

        return cls(spec, taps, kept.fingerprint, kept.canon, kept.runtime, build, dims=kept.taps)

    @property
    def loaded(self) -> bool:
        return self._embedder is not None

    @property
    def embedder(self) -> Embedder:
        """The embedder, computing every tap the fingerprint's group holds (so all taps advance together)."""
        emb = self._embedder
        wanted = sorted(self.group.taps) if self.group is not None else self.taps
        if emb is None:
            emb = self._build(wanted)
        elif set(wanted) != set(emb.taps):
            from .embedder import Embedder

            emb = Embedder(emb.backbone, wanted, str(emb.device), emb.precision, emb.threads,
                           runtime=emb.runtime, calibration=emb.calibration)
        self._embedder = emb
        return emb

    def description(self) -> dict:
        """What rebuilds this embedder elsewhere (a Ray worker): ``embedder_for``'s inputs + the fingerprint."""
        runtime = self._embedder.runtime if self._embedder is not None else self._runtime
        return {"description": self.spec.describe(), "canon": self.canon, "fingerprint": self.fingerprint,
                "runtime": runtime}

    def open(self, cache: FeatureCache, commit_every: int) -> None:
        """Open (or create) the group; the model is built here only for taps the group does not hold yet."""
        dims = self._dims
        if dims is not None and set(self.taps) <= set(dims):
            dims = {t: dims[t] for t in self.taps}
        else:
            dims = self.embedder.backbone.tap_dims(self.taps)
        self.group = cache.feature_group(self.fingerprint, self.canon, self.spec.describe(), dims)
        lagging = min(self.group.tap_rows.values()) < self.group.rows
        self.catch_up = TapCatchUp(self.group, commit_every) if lagging else None

    def summary(self, device: str) -> dict:
        """This backbone's part of the run's summary (``device``: the asked one, where no model was loaded)."""
        emb = self._embedder
        return {"fingerprint": self.fingerprint, "backbone": self.spec.name,
                "device": str(emb.device) if emb is not None else device, "precision": self.canon["precision"],
                "taps": sorted(self.group.taps), "model_loaded": emb is not None}


class Extraction:
    """One run of ``featcache extract`` (one or several backbones); ``run()`` returns the summary dict.

    A backbone the cache already holds keeps its group (``keep.kept_group``) and loads no model
    unless some image needs it; a re-run with nothing new imports no torch.
    """

    def __init__(self, cfg: ExtractConfig, embedder: Embedder | list[Embedder] | None = None):
        if cfg.engine not in ENGINES:
            raise UsageError(f"--engine must be one of {ENGINES}, got {cfg.engine!r}")
        for name in ("max_pixels", "max_file_bytes", "commit_every"):
            if getattr(cfg, name) < 1:
                raise UsageError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(cfg, name)}")
        check_device(cfg.device)
        self.cfg = cfg
        if cfg.engine == "ray":  # before any work: without Ray this is a one-line error
            from .engines.ray import require_ray

            require_ray(cfg.ray_address)
        if embedder is None:
            names = [cfg.backbone] if isinstance(cfg.backbone, str) else list(cfg.backbone)
            self.specs = [resolve(n, cfg.weights) for n in dict.fromkeys(names)]
            self.targets: list[Target] | None = None
        else:
            self.targets = [Target.built(e) for e in (embedder if isinstance(embedder, list) else [embedder])]
            self.specs = [t.spec for t in self.targets]
        self.preprocess = [s.preprocess for s in self.specs]
        if cfg.engine != "ray":  # on Ray the actors build the models the cache does not hold (engines.ray)
            self._resolve()
        self.workers = cfg.workers or available_cpus()
        self.timings: Counter = Counter()

    def _resolve(self) -> list[Target]:
        """The targets: fingerprints known, models built for backbones the cache does not hold yet."""
        if self.targets is None:
            held = _existing(self.cfg.cache)
            self.targets = [self._target(spec, held) for spec in self.specs]
        fps = [t.fingerprint for t in self.targets]
        if len(set(fps)) != len(fps):
            raise UsageError("two of the backbones give the same fingerprint (the same network, weights and "
                             "preprocessing): name each once")
        return self.targets

    def _target(self, spec: BackboneSpec, held: FeatureCache | None) -> Target:
        cfg = self.cfg
        kept = self._kept(spec, held)
        if kept is not None:
            return kept
        from .embedder import new_embedder

        return Target.built(new_embedder(spec, cfg.taps, cfg.device, cfg.precision, cfg.runtime, cfg.source))

    def _kept(self, spec: BackboneSpec, held: FeatureCache | None) -> Target | None:
        cfg = self.cfg
        kept = kept_group(held, spec, cfg.runtime, cfg.precision) if held is not None else None
        return Target.kept(spec, cfg.taps, kept, cfg.device, cfg.cache) if kept is not None else None

    def known_targets(self, cache: FeatureCache) -> list[Target | None]:
        """Each backbone's target where no model is needed to know its fingerprint (embedders given, groups
        the cache holds), group opened; None for a backbone new to the cache (the Ray engine's actors
        build those, and say which fingerprint they made: ``Target.kept`` of it then)."""
        targets = self.targets or [self._kept(spec, cache) for spec in self.specs]
        for t in targets:
            if t is not None:
                t.open(cache, self.cfg.commit_every)
        return list(targets)

    @property
    def gpu(self) -> bool:
        """Whether the forward pass runs on a GPU; asked only where there is work (it builds the embedders)."""
        return self.cfg.device != "cpu" and any(t.embedder.device.type == "cuda" for t in self.targets)

    @property
    def batch_size(self) -> int:
        return self.cfg.batch_size or (64 if self.gpu else 8)

    @property
    def loaded(self) -> bool:
        """Whether any model was built (a no-op re-run builds none)."""
        return any(t.loaded for t in self.targets)

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

    def prepare(self, cache: FeatureCache, listing: Listing) -> tuple[CacheWriter, Progress]:
        """Targets resolved, their groups opened, the writer and the progress: what an engine does first
        (the Ray engine at its first batch, once its actors said which fingerprints they built)."""
        t0 = time.perf_counter()
        targets = self._resolve()
        for t in targets:
            if t.group is None:
                t.open(cache, self.cfg.commit_every)
        writer = CacheWriter(cache, {t.fingerprint: t.group for t in targets}, self.cfg.commit_every)
        for f in listing.failed:
            writer.unreadable(f["key"], f["error"])
        total = len(listing.items) + sum(t.group.rows - t.catch_up.start for t in targets if t.catch_up)
        name = "+".join(t.spec.name for t in targets)
        progress = Progress(total, f"extract {name}", self.cfg.progress and total > 0)
        self.timings["prepare"] += time.perf_counter() - t0
        return writer, progress

    def _run(self, cache: FeatureCache, listing: Listing) -> dict:
        t0 = time.perf_counter()
        writer, progress = self._engine().run(cache, listing)
        progress.close()
        self.timings["extract"] += time.perf_counter() - t0 - self.timings["prepare"]
        self.timings.update(writer.timings)
        backbones = []
        for t in self.targets:
            b = t.summary(self.cfg.device)
            if t.catch_up is not None:
                self.timings.update(t.catch_up.timings)
                if t.catch_up.missing:
                    b["tap_rows_missing"] = dict(t.catch_up.missing)
            backbones.append(b)
        summary = {"cache": str(cache.root), **backbones[0], "backbones": backbones, "engine": self.cfg.engine,
                   **writer.summary(), "skipped_non_image_suffix": listing.skipped,
                   "batch_size": self.batch_size if self.loaded or self.cfg.device == "cpu" else self.cfg.batch_size,
                   "workers": self.workers}
        return summary

    def _engine(self):
        if self.cfg.engine == "ray":
            from .engines.ray import RayEngine

            return RayEngine(self)
        from .engines.local import LocalEngine

        return LocalEngine(self)


def _existing(cache: str) -> FeatureCache | None:
    """The cache as it stands, read-only (None before its first run): what ``keep.kept_group`` reads."""
    try:
        return FeatureCache(cache)
    except NotFoundError:
        return None


def extract(cfg: ExtractConfig) -> dict:
    return Extraction(cfg).run()
