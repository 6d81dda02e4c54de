"""Evaluation figures from true labels and predicted probabilities."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import confusion_matrix, f1_score, log_loss, precision_recall_fscore_support


def reliability(confidence: np.ndarray, correct: np.ndarray, bins: int = 10) -> tuple[list[dict], float]:
    """Reliability-diagram bins (mean confidence vs accuracy) and the expected calibration error."""
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1]), 0, bins - 1)
    out, ece = [], 0.0
    for b in range(bins):
        m = which == b
        n = int(m.sum())
        conf = float(confidence[m].mean()) if n else None
        acc = float(correct[m].mean()) if n else None
        if n:
            ece += n / len(confidence) * abs(acc - conf)
        out.append({"lo": float(edges[b]), "hi": float(edges[b + 1]), "count": n, "confidence": conf, "accuracy": acc})
    return out, float(ece)


def evaluate(y_true: np.ndarray, proba: np.ndarray, classes: np.ndarray) -> dict:
    """Accuracy, macro-F1, per-class precision/recall/F1, confusion matrix, log-loss, calibration."""
    classes = np.asarray(classes)
    pred_idx = proba.argmax(axis=1)
    y_pred = classes[pred_idx]
    labels = list(classes)
    p, r, f, s = precision_recall_fscore_support(y_true, y_pred, labels=labels, zero_division=0)
    conf = proba[np.arange(len(proba)), pred_idx]
    correct = y_pred == y_true
    bins, ece = reliability(conf, correct)
    known = np.isin(y_true, classes)
    ll = float(log_loss(y_true[known], np.clip(proba[known], 1e-7, 1), labels=labels)) if known.all() else None
    return {
        "n": int(len(y_true)),
        "accuracy": float(correct.mean()),
        "macro_f1": float(f1_score(y_true, y_pred, labels=labels, average="macro", zero_division=0)),
        "log_loss": ll,
        "ece": ece,
        "per_class": {c: {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]), "support": int(s[i])}
                      for i, c in enumerate(labels)},
        "labels": labels,
        "confusion": confusion_matrix(y_true, y_pred, labels=labels).tolist(),
        "reliability": bins,
    }
