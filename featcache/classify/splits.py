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
