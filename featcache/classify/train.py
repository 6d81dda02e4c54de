"""``featcache train``: fit heads on cached features, evaluate them, save the best as a bundle.

Evaluation is one of: stratified K-fold (``cv``; the saved head is then refitted on all
labelled rows), a stratified hold-out fraction (``test_split``), or the rows whose images
are in a folder/CSV (``test_source``). Several heads and taps may be trained in one run;
the best by accuracy (then macro-F1) is saved and all appear in the comparison.

Several fingerprints (``fingerprint`` as a list) train an ensemble: the
rows are the images labelled in every fingerprint (aligned by sha256), each head kind is
trained on every backbone alone and as the members of one ``EnsembleHead`` on the
backbones' vectors side by side, all on the same split; the best ensemble is saved.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from ..errors import UsageError
from ..store.cache import FeatureCache
from ..store.outputs import writable_dir
from .bundle import Member, ensemble_fields, joined_fingerprint, save_bundle
from .data import Labelled, align, concatenated, holdout_split, kfold, load_aligned, load_labelled, source_split
from .heads import Head, make_head
from .metrics import evaluate


@dataclass
class TrainConfig:
    cache: str
    out: str | None
    fingerprint: str | list[str] | None = None  # several: an ensemble over those backbones
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
    """Test-set predictions of one (tap, head, backbone): what the report draws."""

    tap: str
    head: str
    y_true: np.ndarray
    proba: np.ndarray
    classes: np.ndarray
    sha256: np.ndarray
    keys: np.ndarray
    metrics: dict
    name: str = ""  # the result's ``name`` (unique in one run)


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


def _evaluate_one(cfg: TrainConfig, data: Labelled, kind: str, split, params: dict | None = None,
                  name: str = "") -> tuple[Head, Evaluation, dict]:
    params = _params(cfg, kind) if params is None else params
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
    name = name or f"{data.tap} / {kind}"
    summary = {"name": name, "tap": data.tap, "head": kind, "params": head.get_params(), "train_seconds": secs,
               "train_rows": int(len(data) if cfg.cv else len(split[0])), "dim": int(data.X.shape[1]),
               "accuracy": metrics["accuracy"], "macro_f1": metrics["macro_f1"], "ece": metrics["ece"], **extra}
    for key, value in _fitted_scalars(head).items():
        summary.setdefault(key, value)
    ev = Evaluation(data.tap, kind, y_true, proba, classes, data.sha256[test_idx], data.keys[test_idx], metrics,
                    name)
    return head, ev, summary


def _fingerprints(cache: FeatureCache, cfg: TrainConfig) -> list[str]:
    """The fingerprints to train on: ``cfg.fingerprint`` (one or several prefixes), or the cache's only one."""
    given = [cfg.fingerprint] if isinstance(cfg.fingerprint, str) else list(cfg.fingerprint or [])
    return list(dict.fromkeys(cache.resolve_fingerprint(f) for f in given or [None]))


def _ensemble_params(cfg: TrainConfig, kind: str, widths: list[int]) -> dict:
    """The ensemble's parameters: ``--param ensemble.*``, members of ``kind`` with ``--param KIND.*``."""
    params = _params(cfg, "ensemble")
    params.update(blocks=tuple(widths), member=kind, member_params=dict(cfg.params.get(kind, {})))
    return params


def _ensemble_report(head: Head, summary: dict, names: list[str], singles: dict[str, dict]) -> dict:
    """An ensemble's row extras: its weights per backbone, and the single backbones' accuracy on the same split."""
    best = max(singles.values(), key=lambda r: (r["accuracy"], r["macro_f1"]))
    return {"weights": dict(zip(names, np.round(head.weights_, 4).tolist())), "choice": head.choice_,
            "validation": head.validation_,
            "singles": {n: round(r["accuracy"], 6) for n, r in singles.items()},
            "best_single": {"backbone": best["backbone"], "accuracy": best["accuracy"]},
            "gain_over_best_single": summary["accuracy"] - best["accuracy"]}


