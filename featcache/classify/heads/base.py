"""The head base class: scikit-learn's estimator contract, labels of any type, state as plain arrays.

Every head keeps its parameters in ``__init__``, its learned state in trailing-underscore
attributes, and offers ``fit / predict / predict_proba / score / get_params``, so it drops
into a ``Pipeline``, ``GridSearchCV`` or ``cross_val_score``. Labels keep their type, as
scikit-learn's own classifiers do: ``classes_`` is ``np.unique(y)`` and ``predict`` returns
its elements (ints in, ints out). ``state()`` / ``from_state()`` turn the learned state into
named numeric arrays (what a head bundle stores; no pickle).

A subclass that sets ``kind`` registers itself: ``make_head(kind)``, ``featcache train
--head`` and bundles find it with no other edit.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.exceptions import NotFittedError
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, validate_data

from ...errors import UsageError
from .numpy_predict import HeadInputError, check_finite

REGISTRY: dict[str, type[Head]] = {}


def _one_line(e: Exception) -> str:
    return " ".join(str(e).split())


class Head(ClassifierMixin, BaseEstimator):
    """Shared plumbing: input checks, label encoding, predict from predict_proba, state as arrays.

    Subclasses set ``kind``, list their learned arrays in ``state_names``, implement
    ``fit`` (starting with ``self._fit_inputs(X, y)``) and ``predict_proba`` (starting
    with ``self._features(X)``), and rebuild derived objects (a faiss index, a torch
    module) in ``_prepare``; those are named in ``derived`` and never pickled.
    """

    kind: ClassVar[str]
    state_names: ClassVar[tuple[str, ...]] = ()
    derived: ClassVar[tuple[str, ...]] = ()

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        kind = cls.__dict__.get("kind")
        if kind is not None:
            taken = REGISTRY.get(kind)
            if taken is not None and (taken.__module__, taken.__qualname__) != (cls.__module__, cls.__qualname__):
                raise TypeError(f"head kind {kind!r} is taken by {taken.__module__}.{taken.__qualname__}")
            REGISTRY[kind] = cls

    # -- inputs --------------------------------------------------------------
    def _fit_inputs(self, X, y) -> tuple[np.ndarray, np.ndarray]:
        """(float32 C-contiguous features, class index per row); sets ``classes_`` and ``n_features_in_``."""
        try:
            X, y = validate_data(self, X, y, dtype=np.float32, order="C", ensure_all_finite=False)
            check_classification_targets(y)
        except ValueError as e:
            raise HeadInputError(_one_line(e)) from None
        check_finite(X)
        classes, y_idx = np.unique(y, return_inverse=True)
        if len(classes) < 2:
            raise HeadInputError(f"need at least 2 classes to train a head, got 1 class: {classes.tolist()}")
        self.classes_ = classes
        return X, y_idx.astype(np.int64)

    def _features(self, X) -> np.ndarray:
        """Prediction-time features: fitted head, same width as in fit, finite float32."""
        check_is_fitted(self)
        try:
            X = validate_data(self, X, reset=False, dtype=np.float32, order="C", ensure_all_finite=False)
        except NotFittedError:
            raise
        except ValueError as e:
            raise HeadInputError(_one_line(e)) from None
        check_finite(X)
        return X

    # -- prediction ----------------------------------------------------------
    def predict_proba(self, X) -> np.ndarray:
        raise NotImplementedError

    def predict(self, X) -> np.ndarray:
        """The most probable class of each row, of the same type as the training labels."""
        proba = self.predict_proba(X)  # first: an unfitted head raises NotFittedError here
        return self.classes_[np.argmax(proba, axis=1)]

    # -- state ---------------------------------------------------------------
    def state(self) -> dict[str, np.ndarray]:
        """Learned state as named numeric arrays (classes and width travel in the manifest)."""
        check_is_fitted(self)
        return {name: getattr(self, name) for name in self.state_names}

    @classmethod
    def from_state(cls, params: dict, classes: list, n_features: int, arrays: dict[str, np.ndarray]) -> Head:
        """A fitted head from ``state()``'s arrays, its labels (JSON values) and its input width."""
        missing = set(cls.state_names) - set(arrays)
        if missing:
            raise UsageError(f"{cls.kind} head state lacks {sorted(missing)}")
        head = cls(**params)
        head.classes_ = np.asarray(classes)
        head.n_features_in_ = int(n_features)
        for name in cls.state_names:
            setattr(head, name, arrays[name])
        head._prepare()
        return head

    def _prepare(self) -> None:
        """Rebuild the ``derived`` objects from the learned arrays (after fit, load, unpickle)."""

    def __getstate__(self) -> dict:
        state = dict(super().__getstate__())  # object.__getstate__ hands out the live __dict__
        for name in self.derived:
            state.pop(name, None)
        return state

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        if self.derived and hasattr(self, "classes_"):
            self._prepare()

