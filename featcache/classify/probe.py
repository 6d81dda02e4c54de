"""Layer-wise linear probes, and advice on where the data sits in the transfer-learning matrix.

``probe`` fits the same logistic-regression probe on every cached tap (stage1..stageN,
final) and reports held-out accuracy by depth. ``advise`` adds the size of the data and
how ImageNet-like it looks (entropy of the backbone's own ImageNet classifier over the
cached final features, and whether the deepest features transfer best), then names one
cell of the matrix in ARCHITECTURE.md:

    small + similar      -> head on frozen features
    large + similar      -> fine-tune deeper layers
    small + dissimilar   -> reuse early layers + new top layers
    large + dissimilar   -> fine-tune deeper layers (most of them)
    too few examples     -> collect more data
"""

from __future__ import annotations

import re
import time

import numpy as np

from ..errors import UsageError
from ..store.cache import FeatureCache
from .data import align, holdout_split, kfold, load_labelled
from .heads import LogRegHead
from .splits import stratified_holdout

# Thresholds (documented in the output so a user can judge them).
LARGE_PER_CLASS = 1000  # median images per class from which a dataset counts as large
MIN_PER_CLASS = 10  # below this in the smallest class: collect more data
SIMILAR_ENTROPY = 0.53  # normalised ImageNet-prediction entropy below which data looks ImageNet-like
# (measured with Lite0: Tux Paint photos 0.46, Fashion-MNIST 0.60; the threshold sits between)
FINAL_SHARE = 0.97  # final-tap probe accuracy at least this share of the best tap's: deep features transfer


def _depth(tap: str) -> tuple[int, str]:
    m = re.fullmatch(r"stage(\d+)", tap)
    return (int(m.group(1)), tap) if m else (10**6, tap)


def probe(cache_dir: str, fingerprint: str | None = None, taps: list[str] | None = None, max_rows: int = 20000,
          seed: int = 0) -> dict:
    """Held-out accuracy of a linear probe on each tap (5-fold CV below 2000 rows, else a 20 % split)."""
    cache = FeatureCache(cache_dir)
    fp = cache.resolve_fingerprint(fingerprint)
    attrs = cache.group_attrs(fp)
    taps = sorted(taps or attrs["taps"], key=_depth)
    base = load_labelled(cache, fp, "final" if "final" in attrs["taps"] else taps[-1])
    if len(base) > max_rows:  # stratified subsample keeps probing to seconds on big caches
        keep, _ = stratified_holdout(base.y, 1 - max_rows / len(base), seed)
        base = base.subset(keep)
    counts = np.unique(base.y, return_counts=True)[1]
    small = len(base) < 2000
    splits = kfold(base.y, min(5, int(counts.min())), seed) if small and counts.min() >= 2 else [holdout_split(base.y, 0.2, seed)]
    rows = []
    for tap in taps:
        data = base if tap == base.tap else align(base, load_labelled(cache, fp, tap))
        t = time.perf_counter()
        accs = []
        for tr, te in splits:
            head = LogRegHead(random_state=seed).fit(data.X[tr], data.y[tr])
            accs.append(head.score(data.X[te], data.y[te]))
        rows.append({"tap": tap, "dim": int(data.X.shape[1]), "accuracy": float(np.mean(accs)),
                     "accuracy_std": float(np.std(accs)), "seconds": time.perf_counter() - t})
    best = max(rows, key=lambda r: r["accuracy"])
    return {"cache": str(cache.root), "fingerprint": fp, "backbone": attrs["backbone"].get("name"),
            "rows": len(base), "classes": len(counts), "evaluation": f"{len(splits)}-fold CV" if len(splits) > 1 else
            "20% stratified hold-out", "taps": rows, "best_tap": best["tap"],
            "chance": float(counts.max() / counts.sum())}


def imagenet_similarity(cache: FeatureCache, fp: str, sample: int = 5000, seed: int = 0) -> dict:
    """How confidently the backbone's ImageNet classifier labels the data (low entropy = ImageNet-like)."""
    from ..extract.embedder import embedder_for

    attrs = cache.group_attrs(fp)
    feats = cache.read(fp, "final")
    rng = np.random.default_rng(seed)
    idx = rng.choice(len(feats), min(sample, len(feats)), replace=False)
    emb = embedder_for(attrs["backbone"], attrs["fingerprint"], ["final"], "cpu")
    logits = emb.classify_imagenet(np.ascontiguousarray(feats.vectors[idx])).astype(np.float64)
    logits -= logits.max(axis=1, keepdims=True)
    p = np.exp(logits)
    p /= p.sum(axis=1, keepdims=True)
    ent = -(p * np.log(np.clip(p, 1e-12, 1))).sum(axis=1) / np.log(p.shape[1])
    return {"sampled": int(len(idx)), "normalised_entropy": float(ent.mean()), "mean_top1_probability":
            float(p.max(axis=1).mean()), "imagenet_classes": int(p.shape[1])}


