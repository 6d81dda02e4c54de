"""``featcache predict``: label new images with a head bundle.

Images whose content (sha256) is already in the cache (``--cache`` or the one named in
the manifest) reuse their cached vectors; the rest are embedded with the head's own
backbone, rebuilt from the manifest, so the fingerprint is guaranteed to match. An
ensemble head does this for each member backbone, then reads the members' vectors side
by side. A file that cannot be read or decoded gets its own error; the others are still
predicted.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import FeatcacheError, FingerprintMismatch, NotFoundError
from ..hashing import sha256_bytes
from ..store.cache import FeatureCache
from .bundle import Member, load_bundle


def _open_cache(bundle_path: Path, members: list[Member], cache_dir: str | None,
                explicit: bool) -> tuple[FeatureCache | None, list[str]]:
    """The cache to reuse vectors from and its fingerprints; an explicitly named one must hold a member's."""
    if not cache_dir:
        return None, []
    try:
        cache = FeatureCache(cache_dir)
    except FeatcacheError:
        if explicit:
            raise
        return None, []  # the training cache moved or was deleted: embed instead
    held = cache.fingerprints()
    if not any(m.fingerprint in held for m in members):
        if explicit:
            raise FingerprintMismatch(
                f"head {bundle_path} has fingerprint {'+'.join(m.fingerprint for m in members)}; cache {cache_dir} "
                f"holds {', '.join(held) or 'no fingerprints'}")
        return None, []
    return cache, held


def _cached_vectors(cache: FeatureCache | None, held: list[str], member: Member,
                    shas: dict[int, str]) -> dict[int, np.ndarray]:
    if cache is None or not shas or member.fingerprint not in held:
        return {}
    try:
        found = cache.vectors_of(list(shas.values()), member.fingerprint, member.tap)
    except NotFoundError:  # the cache lacks the head's tap: embed
        return {}
    return {i: found[s] for i, s in shas.items() if s in found}


def predict(head_dir: str, images: list[str], cache: str | None = None, device: str = "auto",
            batch_size: int = 16, top_k: int = 3, runtime: str = "auto", precision: str = "auto") -> dict:
    """Labels with probabilities for ``images`` (paths); per-file errors instead of a crash."""
    bundle = load_bundle(head_dir)
    members = bundle.members
    results: list[dict] = [{"image": str(p)} for p in images]
    data: dict[int, bytes] = {}
    for i, p in enumerate(images):
        try:
            data[i] = Path(p).read_bytes()
        except OSError as e:
            results[i]["error"] = f"unreadable file: {e.strerror or e}"
    shas = {i: sha256_bytes(b) for i, b in data.items()}
    store, held = _open_cache(bundle.path, members, cache or bundle.manifest.get("cache"), cache is not None)
    per_member: list[dict[int, np.ndarray]] = []
    embedded: set[int] = set()
    pixels: dict = {}  # decoded images per preprocessing, shared by the members
    for m in members:
        vectors = _cached_vectors(store, held, m, shas)
        todo = {i: data[i] for i in data if i not in vectors and "error" not in results[i]}
        if todo:
            vectors.update(_embed(m, todo, results, pixels, device, batch_size, runtime, precision,
                                  cache or bundle.manifest.get("cache")))
            embedded |= todo.keys()
        per_member.append(vectors)
    ok = [i for i in sorted(data) if "error" not in results[i] and all(i in v for v in per_member)]
    if ok:
        proba = bundle.predict_proba([np.stack([v[i] for i in ok]) for v in per_member],
                                     [m.fingerprint for m in members])
        labels = bundle.labels
        for i, p in zip(ok, proba):
            order = np.argsort(-p)[:top_k]
            results[i].update({"label": labels[order[0]], "probability": float(p[order[0]]),
                               "top": [{"label": labels[j], "probability": float(p[j])} for j in order],
                               "source": "embedded" if i in embedded else "cache"})
    out = {"head": str(bundle.path), "fingerprint": bundle.fingerprint, "tap": bundle.tap,
           "predicted": len(ok), "failed": len(images) - len(ok), "results": results}
    if bundle.is_ensemble:
        out["members"] = [{"fingerprint": m.fingerprint, "backbone": m.backbone.get("name")} for m in members]
    return out


def _embed(member: Member, data: dict[int, bytes], results: list[dict], pixels: dict, device: str,
           batch_size: int, runtime: str = "auto", precision: str = "auto",
           cache: str | None = None) -> dict[int, np.ndarray]:
    """``member``'s vectors of the images in ``data``; a failed decode becomes that image's error.

    ``pixels`` keeps the decoded images per preprocessing, so members that share one decode once.
    """
    import torch

    from ..extract.decode import load_image
    from ..extract.embedder import embedder_for
    from ..progress import loading

    with loading(member.backbone["name"]):
        emb = embedder_for(member.backbone, member.canon, [member.tap], device, runtime=runtime, precision=precision,
                           cache=cache)
    if emb.fingerprint != member.fingerprint:
        raise FingerprintMismatch(f"backbone {emb.spec.name} now gives fingerprint {emb.fingerprint}, the head "
                                  f"was trained on {member.fingerprint}")
    decoded: dict[int, torch.Tensor] = pixels.setdefault(emb.spec.preprocess, {})
    for i, b in data.items():
        if i in decoded:
            continue
        try:
            decoded[i] = load_image(b, emb.spec.preprocess)
        except FeatcacheError as e:
            results[i]["error"] = str(e)
        except Exception as e:  # noqa: BLE001 - a hostile file must not stop the others
            results[i]["error"] = f"decoder error: {type(e).__name__}: {e}"
    out: dict[int, np.ndarray] = {}
    idx = sorted(i for i in data if i in decoded)
    for s in range(0, len(idx), batch_size):
        part = idx[s : s + batch_size]
        vecs = emb.embed(torch.stack([decoded[i] for i in part]))[member.tap]
        out.update(zip(part, vecs))
    return out
