"""What the page's "check" view reads: where a served head is wrong or unsure, and near-duplicate groups.

Mistakes come from out-of-fold predictions: the served head's type and parameters (from its
bundle) refitted by ``featcache train --cv`` over the cache's labelled rows of its tap, so each
image is predicted by a head that never saw it (the served head itself has seen them all).
They are computed on the first request, in a worker thread, once per loaded head version
(a reload computes them again), and refused above ``REVIEW_MAX_ROWS`` labelled rows.
Near-duplicate groups are ``featcache dedupe``'s, kept for the last few thresholds asked.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from ..classify.train import TrainConfig, train
from ..errors import UsageError
from ..store.index import dedupe
from .catalogue import Catalogue
from .heads import LoadedHead

REVIEW_MAX_ROWS = 50_000  # labelled rows above which the on-demand cross-validation is refused
REVIEW_FOLDS = 5
DEDUPE_KEEP = 4  # thresholds whose groups stay cached


@dataclass
class Review:
    """Out-of-fold predictions of one head version over the labelled rows."""

    head: LoadedHead
    folds: int
    seconds: float
    accuracy: float
    sha256: np.ndarray
    keys: np.ndarray
    truth: np.ndarray
    predicted: np.ndarray
    confidence: np.ndarray  # probability of the predicted label
    truth_probability: np.ndarray

    def order(self, which: str) -> np.ndarray:
        """Row order of a list: "wrong" most confident mistakes first; "unsure" least confident first."""
        if which == "wrong":
            wrong = np.flatnonzero(self.predicted != self.truth)
            return wrong[np.argsort(-self.confidence[wrong], kind="stable")]
        return np.argsort(self.confidence, kind="stable")


def _folds(catalogue: Catalogue) -> int:
    counts = [n for label, n in catalogue.label_counts() if label]
    total = sum(counts)
    if not counts:
        raise UsageError("the served cache has no labelled images: nothing to check a head against")
    if total > REVIEW_MAX_ROWS:
        raise UsageError(f"the cache has {total:,} labelled images, over the {REVIEW_MAX_ROWS:,} cross-validated on "
                         "demand; run `featcache train --cv 5 --report report.html` instead")
    folds = min(REVIEW_FOLDS, min(counts))
    if folds < 2:
        raise UsageError("every label needs at least 2 images to cross-validate the head "
                         f"(smallest label has {min(counts)})")
    return folds


def compute_review(head: LoadedHead, catalogue: Catalogue) -> Review:
    """Out-of-fold predictions of ``head``'s type and parameters (``featcache train --cv``): slow, run in a thread."""
    folds = _folds(catalogue)
    manifest = head.bundle.manifest
    kind = manifest["head"]["type"]
    params = {k: tuple(v) if isinstance(v, list) else v for k, v in manifest["head"]["params"].items()}
    t0 = time.perf_counter()
    cfg = TrainConfig(cache=str(catalogue.cache.root), out=None, fingerprint=catalogue.fingerprint,
                      taps=[head.bundle.tap], heads=[kind], cv=folds, params={kind: params})
    _, (ev,) = train(cfg)
    pred_idx = ev.proba.argmax(1)
    rows = np.arange(len(pred_idx))
    column = {c: i for i, c in enumerate(ev.classes.tolist())}
    truth_p = np.array([ev.proba[r, column[t]] if t in column else 0.0 for r, t in zip(rows, ev.y_true.tolist())])
    return Review(head, folds, time.perf_counter() - t0, float(ev.metrics["accuracy"]), ev.sha256, ev.keys,
                  ev.y_true.astype(str), ev.classes[pred_idx].astype(str), ev.proba[rows, pred_idx].astype(float),
                  truth_p.astype(float))


class Reviews:
    """One review per head version, and dedupe groups per threshold; concurrent askers share one computation."""

    def __init__(self, catalogue: Catalogue, tap: str):
        self.catalogue = catalogue
        self.tap = tap
        self._reviews: dict[str, Review] = {}
        self._groups: OrderedDict[float, dict] = OrderedDict()
        self._review_lock = asyncio.Lock()
        self._groups_lock = asyncio.Lock()

    async def review(self, head: LoadedHead) -> Review:
        async with self._review_lock:
            done = self._reviews.get(head.name)
            if done is None or done.head is not head:  # a reloaded head is another version
                done = await asyncio.to_thread(compute_review, head, self.catalogue)
                self._reviews[head.name] = done
            return done

    async def duplicates(self, threshold: float) -> dict:
        threshold = round(threshold, 4)
        async with self._groups_lock:
            found = self._groups.get(threshold)
            if found is None:
                found = await asyncio.to_thread(dedupe, self.catalogue.cache.root, self.catalogue.fingerprint,
                                                self.tap, threshold)
                self._groups[threshold] = found
                while len(self._groups) > DEDUPE_KEEP:
                    self._groups.popitem(last=False)
            self._groups.move_to_end(threshold)
            return found