def advise(cache_dir: str, fingerprint: str | None = None, max_rows: int = 20000, seed: int = 0) -> dict:
    """Probe by depth + ImageNet similarity + size -> one recommendation, with the evidence."""
    cache = FeatureCache(cache_dir)
    fp = cache.resolve_fingerprint(fingerprint)
    if "final" not in cache.group_attrs(fp)["taps"]:
        raise UsageError("advise needs the final tap in the cache (extract with --taps final ...)")
    pr = probe(cache_dir, fp, max_rows=max_rows, seed=seed)
    sim = imagenet_similarity(cache, fp, seed=seed)
    labels = load_labelled(cache, fp, "final").y
    counts = np.unique(labels, return_counts=True)[1]
    by_tap = {r["tap"]: r["accuracy"] for r in pr["taps"]}
    best_acc = by_tap[pr["best_tap"]]
    final_share = by_tap["final"] / best_acc if best_acc > 0 else 0.0
    large = float(np.median(counts)) >= LARGE_PER_CLASS
    similar = sim["normalised_entropy"] < SIMILAR_ENTROPY and final_share >= FINAL_SHARE
    evidence = [
        f"{len(labels)} labelled images in {len(counts)} classes (median {int(np.median(counts))} per class, "
        f"smallest {int(counts.min())}): {'large' if large else 'small'} (large from {LARGE_PER_CLASS} per class)",
        "linear probe accuracy by depth: " + ", ".join(f"{r['tap']} {r['accuracy']:.3f}" for r in pr["taps"])
        + f" ({pr['evaluation']}, chance {pr['chance']:.3f})",
        f"best tap {pr['best_tap']}; final tap reaches {final_share:.1%} of it "
        f"({'deep features transfer' if final_share >= FINAL_SHARE else 'deep features transfer worse than earlier ones'})",
        f"ImageNet classifier on the data: normalised entropy {sim['normalised_entropy']:.3f} "
        f"(ImageNet-like below {SIMILAR_ENTROPY}), mean top-1 probability {sim['mean_top1_probability']:.3f}",
    ]
    if counts.min() < MIN_PER_CLASS or (best_acc < pr["chance"] + 0.5 * (1 - pr["chance"]) and not large):
        cell, rec = "too little data", "collect more data"
        evidence.append(f"smallest class has {int(counts.min())} images (need {MIN_PER_CLASS}+) or the best probe "
                        "is closer to chance than to perfect")
    elif similar and not large:
        cell, rec = "small / similar", "head on frozen features"
    elif similar and large:
        cell, rec = "large / similar", "fine-tune deeper layers"
    elif not large:
        cell, rec = "small / not similar", "reuse early layers + new top layers"
    else:
        cell, rec = "large / not similar", "fine-tune deeper layers"
    commands = {
        "head on frozen features": f"featcache train --cache {cache_dir} --head logreg mlp --cv 5 --out head",
        "fine-tune deeper layers": f"featcache train --cache {cache_dir} --head mlp --out head  (baseline), then "
                                   "fine-tune the last stages with a small learning rate",
        "reuse early layers + new top layers": f"featcache train --cache {cache_dir} --tap {pr['best_tap']} "
                                               "--head mlp --out head  (new top layers on the best early tap)",
        "collect more data": "label more images per class, then run advise again",
    }
    return {"cache": str(cache.root), "fingerprint": fp, "backbone": pr["backbone"], "cell": cell,
            "recommendation": rec, "next": commands[rec], "evidence": evidence, "probe": pr,
            "imagenet": sim, "size": {"labelled": int(len(labels)), "classes": int(len(counts)),
                                      "median_per_class": float(np.median(counts)), "min_per_class": int(counts.min())},
            "thresholds": {"large_per_class": LARGE_PER_CLASS, "min_per_class": MIN_PER_CLASS,
                           "similar_entropy": SIMILAR_ENTROPY, "final_share": FINAL_SHARE}}
