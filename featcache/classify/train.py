"""``featcache train``: fit heads on cached features, evaluate them, save the best as a bundle.

Evaluation is one of: stratified K-fold (``cv``; the saved head is then refitted on all
labelled rows), a stratified hold-out fraction (``test_split``), or the rows whose images
are in a folder/CSV (``test_source``). Several heads and taps may be trained in one run;
the best by accuracy (then macro-F1) is saved and all appear in the comparison.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from ..errors import UsageError
from ..store.cache import FeatureCache
from ..store.outputs import writable_dir
from .bundle import save_bundle
from .data import Labelled, align, holdout_split, kfold, load_labelled, source_split
from .heads import Head, make_head
from .metrics import evaluate


@dataclass
class TrainConfig:
    cache: str
    out: str | None
    fingerprint: str | None = None
    taps: list[str] = field(default_factory=lambda: ["final"])
    heads: list[str] = field(default_factory=lambda: ["logreg"])
    cv: int | None = None
    test_split: float | None = None
    test_source: str | None = None
    seed: int = 0
    params: dict = field(default_factory=dict)  # per head kind: {kind: {param: value}}
    label_conflicts: str = "drop"  # images found under several labels: "drop" them or "keep" their stored label


@dataclass
class Evaluation:
    """Test-set predictions of one (tap, head): what the report draws."""

    tap: str
    head: str
    y_true: np.ndarray
    proba: np.ndarray
    classes: np.ndarray
    sha256: np.ndarray
    keys: np.ndarray
    metrics: dict


def _params(cfg: TrainConfig, kind: str) -> dict:
    """The user's parameters for ``kind``; a head that takes a seed gets ``--seed`` unless given one."""
    params = dict(cfg.params.get(kind, {}))
    if "random_state" in make_head(kind).get_params():
        params.setdefault("random_state", cfg.seed)
    return params


def _fitted_scalars(head: Head) -> dict:
    """What fitting chose (``C_``, ``n_epochs_``, ...): the head's scalar fitted attributes, without the ``_``."""
    return {k.rstrip("_"): v for k, v in vars(head).items()
            if k.endswith("_") and not k.startswith("_") and k != "n_features_in_" and isinstance(v, int | float)}


def _fit(kind: str, params: dict, X: np.ndarray, y: np.ndarray) -> tuple[Head, float]:
    head = make_head(kind, **params)
    t = time.perf_counter()
    head.fit(X, y)
    return head, time.perf_counter() - t


def _evaluate_one(cfg: TrainConfig, data: Labelled, kind: str, split) -> tuple[Head, Evaluation, dict]:
    params = _params(cfg, kind)
    if cfg.cv:
        proba = None
        fold_acc, fold_secs = [], []
        for tr, te in split:
            head, secs = _fit(kind, params, data.X[tr], data.y[tr])
            p = head.predict_proba(data.X[te])
            if proba is None:
                classes = head.classes_
                proba = np.zeros((len(data), len(classes)), np.float32)
            cols = np.searchsorted(classes, head.classes_)
            proba[np.ix_(te, cols)] = p
            fold_acc.append(float((head.classes_[p.argmax(1)] == data.y[te]).mean()))
            fold_secs.append(secs)
        head, secs = _fit(kind, params, data.X, data.y)  # the saved head sees every labelled row
        test_idx = np.arange(len(data))
        extra = {"cv_folds": cfg.cv, "fold_accuracy": fold_acc, "cv_accuracy_mean": float(np.mean(fold_acc)),
                 "cv_accuracy_std": float(np.std(fold_acc)), "fold_train_seconds": fold_secs}
    else:
        tr, test_idx = split
        head, secs = _fit(kind, params, data.X[tr], data.y[tr])
        classes = head.classes_
        t = time.perf_counter()
        proba = np.zeros((len(test_idx), len(classes)), np.float32)
        proba[:] = head.predict_proba(data.X[test_idx])
        extra = {"predict_seconds": time.perf_counter() - t}
    y_true = data.y[test_idx]
    metrics = evaluate(y_true, proba, classes)
    summary = {"tap": data.tap, "head": kind, "params": head.get_params(), "train_seconds": secs,
               "train_rows": int(len(data) if cfg.cv else len(split[0])), "dim": int(data.X.shape[1]),
               "accuracy": metrics["accuracy"], "macro_f1": metrics["macro_f1"], "ece": metrics["ece"], **extra}
    for name, value in _fitted_scalars(head).items():
        summary.setdefault(name, value)
    ev = Evaluation(data.tap, kind, y_true, proba, classes, data.sha256[test_idx], data.keys[test_idx], metrics)
    return head, ev, summary


