"""Cosine k-nearest neighbours with faiss, similarity-weighted votes."""

from __future__ import annotations

import numpy as np

from ..threads import thread_count
from .base import Head, HeadInputError


def _normalised(X: np.ndarray) -> np.ndarray:
    X = X.copy()
    X /= np.maximum(np.linalg.norm(X, axis=1, keepdims=True), 1e-12)
    return X


class KNNHead(Head):
    """Cosine k-nearest neighbours (faiss inner product on L2-normalised vectors)."""

    kind = "knn"
    state_names = ("train_vectors_", "train_labels_")
    derived = ("_index",)

    def __init__(self, n_neighbors: int = 10, weights: str = "distance", threads: int | None = None):
        self.n_neighbors = n_neighbors
        self.weights = weights
        self.threads = threads

    def fit(self, X, y) -> KNNHead:
        if self.weights not in ("distance", "uniform"):
            raise HeadInputError(f"weights must be 'distance' or 'uniform', got {self.weights!r}")
        X, y_idx = self._fit_inputs(X, y)
        self.train_vectors_ = _normalised(X)
        self.train_labels_ = y_idx
        self._prepare()
        return self

    def _prepare(self) -> None:
        import faiss

        self._index = faiss.IndexFlatIP(self.train_vectors_.shape[1])
        self._index.add(self.train_vectors_)

    def predict_proba(self, X) -> np.ndarray:
        import faiss

        X = _normalised(self._features(X))
        k = min(self.n_neighbors, len(self.train_labels_))
        faiss.omp_set_num_threads(thread_count(self.threads))
        sims, idx = self._index.search(X, k)
        w = np.clip(sims, 0.0, None) + 1e-6 if self.weights == "distance" else np.ones_like(sims)
        votes = np.zeros((len(idx), len(self.classes_)), np.float64)
        np.add.at(votes, (np.repeat(np.arange(len(idx)), k), self.train_labels_[idx].ravel()), w.ravel())
        votes += 1e-3 / len(self.classes_)  # no hard zeros: log-loss and calibration stay finite
        return votes / votes.sum(axis=1, keepdims=True)
