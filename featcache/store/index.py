"""Cosine-similarity faiss indexes over cached vectors, with an id map back to keys/sha256.

An index directory holds::

    manifest.json   fingerprint (+ description), backbone, tap, kind, parameters, memory,
                    recall@10 against exact search, the source cache (id and resolved path),
                    update history (plain JSON)
    index.faiss     faiss IndexIDMap2 over Flat / HNSWFlat, or IVFFlat with its own ids (inner product)
    ids.npy         int64 ids (the cache's image-table row for cached images)
    keys.npy        the keys, fixed-width unicode (no pickle)
    sha256.npy      the image identities
    deleted.npy     ids removed from an HNSW index (HNSW graphs cannot drop nodes:
                    they are filtered at search time until the next rebuild)

Vectors are L2-normalised before they are added or searched, so inner product is cosine.
``auto`` picks exact search below ``AUTO_EXACT_BELOW`` vectors and HNSW above. Growing
the cache or removing images updates the index in place (``update_from_cache``).

An index belongs to the one cache it was built from (its ids are that cache's row numbers):
meeting any other cache, even of the same fingerprint, raises ``CacheMismatch``. The cache is
known by its ``uid``; an index from before uids existed is matched by the cache's resolved path.
This module does not import torch.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import faiss
import numpy as np

from ..errors import FingerprintMismatch, NotFoundError, UsageError
from .cache import FeatureCache, rows_of
from .outputs import writable_dir

FORMAT = 1
MANIFEST = "manifest.json"
INDEX_FILE = "index.faiss"
KINDS = ("auto", "flat", "hnsw", "ivf")
AUTO_EXACT_BELOW = 20_000
_EF_LADDER = (16, 24, 32, 40, 48, 64, 96, 128, 192, 256, 512)
_NPROBE_LADDER = (1, 2, 4, 8, 16, 24, 32, 48, 64, 128, 256)


@dataclass
class IndexParams:
    """Build parameters. ``ef_search``/``nprobe`` of None are tuned to reach ``target_recall``."""

    kind: str = "auto"
    hnsw_m: int = 32
    ef_construction: int = 128  # a better graph reaches the recall target at a smaller (faster) efSearch
    ef_search: int | None = None
    nlist: int | None = None
    nprobe: int | None = None
    target_recall: float = 0.99
    eval_queries: int = 1000
    seed: int = 0


class CacheMismatch(FingerprintMismatch):
    """An index met a cache other than the one it was built from (same exit code and HTTP status)."""


@dataclass
class Hit:
    key: str
    sha256: str
    id: int
    score: float


def normalise(x: np.ndarray) -> np.ndarray:
    """float32 rows scaled to unit L2 norm (zero rows stay zero)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim == 1:
        x = x[None]
    n = np.linalg.norm(x, axis=1, keepdims=True)
    return np.ascontiguousarray(x / np.maximum(n, 1e-12), dtype=np.float32)


def _fixed_str(a) -> np.ndarray:
    """Fixed-width unicode (saveable without pickle) from any string array or list."""
    a = list(a.tolist() if isinstance(a, np.ndarray) else a)
    return np.array(a, dtype=np.str_) if a else np.array([], dtype="<U1")


