"""The batch extraction job: hash, register, decode, embed, write, commit; resumable.

On a CPU the decode and model stages share the same cores, so they alternate: a decode
phase with one thread per core (torch ops single-threaded), then a model phase with all
cores in torch. Running them at once would oversubscribe the cores. On a GPU, decoding of
the next batches overlaps the forward pass of the current one.
"""

from __future__ import annotations

import contextlib
import hashlib
import multiprocessing
import time
from collections import Counter
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..errors import FeatcacheError
from ..progress import Progress
from ..runtime import available_cpus
from ..store.cache import STATUS_FAILED, STATUS_OK, FeatureCache, FeatureGroup, writer_lock
from .backbone import Backbone
from .decode import DEFAULT_MAX_PIXELS, load_image
from .embedder import Embedder
from .registry import DEFAULT_BACKBONE, resolve
from .runtimes.calibration import Calibration
from .sources import Item, list_source


@dataclass
class ExtractConfig:
    source: str
    cache: str
    backbone: str = DEFAULT_BACKBONE
    weights: str | None = None
    taps: list[str] = field(default_factory=lambda: ["final"])
    precision: str = "auto"
    runtime: str = "auto"  # auto | torch | openvino (extract/runtimes)
    device: str = "auto"
    batch_size: int | None = None
    workers: int | None = None
    labels: str = "folder"
    max_pixels: int = DEFAULT_MAX_PIXELS
    commit_every: int = 512
    progress: bool = True
    decode_processes: bool | None = None  # None: processes on GPU (the forward pass needs the GIL), threads on CPU


@dataclass
class _Work:
    image_row: int
    path: Path
    feature_row: int  # where its features go
    failed_before: bool = False  # catch-up of a row that already failed: nothing to compute


@dataclass
class _Buffer:
    """Rows computed but not committed yet (a contiguous run of feature rows)."""

    start: int
    image: list[int] = field(default_factory=list)
    status: list[int] = field(default_factory=list)
    error: list[str] = field(default_factory=list)
    taps: dict[str, list[np.ndarray]] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.image)


def _hash_file(path: Path) -> tuple[str | None, str]:
    try:
        with open(path, "rb") as f:
            return hashlib.file_digest(f, "sha256").hexdigest(), ""
    except OSError as e:
        return None, f"unreadable file: {e.strerror or e}"


def _decoder_init() -> None:
    torch.set_num_threads(1)


def _decode(path: Path, pre, max_pixels: int) -> np.ndarray | str:
    """uint8 (3, crop, crop) pixels, or the reason this file fails (plain types: they cross processes)."""
    try:
        data = path.read_bytes()
    except OSError as e:
        return f"unreadable file: {e.strerror or e}"
    try:
        return load_image(data, pre, max_pixels).numpy()
    except FeatcacheError as e:
        return str(e)
    except Exception as e:  # noqa: BLE001 - a hostile file must not stop the job
        return f"decoder error: {type(e).__name__}: {e}"


def _register(cache: FeatureCache, items: list[Item], hashes: list[tuple[str | None, str]]):
    """Add new contents to the image table and refresh key/path/label of known ones.

    Returns ([(image row, path)] of this source's distinct images, duplicate count, unreadable files).
    """
    unreadable = [{"key": it.key, "error": err} for it, (sha, err) in zip(items, hashes) if sha is None]
    table = cache.images()
    row_of = {s: i for i, s in enumerate(table.sha256)}
    new: list[tuple[str, str, str, str]] = []
    updates: list[tuple[int, str, str, str]] = []
    source_rows: list[tuple[int, Path]] = []
    duplicates = 0
    seen: set[str] = set()
    for it, (sha, _) in zip(items, hashes):
        if sha is None:
            continue
        if sha in seen:
            duplicates += 1
            continue
        seen.add(sha)
        path = str(it.path.resolve())
        if sha not in row_of:
            row_of[sha] = len(table) + len(new)
            new.append((sha, it.key, path, it.label))
        elif (table.key[row_of[sha]], table.path[row_of[sha]], table.label[row_of[sha]]) != (it.key, path, it.label):
            updates.append((row_of[sha], it.key, path, it.label))
        source_rows.append((row_of[sha], it.path))
    if updates:
        rows, keys, paths, labels = zip(*updates)
        cache.update_images(np.asarray(rows, dtype=np.int64), list(keys), list(paths), list(labels))
    if new:
        cache.append_images(*(list(col) for col in zip(*new)))
    return source_rows, duplicates, unreadable


