"""Head training speed: featcache's heads vs scikit-learn's LogisticRegression, one run, same features.

    python benchmarks/bench_heads.py [--cache /work/data/fmnist-cache] [--test-source /work/data/fmnist/test]

Trains on every labelled row outside the test source (Fashion-MNIST: the 60,000 train
images; 1280-d final features of the default backbone), times ``fit`` of our logreg
(C chosen on a validation split, included in the time), our MLP and scikit-learn's
``LogisticRegression`` (lbfgs, default settings, on the same standardised features), and
scores all three on the test rows. Imports and a tiny warm-up fit happen before timing.
Writes benchmarks/results/heads.json.
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import numpy as np
from record import RESULTS, save

from featcache.classify.bundle import library_versions
from featcache.classify.data import holdout_split, load_labelled, source_split
from featcache.classify.heads import LogRegHead, MLPHead
from featcache.runtime import available_cpus
from featcache.store.cache import FeatureCache


def _timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cache", default="/work/data/fmnist-cache")
    p.add_argument("--fingerprint")
    p.add_argument("--tap", default="final")
    p.add_argument("--test-source", default="/work/data/fmnist/test", help="folder of test images ('' = 20%% split)")
    p.add_argument("--skip-sklearn", action="store_true")
    p.add_argument("--out", default=str(RESULTS / "heads.json"))
    a = p.parse_args()

    data = load_labelled(FeatureCache(a.cache), a.fingerprint, a.tap)
    try:
        tr, te, info = source_split(data, a.test_source) if a.test_source else (*holdout_split(data.y, 0.2), {})
    except Exception as e:  # noqa: BLE001 - test rows not extracted yet: fall back, and say so
        tr, te = holdout_split(data.y, 0.2)
        info = {"fallback": f"20% stratified split ({e})"}
    Xtr, ytr, Xte, yte = data.X[tr], data.y[tr], data.X[te], data.y[te]
    print(f"train {Xtr.shape}, test {Xte.shape}, classes {len(set(ytr))}, cpus {available_cpus()}", flush=True)

    # Warm-up: first use of torch.optim imports torch._dynamo (seconds on a busy machine).
    w = np.random.default_rng(0).choice(len(tr), min(300, len(tr)), replace=False)
    LogRegHead(C=1.0, max_iter=2).fit(Xtr[w], ytr[w])
    MLPHead(max_epochs=1).fit(Xtr[w], ytr[w])

    rows = []
    head, secs = _timed(lambda: LogRegHead().fit(Xtr, ytr))
    rows.append({"model": "featcache logreg (torch L-BFGS, C by validation)", "fit_seconds": secs,
                 "test_accuracy": head.score(Xte, yte), "C": head.C_, "n_iter": head.n_iter_,
                 "validation": head.validation_})
    print(rows[-1], flush=True)
    head, secs = _timed(lambda: MLPHead().fit(Xtr, ytr))
    rows.append({"model": "featcache mlp (torch, early stopping)", "fit_seconds": secs,
                 "test_accuracy": head.score(Xte, yte), "epochs": head.n_epochs_, "best_epoch": head.best_epoch_})
    print(rows[-1], flush=True)
    if not a.skip_sklearn:
        from sklearn.linear_model import LogisticRegression
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler

        sk, secs = _timed(lambda: make_pipeline(StandardScaler(), LogisticRegression()).fit(Xtr, ytr))
        rows.append({"model": "scikit-learn StandardScaler + LogisticRegression() (lbfgs, C=1, max_iter=100)",
                     "fit_seconds": secs, "test_accuracy": float(sk.score(Xte, yte)),
                     "n_iter": int(sk[-1].n_iter_[0])})
        print(rows[-1], flush=True)
    doc = {"dataset": {"cache": a.cache, "fingerprint": data.fingerprint, "tap": a.tap, "train_rows": len(tr),
                       "test_rows": len(te), "dim": int(data.X.shape[1]), "classes": len(set(ytr)), **info},
           "machine": {"cpus_available": available_cpus(), "cpu_count": os.cpu_count(),
                       "load_average_at_end": os.getloadavg(), "processor": platform.processor() or platform.machine()},
           "versions": library_versions(), "results": rows,
           "note": "fit_seconds = wall time of fit() only; warm-up fits and imports before timing"}
    print(f"wrote {save(doc, a.out)}")


if __name__ == "__main__":
    main()
