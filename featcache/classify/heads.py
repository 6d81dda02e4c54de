"""Classifier heads on cached features, following the scikit-learn estimator contract.

Every head keeps its parameters in ``__init__``, its learned state in trailing-underscore
attributes, and offers ``fit / predict / predict_proba / score / get_params``, so it drops
into a ``Pipeline`` or ``GridSearchCV``. ``state()`` / ``from_state()`` turn the learned
state into plain named arrays (what a head bundle stores; no pickle).

- ``LogRegHead``: multinomial logistic regression, full-batch L-BFGS in torch on
  standardised float32 features; ``C`` chosen on a validation split unless given.
- ``LinearSVMHead``: one-vs-rest squared-hinge linear SVM, same solver; probabilities
  from a softmax over margins with a temperature fitted on the training data.
- ``KNNHead``: cosine k-nearest neighbours with faiss, similarity-weighted votes.
- ``MLPHead`` (in ``mlp.py``): a small torch MLP with early stopping and a seed.
"""

from __future__ import annotations

import numpy as np
import torch
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.utils.validation import check_is_fitted

from ..errors import UsageError
from ..runtime import available_cpus

SMALL_WORK = 4_000_000  # rows x dims below which one thread beats several (per-op sync costs)


def thread_count(threads: int | None = None, work: int | None = None) -> int:
    """The CPUs really available (affinity/cgroup), never more; one thread for small problems.

    On a small matrix every op is a few microseconds, and synchronising threads (worse:
    waiting for a descheduled one on a busy machine) costs more than it saves.
    """
    return threads or (1 if work is not None and work < SMALL_WORK else available_cpus())


def set_threads(threads: int | None = None, work: int | None = None) -> int:
    """Set torch's thread count to ``thread_count(threads, work)``."""
    n = thread_count(threads, work)
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return n


def as_features(X) -> np.ndarray:
    X = np.ascontiguousarray(np.asarray(X, dtype=np.float32))
    if X.ndim != 2:
        raise UsageError(f"features must be a 2-d array (n, dim), got shape {X.shape}")
    if not np.isfinite(X).all():
        raise UsageError("features contain NaN or inf (failed rows must be dropped before training)")
    return X


def as_labels(y) -> np.ndarray:
    """Labels as a fixed-width unicode array (numpy's StringDType from the cache included)."""
    y = np.asarray(y)
    if y.dtype.kind != "U":
        y = np.array([str(v) for v in y.tolist()], dtype=str)
    return y


