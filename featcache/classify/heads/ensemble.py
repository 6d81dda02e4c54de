"""An ensemble over backbones: one member head per block of features, probabilities mixed by weights.

The input is the backbones' vectors side by side (``blocks`` gives each member's width), so
the ensemble is one scikit-learn estimator on one ``X``: it fits in a ``Pipeline``,
``GridSearchCV`` or ``cross_val_score`` like any head.

Fitting: out-of-fold member probabilities on the training rows (``validation_folds``:
K-fold on small data, one hold-out on large) choose the mixing weights; then every member
is refitted on all the training rows. The candidate weights are every member alone (one-hot),
the plain average and the log-loss-optimal point of the simplex; the candidate with the best
validation accuracy (then log-loss) wins. So the ensemble is never worse than its best
member on the validation rows, and falls back to that member when mixing does not help.
"""

from __future__ import annotations

import numpy as np

from ...errors import UsageError
from ..splits import validation_folds
from .base import Head, HeadInputError


def _log_loss(proba: np.ndarray, y_idx: np.ndarray) -> float:
    return float(-np.mean(np.log(np.clip(proba[np.arange(len(y_idx)), y_idx], 1e-12, None))))


def _mix(probas: list[np.ndarray], weights: np.ndarray) -> np.ndarray:
    return sum(w * p for w, p in zip(weights, probas) if w)


def log_loss_weights(probas: list[np.ndarray], y_idx: np.ndarray) -> np.ndarray:
    """The point of the simplex whose mixture of ``probas`` has the least log-loss on ``y_idx``.

    Convex in the weights; a softmax parameterisation keeps them on the simplex for L-BFGS.
    """
    from scipy.optimize import minimize

    picked = np.stack([p[np.arange(len(y_idx)), y_idx] for p in probas], axis=1)  # (n, members)

    def loss_grad(z: np.ndarray) -> tuple[float, np.ndarray]:
        w = np.exp(z - z.max())
        w /= w.sum()
        mixed = np.clip(picked @ w, 1e-12, None)
        g = -(picked / mixed[:, None]).mean(axis=0)  # d loss / d w
        return float(-np.log(mixed).mean()), w * (g - w @ g)

    res = minimize(loss_grad, np.zeros(len(probas)), jac=True, method="L-BFGS-B", options={"maxiter": 200})
    w = np.exp(res.x - res.x.max())
    return w / w.sum()


