"""Linear heads fitted full-batch with L-BFGS in torch on standardised float32 features.

- ``LogRegHead``: multinomial logistic regression (L2).
- ``LinearSVMHead``: one-vs-rest squared-hinge linear SVM (L2); probabilities from a
  softmax over margins with a temperature fitted on the training data.

Both pick ``C`` on held-out rows unless it is given, and share one parameter list.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

import numpy as np

from ..splits import stratified_holdout, validation_folds
from ..threads import thread_count
from .base import Head
from .numpy_predict import ARRAYS, as_decision, linear_logits, linear_proba

if TYPE_CHECKING:  # torch is imported where a head trains: loading one to predict needs none
    import torch


class _LinearHead(Head):
    """A linear model on standardised features; ``Cs=None`` searches the head's own ``default_Cs``."""

    loss: ClassVar[str]
    default_Cs: ClassVar[tuple[float, ...]]

    def __init__(self, C: float | None = None, Cs: tuple[float, ...] | None = None, max_iter: int = 30,
                 path_iter: int = 10, tol: float = 1e-5, val_fraction: float = 0.1, select_rows: int | None = 5000,
                 random_state: int = 0, threads: int | None = None):
        self.C = C
        self.Cs = Cs
        self.max_iter = max_iter
        self.path_iter = path_iter
        self.tol = tol
        self.val_fraction = val_fraction
        self.select_rows = select_rows
        self.random_state = random_state
        self.threads = threads

    def _loss_grad(self, X: torch.Tensor, y: torch.Tensor, targets: torch.Tensor | None, W: torch.Tensor,
                   b: torch.Tensor, lam: float) -> torch.Tensor:
        """Objective value; gradients written to ``W.grad``/``b.grad`` by hand.

        The two passes over X run in numpy (OpenBLAS), 2-4x faster than torch's MKL on
        these skinny shapes here; autograd would also form dW as ``X.T @ G``, a transposed
        product up to ~15x slower than the equivalent ``(G.T @ X).T`` used here.
        """
        import torch

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
        import torch

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
        import torch
        from threadpoolctl import threadpool_limits

        X, y_idx = self._fit_inputs(X, y)
        blas = thread_count(self.threads, X.size)
        before = torch.get_num_threads()
        torch.set_num_threads(1)  # torch only runs L-BFGS's small vector ops: threads would just sync
        try:
            with threadpool_limits(blas):  # the passes over X run in numpy's BLAS
                return self._fit(X, y_idx)
        finally:
            torch.set_num_threads(before)

    def _fit(self, X: np.ndarray, y_idx: np.ndarray) -> _LinearHead:
        import torch

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
        return self

    def _select_C(self, Xs, yt, y_idx, W, b) -> float:
        """Regularisation path (strong to weak, warm-started) scored on held-out rows.

        Large data: one stratified split. Below 2000 rows: 3 folds, so a handful of
        validation images does not decide alone. Ties in accuracy go to the lower log-loss.
        """
        import torch

        folds = validation_folds(y_idx, 3, self.val_fraction, self.random_state)
        if len(folds) == 1:
            tr, va = folds[0]
            if self.select_rows and len(tr) > self.select_rows:  # the path only ranks C: a subsample does
                keep, _ = stratified_holdout(y_idx[tr], 1 - self.select_rows / len(tr), self.random_state)
                folds = [(tr[keep], va)]
        Cs = sorted(self.default_Cs if self.Cs is None else self.Cs)
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

    def _logits(self, X: np.ndarray) -> np.ndarray:
        return linear_logits(X, self.coef_, self.intercept_)

    def decision_function(self, X) -> np.ndarray:
        """Class scores ``X @ coef_.T + intercept_``; for two classes one score, > 0 for ``classes_[1]``."""
        return as_decision(self._logits(self._features(X)))

    def predict_proba(self, X) -> np.ndarray:
        """What a saved bundle gives without this class (``numpy_predict.plain_predict_proba``): the same code."""
        return linear_proba(self._features(X), self.coef_, self.intercept_)


class LogRegHead(_LinearHead):
    """Multinomial logistic regression (L2). ``C=None`` picks C on a validation split."""

    kind = "logreg"
    state_names = ARRAYS[kind]  # what a saved bundle is applied with, without this class
    loss = "log"
    default_Cs = (0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0)


class LinearSVMHead(_LinearHead):
    """One-vs-rest squared-hinge linear SVM (L2); ``C=None`` picks C on a validation split."""

    kind = "linear-svm"
    loss = "squared_hinge"
    default_Cs = (0.001, 0.003, 0.01, 0.03, 0.1)
    state_names = ARRAYS[kind]

    def _fit(self, X: np.ndarray, y_idx: np.ndarray) -> LinearSVMHead:

        super()._fit(X, y_idx)
        self.temperature_ = np.asarray([self._fit_temperature(X, y_idx)], np.float32)
        return self

    def _fit_temperature(self, X: np.ndarray, y_idx: np.ndarray) -> float:
        """The softmax temperature over margins that minimises the training log-loss."""
        import torch

        z = torch.from_numpy(self._logits(X))
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

    def predict_proba(self, X) -> np.ndarray:
        return linear_proba(self._features(X), self.coef_, self.intercept_, self.temperature_)