def stratified_holdout(y_idx: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, validation) indices with ``fraction`` of every class (at least one) held out."""
    rng = np.random.default_rng(seed)
    tr, va = [], []
    for c in np.unique(y_idx):
        idx = rng.permutation(np.flatnonzero(y_idx == c))
        k = int(round(fraction * len(idx)))
        k = min(max(k, 1), len(idx) - 1) if len(idx) > 1 else 0
        va.append(idx[:k])
        tr.append(idx[k:])
    return np.sort(np.concatenate(tr)), np.sort(np.concatenate(va))


class Head(ClassifierMixin, BaseEstimator):
    """Shared plumbing: label encoding, predict from predict_proba, state as arrays."""

    kind = "head"

    def _encode(self, y) -> np.ndarray:
        y = as_labels(y)
        self.classes_, y_idx = np.unique(y, return_inverse=True)
        if len(self.classes_) < 2:
            raise UsageError(f"need at least 2 classes to train a head, got {list(self.classes_)}")
        return y_idx.astype(np.int64)

    def predict(self, X) -> np.ndarray:
        return self.classes_[np.argmax(self.predict_proba(X), axis=1)]

    def state(self) -> dict[str, np.ndarray]:
        """Learned state as named numeric arrays (classes travel in the manifest)."""
        raise NotImplementedError

    @classmethod
    def from_state(cls, params: dict, classes: list[str], arrays: dict[str, np.ndarray]) -> Head:
        head = cls(**params)
        head.classes_ = np.asarray(classes, dtype=str)
        for name, value in arrays.items():
            setattr(head, name, value)
        head.n_features_in_ = int(head._dim())
        return head

    def _dim(self) -> int:
        raise NotImplementedError


def _softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    np.exp(z, out=z)
    z /= z.sum(axis=1, keepdims=True)
    return z


class _LinearHead(Head):
    """A linear model on standardised features, fitted full-batch with L-BFGS."""

    loss = "log"

    def _loss_grad(self, X: torch.Tensor, y: torch.Tensor, targets: torch.Tensor | None, W: torch.Tensor,
                   b: torch.Tensor, lam: float) -> torch.Tensor:
        """Objective value; gradients written to ``W.grad``/``b.grad`` by hand.

        The two passes over X run in numpy (OpenBLAS), 2-4x faster than torch's MKL on
        these skinny shapes here; autograd would also form dW as ``X.T @ G``, a transposed
        product up to ~15x slower than the equivalent ``(G.T @ X).T`` used here.
        """
        n = X.shape[0]
        Xn = X.numpy()
        Z = torch.from_numpy(Xn @ W.numpy()) + b
        if self.loss == "log":
            lse = torch.logsumexp(Z, dim=1)
            loss = (lse - Z.gather(1, y[:, None])[:, 0]).mean()
            G = torch.softmax(Z, dim=1)
            G[torch.arange(n), y] -= 1.0
        else:  # one-vs-rest squared hinge, targets +-1
            M = torch.clamp(1.0 - targets * Z, min=0.0)
            loss = (M * M).sum(dim=1).mean()
            G = -2.0 * targets * M
        G /= n
        W.grad = torch.from_numpy(np.ascontiguousarray((G.numpy().T @ Xn).T)) + lam * W
        b.grad = G.sum(dim=0)
        return loss + 0.5 * lam * (W * W).sum()

    def _lbfgs(self, X: torch.Tensor, y: torch.Tensor, C: float, W: torch.Tensor, b: torch.Tensor,
               max_iter: int) -> int:
        """Minimise mean loss + ||W||^2 / (2 C n) (scikit-learn's scaling of C) in place."""
        n = X.shape[0]
        lam = 1.0 / (C * n)
        targets = None
        if self.loss != "log":
            targets = -torch.ones(n, W.shape[1])
            targets[torch.arange(n), y] = 1.0
        opt = torch.optim.LBFGS([W, b], lr=1.0, max_iter=max_iter, history_size=20, tolerance_grad=self.tol,
                                tolerance_change=1e-9, line_search_fn="strong_wolfe")

        def closure():
            with torch.no_grad():
                return self._loss_grad(X, y, targets, W, b, lam)

        opt.step(closure)
        return int(opt.state[opt._params[0]].get("n_iter", 0))

    def fit(self, X, y) -> _LinearHead:
        from threadpoolctl import threadpool_limits

        X = as_features(X)
        blas = thread_count(self.threads, X.size)
        before = torch.get_num_threads()
        torch.set_num_threads(1)  # torch only runs L-BFGS's small vector ops: threads would just sync
        try:
            with threadpool_limits(blas):  # the passes over X run in numpy's BLAS
                return self._fit(X, y)
        finally:
            torch.set_num_threads(before)

    def _fit(self, X: np.ndarray, y) -> _LinearHead:
        y_idx = self._encode(y)
        self.n_features_in_ = X.shape[1]
        mean = X.mean(axis=0)
        scale = X.std(axis=0)
        scale[scale < 1e-6] = 1.0
        Xs = torch.from_numpy((X - mean) / scale)
        yt = torch.from_numpy(y_idx)
        k, d = len(self.classes_), X.shape[1]
        W = torch.zeros(d, k)
        b = torch.zeros(k)
        self.validation_ = {}
        C = self.C
        if C is None:
            C = self._select_C(Xs, yt, y_idx, W, b)
        self.n_iter_ = self._lbfgs(Xs, yt, C, W, b, self.max_iter)
        self.C_ = float(C)
        W_ = W.detach().numpy()
        # Fold the standardisation into the weights: logits = X @ coef_.T + intercept_.
        self.coef_ = np.ascontiguousarray((W_ / scale[:, None]).T.astype(np.float32))
        self.intercept_ = (b.detach().numpy() - (mean / scale) @ W_).astype(np.float32)
        if self.loss != "log":
            self.temperature_ = np.asarray([self._fit_temperature(X, y_idx)], np.float32)
        return self

    def _select_C(self, Xs, yt, y_idx, W, b) -> float:
        """Regularisation path (strong to weak, warm-started) scored on held-out rows.

        Large data: one stratified split. Below 2000 rows: 3 folds, so a handful of
        validation images does not decide alone. Ties in accuracy go to the lower log-loss.
        """
        n = len(y_idx)
        if n < 2000 and np.bincount(y_idx).min() >= 3:
            from sklearn.model_selection import StratifiedKFold

            folds = list(StratifiedKFold(3, shuffle=True, random_state=self.random_state).split(y_idx, y_idx))
        else:
            tr, va = stratified_holdout(y_idx, self.val_fraction, self.random_state)
            if self.select_rows and len(tr) > self.select_rows:  # the path only ranks C: a subsample does
                keep, _ = stratified_holdout(y_idx[tr], 1 - self.select_rows / len(tr), self.random_state)
                tr = tr[keep]
            folds = [(tr, va)]
        Cs = sorted(self.Cs)
        acc = np.zeros(len(Cs))
        ce = np.zeros(len(Cs))
        start = None
        for f, (tr, va) in enumerate(folds):
            Xtr, ytr, Xva, yva = Xs[tr], yt[tr], Xs[va], yt[va]
            with torch.no_grad():
                W.zero_()
                b.zero_()
            for j, C in enumerate(Cs):
                self._lbfgs(Xtr, ytr, C, W, b, self.path_iter)
                with torch.no_grad():
                    logits = torch.addmm(b, Xva, W)
                    acc[j] += float((logits.argmax(1) == yva).float().mean()) / len(folds)
                    ce[j] += float(torch.nn.functional.cross_entropy(logits, yva)) / len(folds)
                if f == 0 and len(folds) == 1:
                    start = start or {}
                    start[C] = (W.detach().clone(), b.detach().clone())
        self.validation_ = {f"{C:g}": {"accuracy": round(float(a), 5), "log_loss": round(float(c), 5)}
                            for C, a, c in zip(Cs, acc, ce)}
        best = min(range(len(Cs)), key=lambda j: (-round(acc[j], 6), ce[j]))
        with torch.no_grad():  # warm start the final fit from the chosen point on the path
            if start is not None:
                W.copy_(start[Cs[best]][0])
                b.copy_(start[Cs[best]][1])
            else:
                W.zero_()
                b.zero_()
        return Cs[best]

    def _fit_temperature(self, X: np.ndarray, y_idx: np.ndarray) -> float:
        z = torch.from_numpy(self.decision_function(X))
        yt = torch.from_numpy(y_idx)
        log_t = torch.zeros(1, requires_grad=True)
        opt = torch.optim.LBFGS([log_t], max_iter=50, line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(z / log_t.exp(), yt)
            loss.backward()
            return loss

        opt.step(closure)
        return float(log_t.detach().exp())

    def decision_function(self, X) -> np.ndarray:
        check_is_fitted(self, "coef_")
        return as_features(X) @ self.coef_.T + self.intercept_

    def predict_proba(self, X) -> np.ndarray:
        z = self.decision_function(X)
        if self.loss != "log":
            z = z / float(self.temperature_[0])
        return _softmax(z)

    def state(self) -> dict[str, np.ndarray]:
        out = {"coef_": self.coef_, "intercept_": self.intercept_}
        if self.loss != "log":
            out["temperature_"] = self.temperature_
        return out

    def _dim(self) -> int:
        return self.coef_.shape[1]


class LogRegHead(_LinearHead):
    """Multinomial logistic regression (L2). ``C=None`` picks C from ``Cs`` on a validation split."""

    kind = "logreg"
    loss = "log"

    def __init__(self, C: float | None = None, Cs: tuple[float, ...] = (0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0),
                 max_iter: int = 30, path_iter: int = 10, tol: float = 1e-5, val_fraction: float = 0.1,
                 select_rows: int | None = 5000, random_state: int = 0, threads: int | None = None):
        self.C = C
        self.Cs = Cs
        self.max_iter = max_iter
        self.path_iter = path_iter
        self.select_rows = select_rows
        self.tol = tol
        self.val_fraction = val_fraction
        self.random_state = random_state
        self.threads = threads


class LinearSVMHead(_LinearHead):
    """One-vs-rest squared-hinge linear SVM (L2); ``C=None`` picks C on a validation split."""

    kind = "linear-svm"
    loss = "squared_hinge"

    def __init__(self, C: float | None = None, Cs: tuple[float, ...] = (0.001, 0.003, 0.01, 0.03, 0.1),
                 max_iter: int = 30, path_iter: int = 10, tol: float = 1e-5, val_fraction: float = 0.1,
                 select_rows: int | None = 5000, random_state: int = 0, threads: int | None = None):
        self.C = C
        self.Cs = Cs
        self.max_iter = max_iter
        self.path_iter = path_iter
        self.select_rows = select_rows
        self.tol = tol
        self.val_fraction = val_fraction
        self.random_state = random_state
        self.threads = threads


class KNNHead(Head):
    """Cosine k-nearest neighbours (faiss inner product on L2-normalised vectors)."""

    kind = "knn"

    def __init__(self, n_neighbors: int = 10, weights: str = "distance", threads: int | None = None):
        self.n_neighbors = n_neighbors
        self.weights = weights
        self.threads = threads

    @staticmethod
    def _normalise(X: np.ndarray) -> np.ndarray:
        X = as_features(X).copy()
        X /= np.maximum(np.linalg.norm(X, axis=1, keepdims=True), 1e-12)
        return X

    def fit(self, X, y) -> KNNHead:
        if self.weights not in ("distance", "uniform"):
            raise UsageError(f"weights must be 'distance' or 'uniform', got {self.weights!r}")
        self.train_vectors_ = self._normalise(X)
        self.train_labels_ = self._encode(y)
        self.n_features_in_ = self.train_vectors_.shape[1]
        self._index = None
        return self

    def _get_index(self):
        import faiss

        if getattr(self, "_index", None) is None:
            faiss.omp_set_num_threads(self.threads or available_cpus())
            self._index = faiss.IndexFlatIP(self.train_vectors_.shape[1])
            self._index.add(self.train_vectors_)
        return self._index

    def predict_proba(self, X) -> np.ndarray:
        check_is_fitted(self, "train_vectors_")
        k = min(self.n_neighbors, len(self.train_labels_))
        sims, idx = self._get_index().search(self._normalise(X), k)
        w = np.clip(sims, 0.0, None) + 1e-6 if self.weights == "distance" else np.ones_like(sims)
        votes = np.zeros((len(idx), len(self.classes_)), np.float64)
        np.add.at(votes, (np.repeat(np.arange(len(idx)), k), self.train_labels_[idx].ravel()), w.ravel())
        votes += 1e-3 / len(self.classes_)  # no hard zeros: log-loss and calibration stay finite
        return (votes / votes.sum(axis=1, keepdims=True)).astype(np.float32)

    def state(self) -> dict[str, np.ndarray]:
        return {"train_vectors_": self.train_vectors_, "train_labels_": self.train_labels_}

    def _dim(self) -> int:
        return self.train_vectors_.shape[1]


def head_types() -> dict[str, type[Head]]:
    from .mlp import MLPHead

    return {c.kind: c for c in (LogRegHead, LinearSVMHead, KNNHead, MLPHead)}


def make_head(kind: str, **params) -> Head:
    types = head_types()
    if kind not in types:
        raise UsageError(f"unknown head {kind!r}; choose one of {sorted(types)}")
    return types[kind](**params)
