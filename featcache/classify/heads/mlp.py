"""A small torch MLP head: standardise, one hidden layer, dropout, early stopping, a seed."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import numpy as np

from ..schedule import warmup_cosine
from ..splits import stratified_holdout
from ..threads import set_threads
from .base import Head
from .numpy_predict import as_decision, float64_rows, softmax

if TYPE_CHECKING:  # torch is imported where the network is built: a module of heads to choose from needs none
    from torch import nn


class MLPHead(Head):
    """features -> Linear(hidden) -> GELU -> Dropout -> Linear(classes), AdamW, warm-up + cosine LR.

    A stratified ``val_fraction`` of the training data decides early stopping (``patience``
    epochs without a better validation loss); the best epoch's weights are kept. With
    ``max_seconds`` the cosine schedule is planned after the first epoch to end within
    that budget (large data); small data runs ``max_epochs``. Seeded: same data, same
    ``random_state`` and same epoch count give the same weights.
    """

    kind = "mlp"
    state_names = ("mean_", "scale_", "w1_", "b1_", "w2_", "b2_")
    derived = ("_module",)

    def __init__(self, hidden: int = 512, dropout: float = 0.3, lr: float = 1e-3, weight_decay: float = 1e-4,
                 batch_size: int = 512, max_epochs: int = 40, patience: int = 4, val_fraction: float = 0.1,
                 max_seconds: float | None = 40.0, random_state: int = 0, threads: int | None = None):
        self.hidden = hidden
        self.dropout = dropout
        self.lr = lr
        self.weight_decay = weight_decay
        self.batch_size = batch_size
        self.max_epochs = max_epochs
        self.patience = patience
        self.val_fraction = val_fraction
        self.max_seconds = max_seconds
        self.random_state = random_state
        self.threads = threads

    def _net(self, d: int, k: int) -> nn.Sequential:
        from torch import nn

        return nn.Sequential(nn.Linear(d, self.hidden), nn.GELU(), nn.Dropout(self.dropout), nn.Linear(self.hidden, k))

    def fit(self, X, y) -> MLPHead:
        import torch
        from torch import nn

        t0 = time.perf_counter()
        X, y_idx = self._fit_inputs(X, y)
        set_threads(self.threads, X.size)
        self.mean_ = X.mean(axis=0)
        scale = X.std(axis=0)
        scale[scale < 1e-6] = 1.0
        self.scale_ = scale
        Xs = torch.from_numpy((X - self.mean_) / self.scale_)
        yt = torch.from_numpy(y_idx)
        tr, va = stratified_holdout(y_idx, self.val_fraction, self.random_state)
        if len(va) == 0:  # no class has two rows: early stopping watches the training loss instead
            va = tr
        torch.manual_seed(self.random_state)
        gen = torch.Generator().manual_seed(self.random_state)
        net = self._net(X.shape[1], len(self.classes_))
        per_epoch = max(1, -(-len(tr) // self.batch_size))
        epochs = self.max_epochs  # may shrink after epoch 1 to fit max_seconds
        opt = torch.optim.AdamW(net.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        Xtr, ytr, Xva, yva = Xs[tr], yt[tr], Xs[va], yt[va]
        best, best_state, bad, step = float("inf"), None, 0, 0
        self.history_ = []
        for epoch in range(self.max_epochs):
            if epoch >= epochs:
                break
            net.train()
            perm = torch.randperm(len(tr), generator=gen)
            for i in range(0, len(tr), self.batch_size):
                # linear warm-up over the first epoch, then cosine decay to zero at the planned end
                for g in opt.param_groups:
                    g["lr"] = self.lr * warmup_cosine(step, per_epoch, epochs * per_epoch)
                j = perm[i : i + self.batch_size]
                opt.zero_grad(set_to_none=True)
                nn.functional.cross_entropy(net(Xtr[j]), ytr[j]).backward()
                opt.step()
                step += 1
            net.eval()
            with torch.no_grad():
                logits = net(Xva)
                loss = float(nn.functional.cross_entropy(logits, yva))
                acc = float((logits.argmax(1) == yva).float().mean())
            self.history_.append({"epoch": epoch + 1, "val_loss": round(loss, 5), "val_accuracy": round(acc, 5)})
            if loss < best - 1e-4:
                best, bad = loss, 0
                best_state = {k: v.detach().clone() for k, v in net.state_dict().items()}
            else:
                bad += 1
            if bad >= self.patience:
                break
            if epoch == 0 and self.max_seconds:  # plan the schedule to end inside the time budget
                spent = time.perf_counter() - t0
                epochs = max(2, min(self.max_epochs, int(self.max_seconds / max(spent, 1e-6))))
        if best_state is not None:  # None only if every validation loss was NaN (diverged): keep the last
            net.load_state_dict(best_state)
        self.n_epochs_ = len(self.history_)
        self.best_epoch_ = int(np.argmin([h["val_loss"] for h in self.history_])) + 1
        sd = net.state_dict()
        self.w1_, self.b1_ = sd["0.weight"].numpy(), sd["0.bias"].numpy()
        self.w2_, self.b2_ = sd["3.weight"].numpy(), sd["3.bias"].numpy()
        self._prepare()
        return self

    def _prepare(self) -> None:
        import torch

        net = self._net(self.w1_.shape[1], self.w2_.shape[0])
        net.load_state_dict({"0.weight": torch.from_numpy(self.w1_), "0.bias": torch.from_numpy(self.b1_),
                             "3.weight": torch.from_numpy(self.w2_), "3.bias": torch.from_numpy(self.b2_)})
        self._module = net.double().eval()

    def _logits(self, X: np.ndarray) -> np.ndarray:
        import torch

        def scores(rows: np.ndarray) -> np.ndarray:
            with torch.inference_mode():
                return self._module(torch.from_numpy(rows)).numpy()

        return float64_rows(scores, (X - self.mean_) / self.scale_)

    def decision_function(self, X) -> np.ndarray:
        """The network's class scores; for two classes one score, > 0 for ``classes_[1]``."""
        return as_decision(self._logits(self._features(X)))

    def predict_proba(self, X) -> np.ndarray:
        return softmax(self._logits(self._features(X)))
