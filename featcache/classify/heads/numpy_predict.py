"""Heads' prediction arithmetic in plain numpy: no scikit-learn, no torch.

The heads call these functions for their own ``predict_proba``, and a saved bundle of a
kind in ``ARRAYS`` is applied with them straight from its state arrays
(``plain_predict_proba``), so ``featcache predict`` of a cached image never imports
scikit-learn (~1-2 s of a cold start). Both paths run the same code on the same arrays:
the probabilities are bit-for-bit equal.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from ...errors import UsageError

# The head kinds whose bundles are applied here, by the state arrays each needs (linear.py's ``state_names``).
ARRAYS: dict[str, tuple[str, ...]] = {"logreg": ("coef_", "intercept_"),
                                      "linear-svm": ("coef_", "intercept_", "temperature_")}


class HeadInputError(UsageError, ValueError):
    """Features, labels or parameters a head cannot use: a usage error to featcache, a ValueError to scikit-learn."""


def check_finite(X: np.ndarray) -> None:
    if not np.isfinite(X).all():
        raise HeadInputError("features contain NaN or inf (failed rows must be dropped before training)")


def softmax(z: np.ndarray) -> np.ndarray:
    """Row-wise softmax, in float64 so confident rows do not all round to exactly 1."""
    z = np.asarray(z, np.float64)
    z = z - z.max(axis=1, keepdims=True)
    np.exp(z, out=z)
    z /= z.sum(axis=1, keepdims=True)
    return z


def float64_rows(scores: Callable[[np.ndarray], np.ndarray], X: np.ndarray, rows: int = 8192) -> np.ndarray:
    """``scores`` applied to float64 copies of blocks of rows of ``X``.

    float32 matrix products differ in the last bit with the number of rows in the batch
    (BLAS picks other kernels), so a row's probabilities would depend on its neighbours;
    in float64 that noise sits far below any tolerance. Blocks bound the extra memory.
    """
    return np.concatenate([scores(X[i : i + rows].astype(np.float64)) for i in range(0, len(X), rows)])


def as_decision(logits: np.ndarray) -> np.ndarray:
    """scikit-learn's ``decision_function`` shape: one column per class, or one score for two classes."""
    return logits[:, 1] - logits[:, 0] if logits.shape[1] == 2 else logits


def linear_logits(X: np.ndarray, coef: np.ndarray, intercept: np.ndarray) -> np.ndarray:
    """``X @ coef.T + intercept`` in float64 (``coef``: classes x features)."""
    coef64, intercept64 = coef.T.astype(np.float64), intercept.astype(np.float64)
    return float64_rows(lambda rows: rows @ coef64 + intercept64, X)


def linear_proba(X: np.ndarray, coef: np.ndarray, intercept: np.ndarray,
                 temperature: np.ndarray | None = None) -> np.ndarray:
    """Softmax over the linear scores, divided by ``temperature[0]`` when given (the SVM's margins)."""
    z = linear_logits(X, coef, intercept)
    return softmax(z if temperature is None else z / float(temperature[0]))


def check_state(kind: str, arrays: dict[str, np.ndarray], n_classes: int, n_features: int) -> None:
    """Refuse state arrays that lack a name or have a shape the head's labels and width do not fit."""
    missing = set(ARRAYS[kind]) - set(arrays)
    if missing:
        raise UsageError(f"{kind} head state lacks {sorted(missing)}")
    want = {"coef_": (n_classes, n_features), "intercept_": (n_classes,), "temperature_": (1,)}
    for name in ARRAYS[kind]:
        if arrays[name].shape != want[name]:
            raise UsageError(f"{kind} head state {name} has shape {arrays[name].shape}, expected {want[name]} "
                             f"for {n_classes} classes of {n_features} features")


def plain_features(X, n_features: int) -> np.ndarray:
    """What ``Head._features`` accepts, as it returns it: 2-D, at least one row, ``n_features`` wide, finite float32."""
    if np.iscomplexobj(X):
        raise HeadInputError("Complex data not supported")
    try:
        X = np.asarray(X, dtype=np.float32, order="C")
    except (TypeError, ValueError) as e:
        raise HeadInputError(" ".join(str(e).split())) from None
    if X.ndim != 2:
        raise HeadInputError(f"Expected 2D array, got {X.ndim}D array instead")
    if X.shape[0] < 1:
        raise HeadInputError(f"Found array with 0 sample(s) (shape={X.shape}) while a minimum of 1 is required.")
    if X.shape[1] != n_features:
        raise HeadInputError(f"X has {X.shape[1]} features, but the head is expecting {n_features} features as input.")
    check_finite(X)
    return X


def plain_predict_proba(kind: str, arrays: dict[str, np.ndarray], n_features: int, X) -> np.ndarray:
    """Class probabilities of a saved head of a kind in ``ARRAYS``, from its state arrays alone."""
    return linear_proba(plain_features(X, n_features), arrays["coef_"], arrays["intercept_"], arrays.get("temperature_"))