def train(cfg: TrainConfig) -> tuple[dict, list[Evaluation]]:
    """Train every (tap, head) pair; save the best as a bundle at ``cfg.out``; return summary + evaluations."""
    modes = sum(x is not None for x in (cfg.cv, cfg.test_split, cfg.test_source))
    if modes > 1:
        raise UsageError("use one of --cv, --test-split, --test-source")
    if modes == 0:
        cfg.test_split = 0.2
    if cfg.out:
        writable_dir(cfg.out)  # before the training time is spent
    cache = FeatureCache(cfg.cache)
    fp = cache.resolve_fingerprint(cfg.fingerprint)
    attrs = cache.group_attrs(fp)
    taps = list(dict.fromkeys(cfg.taps))
    base = load_labelled(cache, fp, taps[0], cfg.label_conflicts)
    datasets = {taps[0]: base}
    for tap in taps[1:]:
        datasets[tap] = align(base, load_labelled(cache, fp, tap, "keep"))
    split_info: dict = {}
    if cfg.cv:
        split = kfold(base.y, cfg.cv, cfg.seed)
        split_info = {"mode": "cv", "folds": cfg.cv}
    elif cfg.test_source:
        tr, te, info = source_split(base, cfg.test_source)
        split, split_info = (tr, te), {"mode": "test-source", **info}
    else:
        split = holdout_split(base.y, cfg.test_split, cfg.seed)
        split_info = {"mode": "test-split", "fraction": cfg.test_split}
    if not cfg.cv:
        split_info.update({"train_rows": int(len(split[0])), "test_rows": int(len(split[1]))})
        missing = set(base.y[split[1]]) - set(base.y[split[0]])
        if missing:
            split_info["classes_only_in_test"] = sorted(missing)

    results, evals, best = [], [], None
    for tap in taps:
        for kind in dict.fromkeys(cfg.heads):
            head, ev, summary = _evaluate_one(cfg, datasets[tap], kind, split)
            results.append(summary)
            evals.append(ev)
            if best is None or (summary["accuracy"], summary["macro_f1"]) > (best[2]["accuracy"], best[2]["macro_f1"]):
                best = (head, ev, summary)
    head, ev, summary = best
    out = {
        "cache": str(cache.root), "fingerprint": fp, "backbone": attrs["backbone"].get("name"),
        "labelled_rows": len(base), "classes": len(np.unique(base.y)), "evaluation": split_info,
        "label_conflicts": {"images": base.conflicts, "policy": cfg.label_conflicts},
        "results": results, "best": {"tap": summary["tap"], "head": summary["head"]},
        "metrics": ev.metrics, "train_seconds": summary["train_seconds"], "out": cfg.out,
    }
    if cfg.out:
        metrics = {k: ev.metrics[k] for k in ("accuracy", "macro_f1", "log_loss", "ece", "n")}
        metrics.update({"evaluation": split_info, "train_seconds": summary["train_seconds"]})
        if "cv_accuracy_mean" in summary:
            metrics["cv_accuracy_mean"] = summary["cv_accuracy_mean"]
        save_bundle(cfg.out, head, fingerprint=fp, canon=attrs["fingerprint"], backbone=attrs["backbone"],
                    tap=summary["tap"], metrics=metrics, cache=cfg.cache,
                    extra={"comparison": [{k: r[k] for k in ("tap", "head", "accuracy", "macro_f1", "train_seconds")}
                                          for r in results]})
    return out, evals
