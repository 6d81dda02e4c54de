"""Every registered head is a scikit-learn classifier: the estimator checks, labels that keep their type.

The checks run on scikit-learn's own small synthetic data sets, with small parameters
(``FAST``) so the whole module takes seconds. A head added to ``featcache/classify/heads/``
is checked here with its defaults unless it is given an entry.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from sklearn.datasets import make_blobs
from sklearn.model_selection import cross_val_score
from sklearn.utils.estimator_checks import parametrize_with_checks

from featcache.classify.bundle import load_bundle, save_bundle
from featcache.classify.heads import HEAD_KINDS, Head, HeadInputError, KNNHead, head_types, make_head
from featcache.classify.heads.base import REGISTRY
from featcache.cli import main
from featcache.errors import UsageError

FAST = {
    "logreg": {"Cs": (0.1, 1.0), "path_iter": 5, "threads": 1},
    "linear-svm": {"Cs": (0.1, 1.0), "path_iter": 5, "threads": 1},
    "knn": {"n_neighbors": 3, "threads": 1},
    "ensemble": {"member_params": {"Cs": (0.1, 1.0), "path_iter": 5}, "threads": 1},
    "mlp": {"hidden": 32, "lr": 0.05, "batch_size": 32, "max_epochs": 20, "patience": 5, "max_seconds": None,
            "threads": 1},
}
# Checks a head deliberately fails, by kind: {check name: reason}. None today; a new entry needs a reason.
EXPECTED_FAILED: dict[str, dict[str, str]] = {}


def fast_head(kind: str) -> Head:
    return make_head(kind, **FAST.get(kind, {}))


@parametrize_with_checks([fast_head(kind) for kind in head_types()],
                         expected_failed_checks=lambda head: EXPECTED_FAILED.get(head.kind, {}))
def test_sklearn_estimator_checks(estimator, check):
    check(estimator)


@pytest.fixture(scope="module")
def blobs():
    X, y = make_blobs(n_samples=90, centers=3, n_features=8, random_state=0)
    return X.astype(np.float32), y


@pytest.mark.parametrize("kind", list(head_types()))
def test_labels_keep_their_type(kind, blobs):
    X, y = blobs
    for labels in (y + 10, np.array(["cat", "dog", "eel"])[y], y + 1.0):
        head = fast_head(kind).fit(X, labels)
        pred = head.predict(X)
        assert pred.dtype.kind == labels.dtype.kind and head.classes_.dtype.kind == labels.dtype.kind, kind
        assert set(pred.tolist()) <= set(labels.tolist()) and head.score(X, labels) > 0.9, kind
    scores = cross_val_score(fast_head(kind), X, y + 10, cv=3)
    assert not np.isnan(scores).any() and scores.min() > 0.9, (kind, scores)


@pytest.mark.parametrize("labels", [[3, 1, 2], ["b", "a", "c"], [3.0, 1.0, 2.0]])
def test_bundle_keeps_label_type_without_pickle(labels, blobs, tmp_path):
    X, y = blobs
    y = np.asarray(labels)[y]
    head = KNNHead(n_neighbors=3, threads=1).fit(X, y)
    save_bundle(tmp_path, head, fingerprint="f" * 20, canon={}, backbone={}, tap="final")
    assert json.loads((tmp_path / "manifest.json").read_text())["labels"] == sorted(labels)
    loaded = load_bundle(tmp_path)
    assert loaded.labels == sorted(labels)
    assert np.array_equal(loaded.head.predict(X), head.predict(X)) and loaded.head.predict(X).dtype == y.dtype


def test_bad_input_is_a_one_line_usage_error_and_a_value_error(blobs):
    X, y = blobs
    bad = X.copy()
    bad[3, 2] = np.nan
    for kind in head_types():
        with pytest.raises(HeadInputError, match="NaN or inf") as e:
            fast_head(kind).fit(bad, y)
        assert isinstance(e.value, UsageError) and isinstance(e.value, ValueError)
        with pytest.raises(HeadInputError, match="1 class"):
            fast_head(kind).fit(X, np.zeros(len(X)))
    with pytest.raises(HeadInputError) as e:
        fast_head("logreg").fit(X[:5], y[:4])
    assert "\n" not in str(e.value) and "inconsistent numbers of samples" in str(e.value)
    with pytest.raises(UsageError, match="no parameter hiden"):
        make_head("mlp", hiden=3)
    with pytest.raises(UsageError, match="unknown head 'lda'"):
        make_head("lda")


class _ToyCentroidHead(Head):
    """A nearest-centroid head: the whole of what a new head kind needs."""

    kind = "toy-centroid"
    state_names = ("centroids_",)

    def __init__(self, shrink: float = 0.0):
        self.shrink = shrink

    def fit(self, X, y):
        X, y_idx = self._fit_inputs(X, y)
        self.centroids_ = np.stack([X[y_idx == c].mean(0) for c in range(len(self.classes_))]) * (1 - self.shrink)
        return self

    def predict_proba(self, X):
        d = -((self._features(X)[:, None, :] - self.centroids_[None]) ** 2).sum(-1)
        p = np.exp(d - d.max(1, keepdims=True))
        return p / p.sum(1, keepdims=True)


def test_a_new_head_kind_is_trained_saved_and_loaded_with_no_other_edit(tux_cache, tmp_path, capsys):
    """A Head subclass with a ``kind`` is a CLI choice, gets no ``random_state`` (it takes none), and bundles."""
    try:
        assert "toy-centroid" in HEAD_KINDS and head_types()["toy-centroid"] is _ToyCentroidHead
        rc = main(["train", "--cache", str(tux_cache), "--head", "toy-centroid", "logreg", "--seed", "3",
                   "--param", "toy-centroid.shrink=0.0", "--out", str(tmp_path / "head"), "--json"])
        out = json.loads(capsys.readouterr().out)
        assert rc == 0 and [r["head"] for r in out["results"]] == ["toy-centroid", "logreg"]
        toy, logreg = out["results"]
        assert toy["params"] == {"shrink": 0.0} and logreg["params"]["random_state"] == 3 and "C" in logreg
        assert toy["accuracy"] > 0.5
        bundle = load_bundle(tmp_path / "head")
        assert type(bundle.head) is head_types()[bundle.manifest["head"]["type"]]
    finally:
        REGISTRY.pop("toy-centroid", None)
    assert "toy-centroid" not in HEAD_KINDS


def test_cli_parser_lists_heads_without_importing_torch():
    code = ("import sys; from featcache.cli import build_parser; p = build_parser(); "
            "assert 'torch' not in sys.modules and 'sklearn' not in sys.modules, 'heavy import'; "
            "assert p.parse_args(['train', '--head', 'knn', 'mlp']).head_types == ['knn', 'mlp']")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