class EnsembleHead(Head):
    """Members of kind ``member`` (one per block of X), probabilities averaged with validation-fitted weights.

    ``blocks``: each member's width, in column order (None: all of X is one member).
    ``member_params``: parameters for every member (``random_state`` and ``threads`` come
    from the ensemble unless given). ``folds`` / ``val_fraction``: how the weights are
    validated (see ``validation_folds``).
    """

    kind = "ensemble"

    def __init__(self, blocks: tuple[int, ...] | None = None, member: str = "logreg", member_params: dict | None = None,
                 folds: int = 5, val_fraction: float = 0.1, random_state: int = 0, threads: int | None = None):
        self.blocks = blocks
        self.member = member
        self.member_params = member_params
        self.folds = folds
        self.val_fraction = val_fraction
        self.random_state = random_state
        self.threads = threads

    # -- members ---------------------------------------------------------------
    def _widths(self, n_features: int) -> list[int]:
        if self.blocks is None:
            return [n_features]
        widths = [int(b) for b in self.blocks]
        if not widths or min(widths) < 1 or sum(widths) != n_features:
            raise HeadInputError(f"blocks {list(self.blocks)} must be positive member widths summing to the "
                                 f"{n_features} features of X")
        return widths

    def _new_member(self) -> Head:
        from . import make_head

        if self.member == self.kind:
            raise HeadInputError("an ensemble's members cannot be ensembles")
        params = dict(self.member_params or {})
        try:
            names = make_head(self.member).get_params()
            for name in ("random_state", "threads"):
                if name in names:
                    params.setdefault(name, getattr(self, name))
            return make_head(self.member, **params)
        except UsageError as e:
            raise HeadInputError(str(e)) from None

    def _split(self, X: np.ndarray) -> list[np.ndarray]:
        edges = np.cumsum(self._widths(X.shape[1]))[:-1]
        return [np.ascontiguousarray(b) for b in np.split(X, edges, axis=1)]

    def _member_proba(self, head: Head, X: np.ndarray) -> np.ndarray:
        """A member's probabilities in the ensemble's class columns (a member may lack a class)."""
        out = np.zeros((len(X), len(self.classes_)))
        out[:, np.searchsorted(self.classes_, head.classes_)] = head.predict_proba(X)
        return out

    # -- fit -------------------------------------------------------------------
    def fit(self, X, y) -> EnsembleHead:
        X, y_idx = self._fit_inputs(X, y)
        parts = self._split(X)
        self._new_member()  # a bad member kind or parameter fails before any training
        y = self.classes_[y_idx]
        if len(parts) == 1:  # nothing to mix
            self.weights_, self.validation_, self.choice_ = np.ones(1), {}, "member0"
            self.members_ = [self._new_member().fit(parts[0], y)]
            return self
        folds = validation_folds(y_idx, self.folds, self.val_fraction, self.random_state)
        val = np.concatenate([va for _, va in folds])
        oof = [np.zeros((len(X), len(self.classes_))) for _ in parts]
        for tr, va in folds:
            if len(va):
                for m, Xm in enumerate(parts):
                    oof[m][va] = self._member_proba(self._new_member().fit(Xm[tr], y[tr]), Xm[va])
        self._choose_weights([p[val] for p in oof], y_idx[val])
        self.members_ = [self._new_member().fit(Xm, y) for Xm in parts]
        return self

    def _choose_weights(self, probas: list[np.ndarray], y_idx: np.ndarray) -> None:
        """Sets ``weights_`` and ``validation_`` (each candidate's validation accuracy and log-loss)."""
        m = len(probas)
        if not len(y_idx):  # no class has two rows: nothing to validate on
            self.weights_, self.validation_, self.choice_ = np.full(m, 1.0 / m), {}, "average"
            return
        candidates = {f"member{i}": np.eye(m)[i] for i in range(m)}
        candidates["average"] = np.full(m, 1.0 / m)
        candidates["log-loss"] = log_loss_weights(probas, y_idx)
        self.validation_ = {}
        for name, w in candidates.items():
            mixed = _mix(probas, w)
            self.validation_[name] = {"accuracy": float((mixed.argmax(1) == y_idx).mean()),
                                      "log_loss": _log_loss(mixed, y_idx), "weights": [round(float(v), 4) for v in w]}
        best = min(candidates, key=lambda k: (-round(self.validation_[k]["accuracy"], 9),
                                              self.validation_[k]["log_loss"]))
        self.weights_ = candidates[best].astype(np.float64)
        self.choice_ = best

    # -- predict ---------------------------------------------------------------
    def predict_proba(self, X) -> np.ndarray:
        X = self._features(X)
        parts = self._split(X)
        return _mix([self._member_proba(h, Xm) if w else None for h, Xm, w in zip(self.members_, parts, self.weights_)],
                    self.weights_)

    # -- state -----------------------------------------------------------------
    def state(self) -> dict[str, np.ndarray]:
        """``weights_`` plus each member's arrays as ``member{i}.{name}``."""
        from sklearn.utils.validation import check_is_fitted

        check_is_fitted(self)
        out = {"weights_": np.asarray(self.weights_, np.float64)}
        for i, head in enumerate(self.members_):
            out.update({f"member{i}.{k}": v for k, v in head.state().items()})
        return out

    @classmethod
    def from_state(cls, params: dict, classes: list, n_features: int, arrays: dict[str, np.ndarray]) -> EnsembleHead:
        if "weights_" not in arrays:
            raise UsageError("ensemble head state lacks ['weights_']")
        head = cls(**params)
        head.classes_ = np.asarray(classes)
        head.n_features_in_ = int(n_features)
        head.weights_ = np.asarray(arrays["weights_"], np.float64)
        widths = head._widths(n_features)
        if len(widths) != len(head.weights_):
            raise UsageError(f"ensemble head state has {len(head.weights_)} weights for {len(widths)} blocks")
        member_type = type(head._new_member())
        head.members_ = []
        for i, width in enumerate(widths):
            prefix = f"member{i}."
            mine = {k[len(prefix):]: v for k, v in arrays.items() if k.startswith(prefix)}
            head.members_.append(member_type.from_state(head._new_member().get_params(), classes, width, mine))
        return head