def _versions() -> dict[str, str]:
    out = {}
    for pkg in ("featcache", "faiss-cpu", "numpy"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return out


def read_manifest(path: str | os.PathLike) -> dict:
    """An index directory's manifest alone (cheap: no vectors, no faiss), after the format check."""
    path = Path(path)
    mf = path / MANIFEST
    if not mf.is_file():
        raise NotFoundError(f"no featcache index at {path} (run `featcache index --cache DIR --out {path}`)")
    manifest = json.loads(mf.read_text())
    if manifest.get("featcache_index", {}).get("format") != FORMAT:
        raise UsageError(f"{path} is not a featcache index of format {FORMAT}")
    return manifest


def check_fingerprint(manifest: dict, fingerprint: str, tap: str | None = None) -> None:
    """Refuse vectors of another fingerprint (or tap) than the index holds."""
    if fingerprint != manifest["fingerprint"]:
        raise FingerprintMismatch(
            f"index was built on fingerprint {manifest['fingerprint']} ({manifest['backbone'].get('name')}), "
            f"but the vectors have fingerprint {fingerprint}; build an index from a cache of this backbone")
    if tap is not None and tap != manifest["tap"]:
        raise FingerprintMismatch(f"index holds tap {manifest['tap']!r}, vectors are tap {tap!r}")


def check_cache(manifest: dict, cache: FeatureCache) -> None:
    """Refuse a cache other than the one the index was built from: the index's ids are its row numbers.

    An index that recorded the cache's uid needs that uid. One built before caches had uids
    (or from a cache that had none yet) is matched by the cache's resolved path instead; one
    built from raw vectors (no source cache) has nothing to compare and is accepted.
    """
    src = manifest.get("source") or {}
    built_uid, built_path = src.get("cache_uid"), src.get("cache")
    here = str(cache.root.resolve())
    if built_uid:
        same = built_uid == cache.uid
    elif built_path:
        same = built_path == here
    else:
        return
    if not same:
        raise CacheMismatch(
            f"this index was built from cache {built_path} (id {built_uid or 'none'}), not from cache {here} "
            f"(id {cache.uid or 'none'}); its ids are row numbers of its own cache: build a separate index "
            f"for {here} (featcache index --cache {here} --out NEW_DIR)")


def _source(cache: FeatureCache) -> dict:
    return {"cache": str(cache.root.resolve()), "cache_uid": cache.uid}


def _exact_topk(base: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    flat = faiss.IndexFlatIP(base.shape[1])
    flat.add(base)
    return flat.search(queries, k)[1]


def _recall(approx: np.ndarray, exact: np.ndarray, self_pos: np.ndarray, k: int) -> float:
    """Mean overlap of the top-k lists, each query's own vector dropped from both lists."""
    hits = 0
    for a, e, s in zip(approx, exact, self_pos, strict=True):
        a = [x for x in a if x != s and x >= 0][:k]
        e = [x for x in e if x != s][:k]
        hits += len(set(a) & set(e))
    return hits / (k * len(exact))


class VectorIndex:
    """A loaded or freshly built index. ``search`` returns hits with keys and scores."""

    def __init__(self, index: faiss.Index, ids: np.ndarray, keys: np.ndarray, sha256: np.ndarray,
                 manifest: dict, deleted: np.ndarray | None = None):
        self.index = index
        self.manifest = manifest
        self._ids = np.asarray(ids, dtype=np.int64)
        self._keys = _fixed_str(keys)
        self._sha = _fixed_str(sha256)
        self._pos = {int(i): p for p, i in enumerate(self._ids)}
        self._by_key = {k: int(i) for k, i in zip(self._keys.tolist(), self._ids.tolist(), strict=True)}
        self.deleted: set[int] = set(int(i) for i in (deleted if deleted is not None else []))
        self.apply_search_params()

    # -- properties ---------------------------------------------------------------
    @property
    def fingerprint(self) -> str:
        return self.manifest["fingerprint"]

    @property
    def kind(self) -> str:
        return self.manifest["kind"]

    @property
    def dim(self) -> int:
        return int(self.manifest["dim"])

    def __len__(self) -> int:
        return len(self._ids) - len(self.deleted)

    def _inner(self) -> faiss.Index:
        if isinstance(self.index, faiss.IndexIVF):  # IVF maps ids itself
            return self.index
        return faiss.downcast_index(self.index.index)

    def apply_search_params(self) -> None:
        p = self.manifest.get("params", {})
        inner = self._inner()
        if isinstance(inner, faiss.IndexHNSW) and p.get("ef_search"):
            inner.hnsw.efSearch = int(p["ef_search"])
        if isinstance(inner, faiss.IndexIVF):
            if p.get("nprobe"):
                inner.nprobe = int(p["nprobe"])
            if inner.direct_map.type != faiss.DirectMap.Hashtable:  # needed for reconstruct + remove
                inner.set_direct_map_type(faiss.DirectMap.Hashtable)

    # -- building -----------------------------------------------------------------
    @classmethod
    def build(cls, vectors: np.ndarray, ids: np.ndarray, keys, sha256, *, fingerprint: str, canon: dict,
              backbone: dict, tap: str, params: IndexParams | None = None, source: dict | None = None) -> VectorIndex:
        """Build from raw vectors (normalised here), tune the search knob and measure recall@10."""
        params = params or IndexParams()
        if params.kind not in KINDS:
            raise UsageError(f"--kind must be one of {KINDS}, got {params.kind!r}")
        x = normalise(vectors)
        n, d = x.shape
        if n == 0:
            raise UsageError("no vectors to index (is the cache empty for this fingerprint and tap?)")
        ids = np.asarray(ids, dtype=np.int64)
        if len(np.unique(ids)) != n:
            raise UsageError("index ids must be unique")
        kind = params.kind
        if kind == "auto":
            kind = "flat" if n < AUTO_EXACT_BELOW else "hnsw"
        t0 = time.perf_counter()
        used: dict = {}
        if kind == "flat":
            inner = faiss.IndexFlatIP(d)
        elif kind == "hnsw":
            inner = faiss.IndexHNSWFlat(d, params.hnsw_m, faiss.METRIC_INNER_PRODUCT)
            inner.hnsw.efConstruction = params.ef_construction
            used = {"hnsw_m": params.hnsw_m, "ef_construction": params.ef_construction}
        else:
            nlist = params.nlist or max(1, min(int(4 * np.sqrt(n)), n // 39))
            quant = faiss.IndexFlatIP(d)
            inner = faiss.IndexIVFFlat(quant, d, nlist, faiss.METRIC_INNER_PRODUCT)
            rng = np.random.default_rng(params.seed)
            train = x[rng.choice(n, min(n, 256 * nlist), replace=False)]
            inner.train(train)
            inner.set_direct_map_type(faiss.DirectMap.Hashtable)
            used = {"nlist": nlist}
        index = inner if kind == "ivf" else faiss.IndexIDMap2(inner)
        index.add_with_ids(x, ids)
        build_s = time.perf_counter() - t0
        manifest = {
            "featcache_index": {"format": FORMAT},
            "fingerprint": fingerprint,
            "fingerprint_description": canon,
            "backbone": backbone,
            "tap": tap,
            "metric": "cosine (L2-normalised, inner product)",
            "kind": kind,
            "requested_kind": params.kind,
            "dim": d,
            "count": n,
            "params": used,
            "build_seconds": round(build_s, 2),
            "source": source or {},
            "versions": _versions(),
            "updates": [],
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        vi = cls(index, ids, keys, sha256, manifest)
        vi._tune_and_measure(x, params)
        return vi

    def _tune_and_measure(self, x: np.ndarray, params: IndexParams, k: int = 10) -> None:
        """Pick efSearch / nprobe on one sample of the real vectors, report recall@k on another."""
        n = len(x)
        rng = np.random.default_rng(params.seed)
        m = min(params.eval_queries, max(1, n // 5))
        pick = rng.choice(n, min(n, 2 * m), replace=False)
        tune, held = pick[: len(pick) // 2], pick[len(pick) // 2 :]
        if self.kind == "flat" or len(held) == 0:
            self.manifest["recall_at_10"] = 1.0
            self.manifest["recall_note"] = "exact search"
            self.manifest["memory_bytes"] = self.memory_bytes()
            return
        kk = min(k + 1, n)
        exact_pos = _exact_topk(x, x[pick], kk)
        exact = {int(p): row for p, row in zip(pick, exact_pos, strict=True)}
        inner = self._inner()

        def run(sample: np.ndarray) -> float:
            _, found = self.index.search(x[sample], kk)
            found_pos = np.vectorize(lambda i: self._pos.get(int(i), -1))(found) if found.size else found
            return _recall(found_pos, np.stack([exact[int(p)] for p in sample]), sample, k)

        if self.kind == "hnsw":
            ladder, attr, fixed = _EF_LADDER, "ef_search", params.ef_search
            setter = lambda v: setattr(inner.hnsw, "efSearch", int(v))  # noqa: E731
        else:
            ladder, attr, fixed = _NPROBE_LADDER, "nprobe", params.nprobe
            ladder = [v for v in ladder if v <= inner.nlist] or [inner.nlist]
            setter = lambda v: setattr(inner, "nprobe", int(v))  # noqa: E731
        tried = {}
        choice = fixed
        if choice is None:
            for v in ladder:
                setter(v)
                tried[v] = round(run(tune), 4)
                choice = v
                if tried[v] >= params.target_recall:
                    break
        setter(choice)
        self.manifest["params"][attr] = int(choice)
        self.manifest["tuning"] = {"target_recall_at_10": params.target_recall, "tried": tried, "queries": len(tune)}
        self.manifest["recall_at_10"] = round(run(held), 4)
        self.manifest["recall_note"] = (f"recall@10 vs exact search on {len(held)} held-out real vectors used as queries "
                                        "(each query's own vector excluded); measured at build")
        self.manifest["memory_bytes"] = self.memory_bytes()

    # -- persistence --------------------------------------------------------------
    def memory_bytes(self) -> int:
        """Serialized size of the faiss index plus the id map (about its size in memory)."""
        return int(faiss.serialize_index(self.index).nbytes + self._ids.nbytes + self._keys.nbytes + self._sha.nbytes)

    def save(self, out: str | os.PathLike) -> Path:
        """Write the index directory; a path that cannot be written raises OSError (the CLI's exit code 8)."""
        out = writable_dir(out)
        tmp = out / (INDEX_FILE + ".tmp")
        with open(tmp, "wb") as f:  # through Python's file: a failed write is an OSError naming its cause
            faiss.write_index(self.index, faiss.PyCallbackIOWriter(f.write))
        os.replace(tmp, out / INDEX_FILE)
        np.save(out / "ids.npy", self._ids)
        np.save(out / "keys.npy", self._keys)
        np.save(out / "sha256.npy", self._sha)
        np.save(out / "deleted.npy", np.array(sorted(self.deleted), dtype=np.int64))
        self.manifest["count"] = len(self)
        self.manifest["deleted"] = len(self.deleted)
        (out / MANIFEST).write_text(json.dumps(self.manifest, indent=2, default=str))
        return out

    @classmethod
    def load(cls, path: str | os.PathLike) -> VectorIndex:
        path = Path(path)
        manifest = read_manifest(path)
        index = faiss.read_index(str(path / INDEX_FILE))
        deleted = np.load(path / "deleted.npy") if (path / "deleted.npy").is_file() else None
        return cls(index, np.load(path / "ids.npy"), np.load(path / "keys.npy"), np.load(path / "sha256.npy"),
                   manifest, deleted)

    # -- queries ------------------------------------------------------------------
    def check(self, fingerprint: str, tap: str | None = None) -> None:
        check_fingerprint(self.manifest, fingerprint, tap)

    def search(self, queries: np.ndarray, k: int = 10, exclude: list[int | None] | None = None) -> list[list[Hit]]:
        """Top-k hits per query row (cosine, best first); ``exclude`` drops one id per query."""
        if k < 1:
            raise UsageError(f"k must be at least 1, got {k}")
        q = normalise(queries)
        if q.shape[1] != self.dim:
            raise UsageError(f"query vectors have dim {q.shape[1]}, the index holds dim {self.dim}")
        extra = (1 if exclude else 0) + min(len(self.deleted), 64)
        kk = min(k + extra, len(self._ids))
        scores, found = self.index.search(q, kk)
        out = []
        for r in range(len(q)):
            skip = exclude[r] if exclude else None
            hits = []
            for s, i in zip(scores[r].tolist(), found[r].tolist(), strict=True):
                if i < 0 or i == skip or i in self.deleted:
                    continue
                p = self._pos[i]
                hits.append(Hit(str(self._keys[p]), str(self._sha[p]), i, float(s)))
                if len(hits) == k:
                    break
            out.append(hits)
        return out

    def id_of(self, key: str) -> int:
        i = self._by_key.get(key)
        if i is None or i in self.deleted:
            raise NotFoundError(f"key {key!r} is not in the index")
        return i

    def vector(self, id_: int) -> np.ndarray:
        """The stored (normalised) vector of an id."""
        return self.index.reconstruct(int(id_))

    def search_key(self, key: str, k: int = 10) -> list[Hit]:
        """Nearest neighbours of an indexed key, the key itself excluded."""
        i = self.id_of(key)
        return self.search(self.vector(i)[None], k, exclude=[i])[0]

    # -- updates ------------------------------------------------------------------
    def add(self, vectors: np.ndarray, ids: np.ndarray, keys, sha256) -> int:
        """Add new ids (ids already present are revived if deleted, else skipped)."""
        ids = np.asarray(ids, dtype=np.int64)
        revive = [int(i) for i in ids if int(i) in self.deleted]
        for i in revive:
            self.deleted.discard(i)
        new = np.array([int(i) not in self._pos for i in ids], bool)
        if new.any():
            self.index.add_with_ids(normalise(vectors[new]), ids[new])
            self._ids = np.concatenate([self._ids, ids[new]])
            self._keys = np.concatenate([self._keys, _fixed_str(np.asarray(keys)[new])])
            self._sha = np.concatenate([self._sha, _fixed_str(np.asarray(sha256)[new])])
            for p in range(len(self._ids) - int(new.sum()), len(self._ids)):
                self._pos[int(self._ids[p])] = p
                self._by_key[str(self._keys[p])] = int(self._ids[p])
        return int(new.sum()) + len(revive)

    def remove(self, ids) -> int:
        """Remove ids: ``remove_ids`` for flat and IVF, tombstones for HNSW."""
        ids = [int(i) for i in ids if int(i) in self._pos and int(i) not in self.deleted]
        if not ids:
            return 0
        if self.kind == "hnsw":
            self.deleted.update(ids)
            return len(ids)
        self.index.remove_ids(np.array(ids, dtype=np.int64))
        drop = set(ids)
        keep = np.array([int(i) not in drop for i in self._ids], bool)
        self._ids, self._keys, self._sha = self._ids[keep], self._keys[keep], self._sha[keep]
        self._pos = {int(i): p for p, i in enumerate(self._ids)}
        self._by_key = {k: int(i) for k, i in zip(self._keys.tolist(), self._ids.tolist(), strict=True)}
        return len(ids)

    def update_from_cache(self, cache: FeatureCache, prune_missing_files: bool = True) -> dict:
        """Bring the index in line with its own cache (``CacheMismatch`` for another): add new rows, remove gone ones."""
        check_cache(self.manifest, cache)
        self.manifest["source"] = {**self.manifest.get("source", {}), **_source(cache)}  # adopts a uid given since
        ids, keys, shas, vectors, paths = cache_rows(cache, self.fingerprint, self.manifest["tap"])
        current = set(ids.tolist())
        if prune_missing_files:
            gone = {int(i) for i, p in zip(ids.tolist(), paths.tolist(), strict=True) if p and not os.path.exists(p)}
            current -= gone
        keep = np.array([int(i) in current for i in ids], bool)
        added = self.add(vectors[keep], ids[keep], keys[keep], shas[keep])
        live = [i for i in self._ids.tolist() if i not in self.deleted]
        removed = self.remove([i for i in live if i not in current])
        self.manifest["updates"].append({"at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                                         "added": added, "removed": removed})
        self.manifest["count"] = len(self)
        return {"added": added, "removed": removed, "count": len(self), "deleted_pending": len(self.deleted)}

    def stats(self) -> dict:
        m = self.manifest
        return {"fingerprint": m["fingerprint"], "tap": m["tap"], "kind": m["kind"], "count": len(self),
                "dim": m["dim"], "params": m["params"], "recall_at_10": m.get("recall_at_10"),
                "memory_bytes": m.get("memory_bytes"), "deleted_pending": len(self.deleted)}


def cache_rows(cache: FeatureCache, fingerprint: str, tap: str):
    """(ids, keys, sha256, vectors, paths) of a cache's ok rows (``read`` drops failed ones); ids are image-table rows."""
    feats = cache.read(fingerprint, tap)
    imgs = cache.images()
    ids = rows_of(imgs.sha256, feats.sha256)
    paths = imgs.path[ids] if len(ids) else np.array([], dtype=str)
    return ids, feats.keys, feats.sha256, feats.vectors, np.asarray(paths)


def build_from_cache(cache_dir: str | os.PathLike, out: str | os.PathLike, fingerprint: str | None = None,
                     tap: str = "final", params: IndexParams | None = None) -> dict:
    """Build a new index from a cache, or update the one at ``out`` in place; returns a summary.

    Refuses, before any work: an index at ``out`` from another cache (``CacheMismatch``) or of
    another fingerprint or tap, and an ``out`` that cannot be written (OSError).
    """
    cache = FeatureCache(cache_dir)
    fp = cache.resolve_fingerprint(fingerprint)
    attrs = cache.group_attrs(fp)
    t0 = time.perf_counter()
    writable_dir(out)
    if (Path(out) / MANIFEST).is_file():
        manifest = read_manifest(out)  # refuse from the manifest, before the index loads
        check_fingerprint(manifest, fp, tap)
        check_cache(manifest, cache)
        vi = VectorIndex.load(out)
        summary = {"action": "updated", **vi.update_from_cache(cache)}
    else:
        ids, keys, shas, vectors, _ = cache_rows(cache, fp, tap)
        vi = VectorIndex.build(vectors, ids, keys, shas, fingerprint=fp, canon=attrs["fingerprint"],
                               backbone=attrs["backbone"], tap=tap, params=params, source=_source(cache))
        summary = {"action": "built"}
    vi.save(out)
    return {**summary, "index": str(out), "seconds": round(time.perf_counter() - t0, 2), **vi.stats()}


def dedupe(cache_dir: str | os.PathLike, fingerprint: str | None = None, tap: str = "final",
           threshold: float = 0.97, neighbours: int = 16) -> dict:
    """Groups of near-duplicate images: connected components of pairs with cosine >= threshold."""
    if not 0 < threshold <= 1:
        raise UsageError(f"--threshold must be in (0, 1], got {threshold}")
    cache = FeatureCache(cache_dir)
    fp = cache.resolve_fingerprint(fingerprint)
    ids, keys, shas, vectors, _ = cache_rows(cache, fp, tap)
    x = normalise(vectors) if len(vectors) else vectors
    n = len(x)
    parent = list(range(n))

    def find(a: int) -> int:
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    if n > 1:
        flat = faiss.IndexFlatIP(x.shape[1])
        flat.add(x)
        kk = min(neighbours, n)
        for s in range(0, n, 4096):
            scores, found = flat.search(x[s : s + 4096], kk)
            for r, (srow, frow) in enumerate(zip(scores, found, strict=True)):
                for sc, j in zip(srow.tolist(), frow.tolist(), strict=True):
                    if j >= 0 and j != s + r and sc >= threshold:
                        parent[find(s + r)] = find(j)
    groups: dict[int, list[int]] = {}
    for i in range(n):
        groups.setdefault(find(i), []).append(i)
    out = []
    for members in groups.values():
        if len(members) < 2:
            continue
        sims = x[members] @ x[members].T
        out.append({"size": len(members), "min_cosine": round(float(sims.min()), 4),
                    "keys": [str(keys[i]) for i in members], "sha256": [str(shas[i]) for i in members]})
    out.sort(key=lambda g: -g["size"])
    return {"cache": str(cache_dir), "fingerprint": fp, "tap": tap, "threshold": threshold, "images": n,
            "groups": out, "duplicates": sum(g["size"] - 1 for g in out)}
