"""Measuring strategies against each other: one shared split, per-row outcomes, intervals.

Every strategy ``advise`` (and ``probe``) compares is scored on the same rows: the folds of one
stratified K-fold (small data) or one stratified hold-out, built exactly as ``featcache train``
builds them, so ``train`` with the flags in ``SharedSplit.flags`` reproduces a head's figure.
Strategies are compared row by row (a paired bootstrap of the difference in correctness), which
separates two strategies far better than two independent intervals on a few hundred rows.
"""

from __future__ import annotations

import shlex
import time
from dataclasses import dataclass, field

import numpy as np

from ..errors import UsageError
from .data import Labelled, holdout_split, kfold, source_split
from .heads import make_head
from .splits import stratified_holdout

CV_BELOW = 2000  # rows below which the shared split is 5-fold CV (every row is tested once), else a 20 % hold-out
FOLDS = 5
TEST_FRACTION = 0.2
Z95 = 1.959964


class OutOfBudget(Exception):
    """A strategy cannot be measured in the time left (reported as skipped, with why)."""


@dataclass
class SharedSplit:
    """The (train, test) folds every strategy is scored on, and how ``featcache train`` rebuilds them."""

    folds: list[tuple[np.ndarray, np.ndarray]]
    mode: str  # "cv", "test-split" or "test-source"
    flags: str  # train's evaluation flags that rebuild these folds
    info: dict = field(default_factory=dict)

    @property
    def test_rows(self) -> np.ndarray:
        """Every tested row, in the order outcomes list them (fold after fold)."""
        return np.concatenate([te for _, te in self.folds])


def shared_split(data: Labelled, seed: int = 0, test_source: str | None = None) -> SharedSplit:
    """K-fold below ``CV_BELOW`` rows (when every class has K rows), else a stratified hold-out; or SOURCE's rows."""
    if test_source:
        tr, te, info = source_split(data, test_source)
        return SharedSplit([(tr, te)], "test-source", f"--test-source {shlex.quote(str(test_source))}", info)
    counts = np.unique(data.y, return_counts=True)[1]
    if len(counts) < 2:
        raise UsageError(f"need at least 2 labelled classes to compare strategies, found {len(counts)}")
    k = min(FOLDS, int(counts.min()))
    if len(data) < CV_BELOW and k >= 2:
        return SharedSplit(kfold(data.y, k, seed), "cv", f"--cv {k} --seed {seed}", {"folds": k})
    tr, te = holdout_split(data.y, TEST_FRACTION, seed)
    if len(te) == 0:
        raise UsageError("every class has a single labelled image: nothing can be held out to measure on")
    return SharedSplit([(tr, te)], "test-split", f"--test-split {TEST_FRACTION} --seed {seed}",
                       {"fraction": TEST_FRACTION})


@dataclass
class Outcome:
    """Which tested rows a strategy got right."""

    rows: np.ndarray  # row indices (into the labelled data), fold after fold
    correct: np.ndarray  # bool, one per row
    seconds: float
    train_rows: int  # training rows per fit (the largest fold's)
    details: dict = field(default_factory=dict)  # what else the strategy reports (a fine-tune's subset, cut, ...)
    steady_seconds: float | None = None  # the time without first-use costs (imports, warm-up): the cost model's input
    frozen: np.ndarray | None = None  # trained on fewer rows than the baseline (a budget subset): the frozen head's
    # correctness on the same rows when trained on the same subset, the fair comparison

    @property
    def accuracy(self) -> float:
        return float(self.correct.mean()) if len(self.correct) else float("nan")

    def on(self, rows: np.ndarray) -> np.ndarray:
        """Correctness on ``rows`` (each must be among this outcome's rows)."""
        pos = {int(r): i for i, r in enumerate(self.rows)}
        return self.correct[[pos[int(r)] for r in rows]]


def new_head(kind: str, seed: int):
    """A head as ``featcache train --head KIND --seed SEED`` makes it (the seed wherever the head takes one)."""
    head = make_head(kind)
    if "random_state" in head.get_params():
        head.set_params(random_state=seed)
    return head


def head_outcome(X: np.ndarray, y: np.ndarray, folds: list[tuple[np.ndarray, np.ndarray]], kind: str,
                 seed: int = 0) -> Outcome:
    """Fit a fresh head on each fold's training rows and score its test rows."""
    rows, correct, seconds = [], [], []
    for tr, te in folds:
        t = time.perf_counter()
        head = new_head(kind, seed).fit(X[tr], y[tr])
        rows.append(te)
        correct.append(head.predict(X[te]) == y[te])
        seconds.append(time.perf_counter() - t)
    return Outcome(np.concatenate(rows), np.concatenate(correct), sum(seconds), max(len(tr) for tr, _ in folds),
                   steady_seconds=min(seconds) * len(folds))


def fraction_folds(y: np.ndarray, folds: list[tuple[np.ndarray, np.ndarray]], fraction: float,
                   seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """The same folds with a stratified ``fraction`` of each training part (test rows unchanged)."""
    if fraction >= 1:
        return folds
    return [(tr[stratified_holdout(y[tr], 1 - fraction, seed)[0]], te) for tr, te in folds]


def wilson(correct: int, n: int) -> tuple[float, float]:
    """95 % Wilson interval of a proportion (sound at 0/n and n/n, unlike the normal approximation)."""
    if n == 0:
        return (0.0, 1.0)
    p = correct / n
    centre = (p + Z95**2 / (2 * n)) / (1 + Z95**2 / n)
    half = Z95 * np.sqrt(p * (1 - p) / n + Z95**2 / (4 * n * n)) / (1 + Z95**2 / n)
    return (float(max(0.0, centre - half)), float(min(1.0, centre + half)))


def paired_difference(a: np.ndarray, b: np.ndarray, seed: int = 0, resamples: int = 2000) -> dict:
    """Accuracy of ``a`` minus that of ``b`` on the same rows, with a 95 % paired bootstrap interval."""
    d = a.astype(np.float64) - b.astype(np.float64)
    if len(d) == 0:
        return {"difference": float("nan"), "interval": [float("nan"), float("nan")], "rows": 0}
    rng = np.random.default_rng(seed)
    means = np.empty(resamples)
    for s in range(0, resamples, 250):  # bounded memory on large test sets
        idx = rng.integers(0, len(d), (min(250, resamples - s), len(d)))
        means[s : s + len(idx)] = d[idx].mean(axis=1)
    lo, hi = np.quantile(means, [0.025, 0.975])
    return {"difference": float(d.mean()), "interval": [float(lo), float(hi)], "rows": int(len(d))}