class Extraction:
    """One run of ``featcache extract``; ``run()`` returns the summary dict."""

    def __init__(self, cfg: ExtractConfig, embedder: Embedder | None = None):
        self.cfg = cfg
        if embedder is None:
            backbone = Backbone.load(resolve(cfg.backbone, cfg.weights))
            embedder = Embedder(backbone, cfg.taps, cfg.device, cfg.precision, runtime=cfg.runtime,
                                calibration=lambda: Calibration.from_source(cfg.source))
        self.emb = embedder
        self.gpu = self.emb.device.type == "cuda"
        self.workers = cfg.workers or available_cpus()
        self.batch_size = cfg.batch_size or (64 if self.gpu else 8)
        self.timings = Counter()

    def run(self) -> dict:
        """Extract ``cfg.source`` into the cache."""
        items, skipped = list_source(self.cfg.source, self.cfg.labels)
        summary = self._locked(lambda cache: self._run(cache, items))
        summary["skipped_non_image_suffix"] = skipped
        return summary

    def run_cached_images(self) -> dict:
        """Compute this embedder's taps for every image already in the cache's image table."""
        def job(cache: FeatureCache) -> dict:
            table = cache.images()
            return self._extract_rows(cache, [(i, Path(p)) for i, p in enumerate(table.path)], files=len(table))
        return self._locked(job)

    def _locked(self, job) -> dict:
        t0 = time.perf_counter()
        with writer_lock(self.cfg.cache), ThreadPoolExecutor(self.workers, thread_name_prefix="featcache") as pool, \
                self._decoder_pool() as decoders:
            self.pool, self.decoders = pool, decoders or pool
            summary = job(FeatureCache(self.cfg.cache, create=True))
        summary["seconds"] = round(time.perf_counter() - t0, 3)
        summary["timings"] = {k: round(v, 3) for k, v in self.timings.items()}
        summary["images_per_second"] = round(summary["extracted"] / max(summary["timings"].get("extract", 0), 1e-9), 2)
        return summary

    def _decoder_pool(self):
        """Decoding in worker processes keeps the GIL free for the GPU's kernel launches."""
        use = self.gpu if self.cfg.decode_processes is None else self.cfg.decode_processes
        if not use:
            return contextlib.nullcontext()
        ctx = multiprocessing.get_context("spawn")  # never fork a process that holds CUDA state
        return ProcessPoolExecutor(self.workers, mp_context=ctx, initializer=_decoder_init)

    def _run(self, cache: FeatureCache, items: list[Item]) -> dict:
        t = time.perf_counter()
        torch.set_num_threads(1)
        hashes = list(self.pool.map(lambda it: _hash_file(it.path), items))
        self.timings["hash"] += time.perf_counter() - t

        source_rows, duplicates, unreadable = _register(cache, items, hashes)
        return self._extract_rows(cache, source_rows, len(items), duplicates, unreadable)

    def _extract_rows(self, cache: FeatureCache, source_rows: list[tuple[int, Path]], files: int,
                      duplicates: int = 0, unreadable: list[dict] | None = None) -> dict:
        unreadable = unreadable or []
        tap_dims = self.emb.backbone.tap_dims(self.emb.taps)
        group = cache.feature_group(self.emb.fingerprint, self.emb.canon, self.emb.spec.describe(), tap_dims)
        # Taps already in the group are always computed too, so all taps advance together.
        all_taps = sorted(group.taps)
        if set(all_taps) != set(self.emb.taps):
            self.emb = Embedder(self.emb.backbone, all_taps, str(self.emb.device), self.emb.precision, self.emb.threads,
                                runtime=self.emb.runtime, calibration=self.emb.calibration)

        done_rows = group.image_rows()
        status = group.status()
        have = set(done_rows.tolist())
        catch_from = min(group.tap_rows.values())
        table = cache.images()  # registered before this point: every row's current path and key
        catch_up = [_Work(int(done_rows[r]), Path(table.path[done_rows[r]]), r, bool(status[r] != STATUS_OK))
                    for r in range(catch_from, group.rows)]
        new = []
        for image_row, path in source_rows:
            if image_row not in have:
                new.append(_Work(image_row, path, group.rows + len(new)))

        total = len(catch_up) + len(new)
        prog = Progress(total, f"extract {self.emb.spec.name}", self.cfg.progress and total > 0)
        t = time.perf_counter()
        failures: Counter = Counter()
        failed_items: list[dict] = []
        if catch_up:
            self._process(group, catch_up, prog, failures, failed_items, catch_up=True)
        if new:
            self._process(group, new, prog, failures, failed_items, catch_up=False)
        prog.close()
        self.timings["extract"] += time.perf_counter() - t
        for f in failed_items:
            f["key"] = table.key[f.pop("image_row")]
        failed_items += unreadable
        return {
            "cache": str(cache.root), "fingerprint": self.emb.fingerprint, "backbone": self.emb.spec.name,
            "device": str(self.emb.device), "precision": self.emb.precision, "taps": all_taps,
            "files": files, "unique_images": len(source_rows), "duplicate_files": duplicates,
            "already_cached": len(source_rows) - len(new), "extracted": len(new) + len(catch_up),
            "failed": len(failed_items), "failure_reasons": dict(failures + Counter(
                u["error"].split(":")[0] for u in unreadable)),
            "failures": failed_items[:1000], "batch_size": self.batch_size, "workers": self.workers,
        }

    # -- the hot loop ------------------------------------------------------------
    def _submit(self, batch: list[_Work]) -> list[Future]:
        pre, mp = self.emb.spec.preprocess, self.cfg.max_pixels
        return [self.decoders.submit(_decode, w.path, pre, mp) if not w.failed_before else None for w in batch]

    def _process(self, group: FeatureGroup, work: list[_Work], prog: Progress, failures: Counter,
                 failed_items: list[dict], catch_up: bool) -> None:
        batches = [work[i : i + self.batch_size] for i in range(0, len(work), self.batch_size)]
        depth = 2 if self.gpu else 0  # batches decoded ahead of the model
        pending: list[list[Future]] = []
        buf = _Buffer(work[0].feature_row)
        for i, batch in enumerate(batches):
            if not self.gpu:
                torch.set_num_threads(1)  # decode phase: one thread per worker
            t = time.perf_counter()
            while len(pending) <= min(depth, len(batches) - 1 - i):
                pending.append(self._submit(batches[i + len(pending)]))
            decoded = [f.result() if f is not None else "failed before" for f in pending.pop(0)]
            self.timings["decode"] += time.perf_counter() - t

            ok = [j for j, d in enumerate(decoded) if isinstance(d, np.ndarray)]
            t = time.perf_counter()
            if not self.gpu:
                torch.set_num_threads(self.emb.threads)  # model phase: all cores
            out = {}
            if ok:  # on the CPU a short last batch runs padded to the batch size (one graph shape)
                images = torch.from_numpy(np.stack([decoded[j] for j in ok]))
                out = self.emb.embed(images, pad_to=None if self.gpu else self.batch_size)
            self.timings["model"] += time.perf_counter() - t

            for tap, dim in ((k, group.taps[k]) for k in group.taps):
                full = np.full((len(batch), dim), np.nan, dtype=np.float32)
                if ok:
                    full[ok] = out[tap]
                buf.taps.setdefault(tap, []).append(full)
            for w, d in zip(batch, decoded):
                failed = not isinstance(d, np.ndarray)
                buf.image.append(w.image_row)
                buf.status.append(STATUS_FAILED if failed else STATUS_OK)
                buf.error.append(d if failed and not w.failed_before else "")
                if failed and not w.failed_before:
                    failures[d.split(":")[0]] += 1
                    failed_items.append({"image_row": w.image_row, "error": d})
            prog.update(len(batch))
            if len(buf) >= self.cfg.commit_every or i == len(batches) - 1:
                buf = self._commit(group, buf, catch_up)

    def _commit(self, group: FeatureGroup, buf: _Buffer, catch_up: bool) -> _Buffer:
        t = time.perf_counter()
        end = buf.start + len(buf)
        if not catch_up:
            group.write_rows(buf.start, np.asarray(buf.image, np.int64), np.asarray(buf.status, np.int8), buf.error)
        else:  # rows exist already; only images that stopped decoding change status
            newly = [(buf.start + i, e) for i, e in enumerate(buf.error) if e]
            group.mark_failed([r for r, _ in newly], [e for _, e in newly])
        tap_rows = {}
        for tap, parts in buf.taps.items():
            first = max(buf.start, group.tap_rows[tap]) if catch_up else buf.start
            if first < end:
                group.write_tap(tap, first, np.concatenate(parts)[first - buf.start :])
                tap_rows[tap] = end
        group.commit(end if not catch_up else group.rows, tap_rows)
        self.timings["write"] += time.perf_counter() - t
        return _Buffer(end)


def extract(cfg: ExtractConfig) -> dict:
    return Extraction(cfg).run()