def train(cfg: TrainConfig) -> tuple[dict, list[Evaluation]]:
    """Train every (tap, head) pair; save the best as a bundle at ``cfg.out``; return summary + evaluations.

    Over several fingerprints every head kind is trained on each backbone alone and as the
    members of an ``EnsembleHead`` on the same rows and split; the best ensemble is saved.
    """
    modes = sum(x is not None for x in (cfg.cv, cfg.test_split, cfg.test_source))
    if modes > 1:
        raise UsageError("use one of --cv, --test-split, --test-source")
    if modes == 0:
        cfg.test_split = 0.2
    kinds = list(dict.fromkeys(cfg.heads))
    if "ensemble" in kinds:
        raise UsageError("the ensemble head is built from several backbones: give --fingerprint FP1 FP2 ..., "
                         "and name the members' head kind with --head (default logreg)")
    if cfg.out:
        writable_dir(cfg.out)  # before the training time is spent
    cache = FeatureCache(cfg.cache)
    taps = list(dict.fromkeys(cfg.taps))
    fps = _fingerprints(cache, cfg)
    attrs = {fp: cache.group_attrs(fp) for fp in fps}
    names = [attrs[fp]["backbone"].get("name") for fp in fps]
    parts, aligned = load_aligned(cache, fps, taps[0], cfg.label_conflicts)
    datasets = {taps[0]: parts}
    for tap in taps[1:]:
        datasets[tap] = [align(p, load_labelled(cache, fp, tap, "keep")) for fp, p in zip(fps, parts)]
    base = parts[0]
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

    ensemble = len(fps) > 1
    results, evals, best = [], [], None
    for tap in taps:
        for kind in kinds:
            singles = {}
            for name, fp, data in zip(names, fps, datasets[tap]):
                head, ev, summary = _evaluate_one(cfg, data, kind, split,
                                                  name=f"{tap} / {kind} / {name}" if ensemble else "")
                summary.update(backbone=name, fingerprint=fp)
                singles[name] = summary
                results.append(summary)
                evals.append(ev)
                if not ensemble and (best is None or _better(summary, best[2])):
                    best = (head, ev, summary)
            if ensemble:
                data = concatenated(datasets[tap])
                params = _ensemble_params(cfg, kind, [p.X.shape[1] for p in datasets[tap]])
                head, ev, summary = _evaluate_one(cfg, data, "ensemble", split, params,
                                                  name=f"{tap} / ensemble({kind}) / {len(fps)} backbones")
                summary.update(backbone=joined_fingerprint(names), fingerprint=data.fingerprint, member=kind)
                summary.update(_ensemble_report(head, summary, names, singles))
                results.append(summary)
                evals.append(ev)
                if best is None or _better(summary, best[2]):
                    best = (head, ev, summary)
    head, ev, summary = best
    out = {
        "cache": str(cache.root), "fingerprint": summary["fingerprint"], "backbone": summary["backbone"],
        "labelled_rows": len(base), "classes": len(np.unique(base.y)), "evaluation": split_info,
        "label_conflicts": {"images": base.conflicts, "policy": cfg.label_conflicts},
        "results": results, "best": {"name": summary["name"], "tap": summary["tap"], "head": summary["head"]},
        "metrics": ev.metrics, "train_seconds": summary["train_seconds"], "out": cfg.out,
    }
    if ensemble:
        out["members"] = [{"fingerprint": fp, "backbone": n, "dim": int(p.X.shape[1]),
                           "dropped_rows": aligned["dropped"][fp]} for fp, n, p in zip(fps, names, parts)]
        out["best"]["member"] = summary["member"]
    if cfg.out:
        metrics = {k: ev.metrics[k] for k in ("accuracy", "macro_f1", "log_loss", "ece", "n")}
        metrics.update({"evaluation": split_info, "train_seconds": summary["train_seconds"]})
        if "cv_accuracy_mean" in summary:
            metrics["cv_accuracy_mean"] = summary["cv_accuracy_mean"]
        comparison = [{k: r[k] for k in ("name", "tap", "head", "backbone", "accuracy", "macro_f1", "train_seconds")}
                      for r in results]
        fp = summary["fingerprint"]
        if ensemble:
            members = [Member(f, attrs[f]["fingerprint"], attrs[f]["backbone"], summary["tap"], int(p.X.shape[1]))
                       for f, p in zip(fps, parts)]
            fields = ensemble_fields(members)
        else:
            members, fields = None, {"fingerprint": fp, "canon": attrs[fp]["fingerprint"],
                                     "backbone": attrs[fp]["backbone"], "tap": summary["tap"]}
        save_bundle(cfg.out, head, **fields, metrics=metrics, cache=cfg.cache, members=members,
                    extra={"comparison": comparison})
    return out, evals


def _better(a: dict, b: dict) -> bool:
    return (a["accuracy"], a["macro_f1"]) > (b["accuracy"], b["macro_f1"])
