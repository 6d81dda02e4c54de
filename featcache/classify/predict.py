"""``featcache predict``: label new images with a head bundle.

Images whose content (sha256) is already in the cache (``--cache`` or the one named in
the manifest) reuse their cached vectors; the rest are embedded with the head's own
backbone, rebuilt from the manifest, so the fingerprint is guaranteed to match. A file
that cannot be read or decoded gets its own error; the others are still predicted.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import FeatcacheError, FingerprintMismatch
from ..hashing import sha256_bytes
from ..store.cache import FeatureCache, rows_of
from .bundle import HeadBundle, load_bundle


def _cached_vectors(bundle: HeadBundle, cache_dir: str | None, explicit: bool, shas: dict[int, str]) -> dict[int, np.ndarray]:
    if not cache_dir or not shas:
        return {}
    try:
        cache = FeatureCache(cache_dir)
    except FeatcacheError:
        if explicit:
            raise
        return {}  # the training cache moved or was deleted: embed instead
    if bundle.fingerprint not in cache.fingerprints():
        if explicit:
            raise FingerprintMismatch(
                f"head {bundle.path} has fingerprint {bundle.fingerprint}; cache {cache_dir} holds "
                f"{', '.join(cache.fingerprints()) or 'no fingerprints'}")
        return {}
    if bundle.tap not in cache.group_attrs(bundle.fingerprint)["taps"]:
        return {}
    feats = cache.read(bundle.fingerprint, bundle.tap)
    rows = rows_of(feats.sha256, list(shas.values()))
    return {i: feats.vectors[r] for i, r in zip(shas, rows) if r >= 0}


def predict(head_dir: str, images: list[str], cache: str | None = None, device: str = "auto",
            batch_size: int = 16, top_k: int = 3, runtime: str = "auto", precision: str = "auto") -> dict:
    """Labels with probabilities for ``images`` (paths); per-file errors instead of a crash."""
    bundle = load_bundle(head_dir)
    results: list[dict] = [{"image": str(p)} for p in images]
    data: dict[int, bytes] = {}
    for i, p in enumerate(images):
        try:
            data[i] = Path(p).read_bytes()
        except OSError as e:
            results[i]["error"] = f"unreadable file: {e.strerror or e}"
    shas = {i: sha256_bytes(b) for i, b in data.items()}
    vectors = _cached_vectors(bundle, cache or bundle.manifest.get("cache"), cache is not None, shas)
    for i in vectors:
        results[i]["source"] = "cache"
    todo = [i for i in data if i not in vectors]
    if todo:
        vectors.update(_embed(bundle, {i: data[i] for i in todo}, results, device, batch_size, runtime, precision,
                              cache or bundle.manifest.get("cache")))
    ok = sorted(vectors)
    if ok:
        proba = bundle.predict_proba(np.stack([vectors[i] for i in ok]), bundle.fingerprint)
        labels = bundle.labels
        for i, p in zip(ok, proba):
            order = np.argsort(-p)[:top_k]
            results[i].update({"label": labels[order[0]], "probability": float(p[order[0]]),
                               "top": [{"label": labels[j], "probability": float(p[j])} for j in order]})
    return {"head": str(bundle.path), "fingerprint": bundle.fingerprint, "tap": bundle.tap,
            "predicted": len(ok), "failed": len(images) - len(ok), "results": results}


def _embed(bundle: HeadBundle, data: dict[int, bytes], results: list[dict], device: str,
           batch_size: int, runtime: str = "auto", precision: str = "auto",
           cache: str | None = None) -> dict[int, np.ndarray]:
    import torch

    from ..extract.decode import load_image
    from ..extract.embedder import embedder_for

    m = bundle.manifest
    emb = embedder_for(m["backbone"], m["fingerprint_description"], [bundle.tap], device, runtime=runtime,
                       precision=precision, cache=cache)
    bundle.check(emb.fingerprint, f"embeddings of backbone {emb.spec.name}")
    decoded: dict[int, torch.Tensor] = {}
    for i, b in data.items():
        try:
            decoded[i] = load_image(b, emb.spec.preprocess)
        except FeatcacheError as e:
            results[i]["error"] = str(e)
        except Exception as e:  # noqa: BLE001 - a hostile file must not stop the others
            results[i]["error"] = f"decoder error: {type(e).__name__}: {e}"
    out: dict[int, np.ndarray] = {}
    idx = sorted(decoded)
    for s in range(0, len(idx), batch_size):
        part = idx[s : s + batch_size]
        vecs = emb.embed(torch.stack([decoded[i] for i in part]))[bundle.tap]
        for i, v in zip(part, vecs):
            out[i] = v
            results[i]["source"] = "embedded"
    return out
