"""Layer-wise linear probes, and how ImageNet-like the data looks to each cached backbone.

``probe`` fits the same logistic-regression head on every pooled tap (stage1..stageN, final)
on the shared split (``measure.shared_split``) and reports held-out accuracy by depth.
``imagenet_similarity`` is information, never a decision: how confidently each cached
backbone's own ImageNet classifier labels the data, and, with two or more backbones, how
often they agree. A single backbone's entropy is not a property of the data: the same Tux
Paint photos looked ImageNet-like to Lite0 and MobileNetV2 but not to Lite1 and Lite2.
"""

from __future__ import annotations

import re

import numpy as np

from ..errors import FeatcacheError
from ..store.cache import FeatureCache, rows_of
from .data import Labelled, align, load_labelled
from .measure import head_outcome, shared_split, wilson
from .splits import stratified_holdout


def pooled_taps(taps: list[str]) -> list[str]:
    """The pooled taps (``stageK`` by depth, then ``final``): raw activations are fine-tuning inputs, not probes."""
    def depth(tap: str) -> tuple[int, str]:
        m = re.fullmatch(r"stage(\d+)", tap)
        return (int(m.group(1)), tap) if m else (10**6, tap)

    return sorted((t for t in taps if not t.startswith("raw:")), key=depth)


def labelled_rows(cache: FeatureCache, fp: str, max_rows: int, seed: int = 0) -> tuple[Labelled, int | None]:
    """The final tap's labelled rows (what ``featcache train`` trains on), stratified down to ``max_rows``.

    Returns the rows and, when subsampled, how many there were.
    """
    taps = cache.group_attrs(fp)["taps"]
    base = load_labelled(cache, fp, "final" if "final" in taps else pooled_taps(taps)[-1])
    if len(base) <= max_rows:
        return base, None
    keep, _ = stratified_holdout(base.y, 1 - max_rows / len(base), seed)
    return base.subset(keep), len(base)


def probe(cache_dir: str, fingerprint: str | None = None, taps: list[str] | None = None, max_rows: int = 20000,
          seed: int = 0) -> dict:
    """Held-out accuracy (95 % interval) of a logistic-regression probe on each pooled tap, on one shared split."""
    cache = FeatureCache(cache_dir)
    fp = cache.resolve_fingerprint(fingerprint)
    attrs = cache.group_attrs(fp)
    taps = pooled_taps(taps or attrs["taps"])
    base, total = labelled_rows(cache, fp, max_rows, seed)
    split = shared_split(base, seed)
    rows = []
    for tap in taps:
        data = base if tap == base.tap else align(base, load_labelled(cache, fp, tap, "keep"))
        out = head_outcome(data.X, data.y, split.folds, "logreg", seed)
        rows.append({"tap": tap, "dim": int(data.X.shape[1]), "accuracy": out.accuracy,
                     "interval": wilson(int(out.correct.sum()), len(out.correct)), "seconds": out.seconds})
    best = max(rows, key=lambda r: r["accuracy"])
    counts = np.unique(base.y, return_counts=True)[1]
    evaluation = f"{split.info['folds']}-fold CV" if split.mode == "cv" else "20% stratified hold-out"
    return {"cache": str(cache.root), "fingerprint": fp, "backbone": attrs["backbone"].get("name"),
            "rows": len(base), "subsampled_from": total, "classes": len(counts), "evaluation": evaluation,
            "taps": rows, "best_tap": best["tap"], "chance": float(counts.max() / counts.sum())}


def _imagenet_probabilities(cache: FeatureCache, fp: str, sha256: np.ndarray) -> np.ndarray:
    """Softmax of the backbone's own ImageNet classifier over the cached final vectors of ``sha256``."""
    from ..extract.embedder import embedder_for

    attrs = cache.group_attrs(fp)
    feats = cache.read(fp, "final")
    idx = rows_of(feats.sha256, sha256)
    emb = embedder_for(attrs["backbone"], attrs["fingerprint"], ["final"], "cpu")
    logits = emb.classify_imagenet(np.ascontiguousarray(feats.vectors[idx])).astype(np.float64)
    logits -= logits.max(axis=1, keepdims=True)
    p = np.exp(logits)
    return p / p.sum(axis=1, keepdims=True)


def imagenet_similarity(cache: FeatureCache, fingerprints: list[str], sha256: np.ndarray, sample: int = 2000,
                        seed: int = 0) -> dict:
    """Per backbone: mean normalised entropy and top-1 probability of its ImageNet classifier on the data;
    across backbones (two or more): how often all of them name the same ImageNet class.

    Only images every listed backbone has cached are used, so the figures describe the same images.
    """
    common = sha256
    for fp in fingerprints:
        common = common[np.isin(common, cache.read(fp, "final").sha256)]
    rng = np.random.default_rng(seed)
    common = common[np.sort(rng.choice(len(common), min(sample, len(common)), replace=False))]
    per, top1 = [], []
    for fp in fingerprints:
        name = cache.group_attrs(fp)["backbone"].get("name")
        try:
            p = _imagenet_probabilities(cache, fp, common)
        except FeatcacheError as e:  # no classifier, weights gone: the others still count
            per.append({"fingerprint": fp, "backbone": name, "error": str(e)})
            continue
        ent = -(p * np.log(np.clip(p, 1e-12, 1))).sum(axis=1) / np.log(p.shape[1])
        per.append({"fingerprint": fp, "backbone": name, "normalised_entropy": float(ent.mean()),
                    "mean_top1_probability": float(p.max(axis=1).mean()), "imagenet_classes": int(p.shape[1])})
        top1.append(p.argmax(axis=1))
    agreement = float((np.asarray(top1) == top1[0]).all(axis=0).mean()) if len(top1) >= 2 else None
    return {"sampled": int(len(common)), "per_backbone": per, "top1_agreement": agreement,
            "backbones_agreeing": len(top1),
            "note": ("per backbone: entropy depends on which backbone is asked" if len(top1) < 2 else
                     f"top-1 agreement of {len(top1)} backbones") + "; shown for information, never used to decide"}
