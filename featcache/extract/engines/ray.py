"""The Ray Data engine: the same stages on a Ray cluster, results streamed back to the one writer.

    from_items(listing) -> read+sha256 (tasks) -> decode (tasks) -> embed (actor pool) -> iter_batches -> writer

- Every file is read once, in a task: the bytes hashed are the bytes decoded. Content the
  fingerprint already holds (a sorted array of sha256 digests, one ``ray.put``) keeps its row
  but loses its bytes there, so it never reaches the model; its metadata still reaches the
  writer, which refreshes moved or renamed files exactly as the local engine does.
- The driver loads no model. A backbone the cache holds is rebuilt by each actor from the stored
  spec, which checks that it reproduces the stored fingerprint (a node running other code fails
  loudly instead of writing other vectors). A backbone new to the cache is built by the actors as a
  first local run builds it (``embedder.new_embedder``: runtime and precision chosen, int8
  calibrated on SOURCE); each batch says which fingerprint it was made with, the driver opens the
  group at the first batch and refuses a batch of another one (nodes that chose differently).
  So a job's model libraries are imported and its model built once per actor, not also in the
  driver: on a small cluster that is most of a job's start-up.
- On a CPU-only cluster each node gets one actor holding all its CPUs (the local engine's shape:
  one model per machine), and the read and decode tasks ask for the same resources, so Ray Data
  fuses the three stages into the actor processes: no pixels cross the object store, and each
  process alternates a decode phase (one thread per CPU) and a model phase (all CPUs). One model
  per node also means one start-up (imports, model load) per node per job. With GPU actors the
  read and decode tasks run apart on every node's CPUs.
- Faults: Ray Data restarts killed actors and retries killed tasks (its defaults); a killed
  driver loses only rows not yet committed, which the next run computes (the ledger).
- Bad files are rows with a reason, exactly as locally; an exception in a stage fails the job.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ...errors import FeatcacheError, FingerprintMismatch, UsageError
from ...runtime import available_cpus
from ..runtimes import check_precision
from ..sources import Item
from ..spec import Preprocess
from ..stages import decode_bytes, read_file
from ..writer import CacheWriter

if TYPE_CHECKING:
    from ...progress import Progress
    from ...store.cache import FeatureCache, FeatureGroup
    from ..pipeline import Extraction, Target
    from ..sources import Listing

RAY_HINT = "--engine ray needs Ray: pip install 'featcache[ray]' (or pip install 'ray[data]')"
LOCAL_STORE_BYTES = 512 * 1024 * 1024  # object store of a cluster started here (pixels of ~3,000 images)
NEW, CACHED, FAILED, UNREADABLE = "new", "cached", "failed", "unreadable"
# Read and decode of 1,000 JPEGs as Ray Data tasks took 18.6 s in 16-image blocks, 3.4 s in 64, 2.9 s in 128 (1.9 s
# in one process; 2-core Zen 3): below ~100 images a block, per-task overhead dominates.
BLOCK_IMAGES = 128


def require_ray(address: str | None = None):
    """The ``ray`` module, or a one-line UsageError naming what to install.

    Without an address the cluster is this machine alone: every Ray process then uses loopback
    (the variable is read when ray is imported).
    """
    if not address:
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no usage reports over the network
    os.environ.setdefault("RAY_worker_niceness", "0")  # workers at the writer's priority
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        raise UsageError(RAY_HINT) from None
    return ray


# -- stages: module level, so workers import them by reference and keep module state -------------
_KNOWN: dict[str, np.ndarray] = {}


def _known(box: list) -> np.ndarray:
    """A sorted digest array, fetched once per worker (a read-only view of the node's object store)."""
    import ray

    key = box[0].hex()
    if key not in _KNOWN:
        if len(_KNOWN) > 16:  # arrays of finished runs
            _KNOWN.clear()
        _KNOWN[key] = ray.get(box[0])
    return _KNOWN[key]


def _digests(cache: FeatureCache, group: FeatureGroup) -> np.ndarray:
    """The sorted raw sha256 digests of the contents ``group`` holds (what the stages skip)."""
    sha = cache.sha256s()
    return np.array(sorted(bytes.fromhex(sha[r]) for r in group.image_rows().tolist()), dtype="S32")


def _holds(known: np.ndarray, digest: bytes) -> bool:
    j = np.searchsorted(known, digest)
    # compare the raw 32 bytes: a numpy bytes element drops trailing NULs (1 digest in 256 ends in one)
    return bool(j < len(known) and known[j : j + 1].tobytes() == digest)


def read_batch(batch: dict, known_boxes: list[list], max_bytes: int) -> dict:
    """Read and hash each file once; ``need`` says which backbones lack it. Content every backbone
    holds keeps its row, not its bytes."""
    t = time.perf_counter()
    known = [_known(box) for box in known_boxes]
    n = len(batch["path"])
    data, sha, status, error = [b""] * n, [""] * n, [NEW] * n, [""] * n
    need = np.zeros((n, len(known)), np.bool_)
    for i, raw in enumerate(batch["path"]):
        r = read_file(os.fsdecode(bytes(raw)), max_bytes)
        if r.error:
            status[i], error[i] = UNREADABLE, r.error
            continue
        sha[i] = r.sha256
        digest = bytes.fromhex(r.sha256)
        need[i] = [not _holds(k, digest) for k in known]
        if need[i].any():
            data[i] = r.data
        else:
            status[i] = CACHED
    out = {k: batch[k] for k in ("path", "key", "label")}
    out.update(data=np.array(data, dtype=object), sha256=np.array(sha), status=np.array(status),
               error=np.array(error), need=need, t_read=np.full(n, (time.perf_counter() - t) / n))
    return out


_PRE: dict[str, Preprocess] = {}


_POOL: dict[int, ThreadPoolExecutor] = {}


def decode_batch(batch: dict, preprocess: list[dict], max_pixels: int, threads: int) -> dict:
    """New files' bytes to uint8 pixels for each backbone (decoded once), on ``threads`` threads (the
    task's CPUs); a file that does not decode becomes a failed row with its reason."""
    import torch

    torch.set_num_threads(1)  # one decode per thread, one thread per CPU the task holds
    pres = [_PRE.setdefault(repr(p), Preprocess.from_dict(p)) for p in preprocess]
    n = len(batch["path"])
    pixels = [np.zeros((n, 3, pre.crop, pre.crop), np.uint8) for pre in pres]
    status, error = batch["status"].astype(object), batch["error"].astype(object)
    t = time.perf_counter()
    todo = np.flatnonzero(batch["status"] == NEW)
    pool = _POOL.get(threads) or _POOL.setdefault(threads, ThreadPoolExecutor(threads, thread_name_prefix="decode"))
    decoded = pool.map(lambda i: decode_bytes(bytes(batch["data"][i]), pres, max_pixels), todo)
    for i, res in zip(todo, decoded):
        if isinstance(res, str):
            status[i], error[i] = FAILED, res
        else:
            for k, x in enumerate(res):
                pixels[k][i] = x
    out = {k: v for k, v in batch.items() if k != "data"}  # the bytes are dead weight from here on
    out.update({f"pixels:{k}": p for k, p in enumerate(pixels)})
    out.update(status=status.astype(str), error=error.astype(str), t_decode=np.full(n, (time.perf_counter() - t) / n))
    return out


class EmbedActor:
    """One embedder per backbone per actor: rebuilt from the stored spec (its fingerprint checked), or,
    for a backbone new to the cache (``new``), built as a first run builds it, its fingerprint then
    reported with every batch (``report:K``). A backbone that surely has new images (``eager``: more
    files listed than it holds) is built at once, in a thread, while the first files are read and
    decoded; the others on the first image that needs one. A build error is raised by the batch that
    needs the backbone."""

    def __init__(self, targets: list[dict], device: str, threads: int, batch_size: int):
        self.targets, self.device, self.threads, self.batch_size = targets, device, threads, batch_size
        self.embedders: dict[int, object] = {}
        self.reports: dict[int, str] = {}
        self.taps = {k: t.get("taps") for k, t in enumerate(targets)}  # {tap: dim}; a new backbone's once built
        eager = [k for k, t in enumerate(targets) if t["eager"]]
        self.building = {}
        if eager:
            pool = ThreadPoolExecutor(1, thread_name_prefix="model")
            self.building = {k: pool.submit(self._build, k) for k in eager}
            pool.shutdown(wait=False)

    def _embedder(self, k: int):
        if k not in self.embedders:
            self.embedders[k] = self.building.pop(k).result() if k in self.building else self._build(k)
        return self.embedders[k]

    def _build(self, k: int):
        import torch

        from ..embedder import embedder_for, new_embedder
        from ..registry import spec_from_description

        t = self.targets[k]
        torch.set_num_threads(self.threads)
        if "new" in t:
            n = t["new"]
            emb = new_embedder(spec_from_description(n["description"]), n["taps"], self.device, n["precision"],
                               n["runtime"], n["source"], self.threads)
            self.taps[k] = emb.backbone.tap_dims(n["taps"])
            self.reports[k] = json.dumps({"fingerprint": emb.fingerprint, "canon": emb.canon,
                                          "runtime": emb.runtime, "taps": self.taps[k]})
        else:
            emb = embedder_for(t["description"], t["canon"], sorted(t["taps"]), self.device, self.threads,
                               runtime=t["runtime"], cache=t["cache"])
            if emb.fingerprint != t["fingerprint"]:
                raise FingerprintMismatch(f"a Ray worker computes fingerprint {emb.fingerprint}, the driver "
                                          f"{t['fingerprint']}: install the same featcache and weights on every node")
        emb.runner  # noqa: B018 - the forward pass prepared (compiled) here, not in the first batch
        return emb

    def __call__(self, batch: dict) -> dict:
        import torch

        n = len(batch["key"])
        out = {c: v for c, v in batch.items() if not c.startswith("pixels:")}
        busy = 0.0
        for k, target in enumerate(self.targets):
            if "new" in target:  # its taps and fingerprint are this actor's to say
                self._embedder(k)
                out[f"report:{k}"] = np.array([self.reports[k]] + [""] * (n - 1))
            vectors = {tap: np.full((n, dim), np.nan, np.float32) for tap, dim in self.taps[k].items()}
            todo = np.flatnonzero((batch["status"] == NEW) & batch["need"][:, k])
            if len(todo):
                t = time.perf_counter()
                torch.set_num_threads(self.threads)  # a decode stage fused into this actor set one thread
                emb = self._embedder(k)
                pad = None if emb.device.type == "cuda" else self.batch_size  # one graph shape on the CPU
                pixels = batch[f"pixels:{k}"]
                for s in range(0, len(todo), self.batch_size):
                    idx = todo[s : s + self.batch_size]
                    got = emb.embed(torch.from_numpy(np.ascontiguousarray(pixels[idx])), pad_to=pad)
                    for tap in vectors:
                        vectors[tap][idx] = got[tap]
                busy += time.perf_counter() - t
            out.update({f"tap:{k}:{tap}": v for tap, v in vectors.items()})
        out["t_model"] = np.full(n, busy / n)
        return out


# -- driver ------------------------------------------------------------------------------------
class RayEngine:
    def __init__(self, ex: Extraction):
        self.ex = ex
        self.cfg = ex.cfg

    def run(self, cache: FeatureCache, listing: Listing) -> tuple[CacheWriter, Progress]:
        """Stream the listed files through the cluster; the writer is made once the stream says which
        fingerprints the actors built (at the first batch)."""
        ray = require_ray(self.cfg.ray_address)
        logging.getLogger("ray.data").setLevel(logging.ERROR)
        if not listing.items:  # nothing listed: no cluster (taps to catch up are computed here)
            writer, progress = self.ex.prepare(cache, listing)
            self._catch_up(writer, progress)
        else:
            with self._connected(ray):
                writer, progress = self._stream(ray, cache, listing)
        writer.commit()
        return writer, progress

    def _stream(self, ray, cache: FeatureCache, listing: Listing) -> tuple[CacheWriter, Progress]:
        known = self.ex.known_targets(cache)
        # one sorted digest array per backbone; boxed: Ray Data does not resolve object refs inside fn_kwargs
        held = [[ray.put(_digests(cache, t.group) if t else np.array([], dtype="S32"))] for t in known]
        ds = self._dataset(ray, listing.items, [self._describe(t, k, len(listing.items)) for k, t in enumerate(known)],
                           held)
        writer = progress = None
        waiting: list[dict] = []
        try:
            for batch in ds.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=1):
                if writer is None:
                    waiting.append(batch)
                    if not self._resolved(known, waiting):
                        continue
                    writer, progress = self.ex.prepare(cache, listing)
                    self._catch_up(writer, progress)
                for b in waiting or [batch]:
                    self._consume(b, writer, progress)
                waiting = []
        except Exception as e:  # a featcache error inside a stage: the same one-line error as locally
            cause = getattr(e, "cause", None)
            if isinstance(cause, FeatcacheError):
                raise type(cause)(str(cause)) from None
            raise
        if writer is None:
            raise FeatcacheError("the Ray actors never said which fingerprint they built")
        return writer, progress

    def _describe(self, t: Target | None, k: int, files: int) -> dict:
        """What an actor builds backbone ``k`` from: the target's stored spec and fingerprint, or ``new``."""
        cfg = self.cfg
        if t is not None:
            return {**t.description(), "taps": dict(t.group.taps), "cache": cfg.cache, "eager": files > t.group.rows}
        source = os.path.abspath(cfg.source) if cfg.source else None  # workers do not share the driver's cwd
        return {"new": {"description": self.ex.specs[k].describe(), "taps": list(dict.fromkeys(cfg.taps)),
                        "precision": cfg.precision, "runtime": cfg.runtime, "source": source}, "eager": True}

    def _resolved(self, known: list[Target | None], batches: list[dict]) -> bool:
        """The targets of backbones new to the cache, from the actors' reports; False until every one has one."""
        from ..keep import Kept
        from ..pipeline import Target

        targets = list(known)
        for k, t in enumerate(known):
            if t is None:
                reports = [r for b in batches for r in b[f"report:{k}"] if r]
                if not reports:
                    return False
                r = json.loads(reports[0])
                targets[k] = Target.kept(self.ex.specs[k], self.cfg.taps,
                                         Kept(r["fingerprint"], r["canon"], r["runtime"], r["taps"]),
                                         self.cfg.device, self.cfg.cache)
        self.ex.targets = targets
        return True

    def _catch_up(self, writer: CacheWriter, progress: Progress) -> None:
        if any(t.catch_up is not None for t in self.ex.targets):  # taps added to existing rows: computed here
            from .local import LocalEngine

            LocalEngine(self.ex).process(writer, [], progress, new=False)

    @contextlib.contextmanager
    def _connected(self, ray):
        """Join ``--ray-address`` (or the cluster this process is already connected to); else start one here."""
        t = time.perf_counter()
        started = not ray.is_initialized()
        if started:
            kw: dict = {"logging_level": "ERROR", "log_to_driver": False}
            if self.cfg.ray_address:
                ray.init(address=self.cfg.ray_address, **kw)
            else:  # a one-machine cluster, on loopback only
                ray.init(num_cpus=available_cpus(), object_store_memory=LOCAL_STORE_BYTES, include_dashboard=False,
                         _node_ip_address="127.0.0.1", **kw)
        self.ex.timings["ray_connect"] += time.perf_counter() - t
        try:
            yield
        finally:
            if started:
                ray.shutdown()

    def _resources(self, ray) -> tuple[int, float, float, float]:
        """(actors, CPUs and GPUs per actor, CPUs per read/decode task) from the flags and the cluster.
        Defaults: one actor per GPU with one CPU; without GPUs, one actor per node with the smallest
        node's CPUs."""
        total = ray.cluster_resources()
        gpus = float(total.get("GPU", 0))
        cfg = self.cfg
        gpa = cfg.gpus_per_actor if cfg.gpus_per_actor is not None else (1.0 if gpus else 0.0)
        if gpa > 0 and gpus < gpa:
            raise UsageError(f"--gpus-per-actor {gpa}: the Ray cluster has {gpus:g} GPUs")
        node_cpus = [n["Resources"].get("CPU", 0) for n in ray.nodes() if n.get("Alive")]
        cpa = cfg.cpus_per_actor or (1.0 if gpa else max(1.0, min((c for c in node_cpus if c), default=1.0)))
        actors = cfg.actors or (int(gpus // gpa) if gpa else max(1, int(total.get("CPU", 1) // cpa)))
        if actors < 1 or cpa <= 0 or gpa < 0:
            raise UsageError("--actors and --cpus-per-actor must be positive, --gpus-per-actor not negative")
        task_cpus = 1.0 if gpa else cpa  # equal to the actors' on a CPU cluster: Ray Data fuses the stages
        return actors, cpa, gpa, task_cpus

    def _dataset(self, ray, items: list[Item], targets: list[dict], held: list[list]):
        from ray.data import ActorPoolStrategy, DataContext

        ctx = DataContext.get_current()
        ctx.enable_progress_bars = False
        ctx.print_on_execution_start = False
        ctx.enable_auto_log_stats = False
        ctx.raise_original_map_exception = True
        ctx.execution_options.preserve_order = False

        ex, cfg = self.ex, self.cfg
        actors, cpa, gpa, task_cpus = self._resources(ray)
        device = "cuda" if gpa else "cpu"
        if any("new" in t for t in targets):  # what the actors would fail on, said before they start
            check_precision(cfg.precision, device)
        batch_size = cfg.batch_size or (64 if gpa else 8)
        # Images per block: each block costs a task's scheduling and bookkeeping, so blocks are large (BLOCK_IMAGES),
        # but never more than one commit (--commit-every keeps its meaning) nor more than an even share per actor.
        block = max(2 * batch_size, min(BLOCK_IMAGES, cfg.commit_every, -(-len(items) // actors)))
        rows = [{"path": os.fsencode(str(it.path)), "key": it.key, "label": it.label} for it in items]
        ds = ray.data.from_items(rows, override_num_blocks=max(1, -(-len(rows) // block)))
        ds = ds.map_batches(read_batch, fn_kwargs={"known_boxes": held, "max_bytes": cfg.max_file_bytes},
                            batch_size=block, batch_format="numpy", num_cpus=task_cpus)
        ds = ds.map_batches(decode_batch, fn_kwargs={"preprocess": [asdict(p) for p in ex.preprocess],
                                                     "max_pixels": cfg.max_pixels,
                                                     "threads": max(1, int(task_cpus))},
                            batch_size=block, batch_format="numpy", num_cpus=task_cpus)
        return ds.map_batches(
            EmbedActor, fn_constructor_kwargs={"targets": targets, "device": device, "threads": max(1, int(cpa)),
                                               "batch_size": batch_size},
            batch_size=block, batch_format="numpy", num_cpus=cpa, num_gpus=gpa, compute=ActorPoolStrategy(size=actors))

    def _consume(self, b: dict, writer: CacheWriter, progress: Progress) -> None:
        timings = self.ex.timings
        for stage, col in (("hash", "t_read"), ("decode", "t_decode"), ("model", "t_model")):
            timings[stage] += float(b[col].sum())  # CPU-seconds summed over the cluster's workers
        taps = [(k, t.fingerprint, list(t.group.taps)) for k, t in enumerate(self.ex.targets)]
        for k, fp, _ in taps:  # a new backbone's fingerprint, as the actor that made this batch built it
            for r in set(b.get(f"report:{k}", ())) - {""}:
                if json.loads(r)["fingerprint"] != fp:
                    raise FingerprintMismatch(
                        f"Ray actors built {self.ex.specs[k].name} as two fingerprints ({fp} and "
                        f"{json.loads(r)['fingerprint']}): their nodes chose differently; give --runtime and --precision")
        for i in range(len(b["key"])):
            status, key = str(b["status"][i]), str(b["key"][i])
            if status == UNREADABLE:
                writer.unreadable(key, str(b["error"][i]))
                continue
            item = Item(Path(os.fsdecode(bytes(b["path"][i]))), key, str(b["label"][i]))
            action, row = writer.register(item, str(b["sha256"][i]))
            if action == "new" and status == FAILED:
                writer.add(row, str(b["error"][i]))
            elif action == "new" and status == NEW:
                writer.add(row, {fp: {tap: b[f"tap:{k}:{tap}"][i] for tap in names}
                                 for k, fp, names in taps if b["need"][i, k]})
        progress.update(len(b["key"]))
