"""The one stratified hold-out splitter (heads' validation rows, train/test splits, probes, fine-tuning)."""

from __future__ import annotations

import numpy as np


def stratified_holdout(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(kept, held-out) indices into ``labels``, sorted, with ``fraction`` of every class held out.

    Every class with two or more rows gives at least one held-out row and keeps at least
    one; a class with one row is never held out (it could not be learned otherwise).
    """
    rng = np.random.default_rng(seed)
    kept, held = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)]
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        k = int(round(fraction * len(idx)))
        k = min(max(k, 1), len(idx) - 1) if len(idx) > 1 else 0
        held.append(idx[:k])
        kept.append(idx[k:])
    return np.sort(np.concatenate(kept)), np.sort(np.concatenate(held))


SMALL_ROWS = 2000  # below this, one hold-out split leaves too few validation rows to decide on


def validation_folds(labels: np.ndarray, folds: int, fraction: float, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """(train, validation) index pairs a head decides on (``C``, ensemble weights) inside its training rows.

    Small data (under ``SMALL_ROWS``, every class with at least ``folds`` rows): stratified
    ``folds``-fold, so every row is validated once and a handful of images does not decide
    alone. Otherwise one stratified hold-out of ``fraction``.
    """
    if len(labels) < SMALL_ROWS and np.unique(labels, return_counts=True)[1].min() >= folds >= 2:
        from sklearn.model_selection import StratifiedKFold

        return list(StratifiedKFold(folds, shuffle=True, random_state=seed).split(labels, labels))
    return [stratified_holdout(labels, fraction, seed)]
