"""Labelled features out of the cache, and the train/test splits heads are evaluated on."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import NotFoundError, UsageError
from ..hashing import sha256_file
from ..store.cache import FeatureCache, rows_of
from .splits import stratified_holdout


@dataclass
class Labelled:
    """Labelled rows of one fingerprint and tap."""

    fingerprint: str
    tap: str
    X: np.ndarray  # (n, d) float32
    y: np.ndarray  # (n,) unicode labels
    sha256: np.ndarray  # (n,) unicode
    keys: np.ndarray  # (n,) unicode
    conflicts: int = 0  # rows left out (or kept, see ``load_labelled``) whose bytes carry several labels

    def __len__(self) -> int:
        return len(self.y)

    def subset(self, idx: np.ndarray) -> Labelled:
        return Labelled(self.fingerprint, self.tap, self.X[idx], self.y[idx], self.sha256[idx], self.keys[idx],
                        self.conflicts)


CONFLICT_POLICIES = ("drop", "keep")


def load_labelled(cache: FeatureCache, fingerprint: str | None = None, tap: str = "final",
                  conflicts: str = "drop") -> Labelled:
    """The labelled, successfully decoded rows of ``tap`` (unlabelled rows are left out).

    Images whose very bytes were found under several labels (``featcache extract`` reports them)
    are left out with ``conflicts="drop"``, or kept under the label extract stored with ``"keep"``.
    """
    if conflicts not in CONFLICT_POLICIES:
        raise UsageError(f"--label-conflicts must be one of {CONFLICT_POLICIES}, got {conflicts!r}")
    f = cache.read(fingerprint, tap)
    y = f.labels
    keep = y != ""
    conflicted = keep & (f.conflicts != "")
    if conflicts == "drop":
        keep &= ~conflicted
    if keep.sum() == 0:
        raise UsageError(f"cache {cache.root} has no labelled rows for {f.fingerprint}/{tap}; "
                         "extract a folder with class subfolders or a CSV with a label column")
    vectors = f.vectors if keep.all() else f.vectors[keep]  # no copy of a possibly huge tap when all are labelled
    return Labelled(f.fingerprint, tap, vectors, y[keep], f.sha256[keep], f.keys[keep], int(conflicted.sum()))


def align(a: Labelled, b: Labelled) -> Labelled:
    """``b`` restricted and reordered to ``a``'s rows (taps can lag behind while extracting)."""
    idx = rows_of(b.sha256, a.sha256)
    if (idx < 0).any():
        raise UsageError(f"tap {b.tap} lacks {(idx < 0).sum()} rows that tap {a.tap} has (extraction still running?)")
    return b.subset(idx)


def load_aligned(cache: FeatureCache, fingerprints: list[str], tap: str = "final",
                 conflicts: str = "drop") -> tuple[list[Labelled], dict]:
    """Each fingerprint's labelled rows of ``tap``, restricted to the images every one holds, in one order.

    An ensemble needs every member's vector of an image: images one backbone lacks (not yet
    extracted, or failed to decode there) are dropped; ``info["dropped"]`` counts them per fingerprint.
    """
    parts = [load_labelled(cache, fp, tap, conflicts) for fp in fingerprints]
    common = set(parts[0].sha256.tolist()).intersection(*(p.sha256.tolist() for p in parts[1:]))
    order = parts[0].sha256[np.isin(parts[0].sha256, list(common))]
    if not len(order):
        raise UsageError(f"no labelled image of cache {cache.root} has tap {tap} in every one of "
                         f"{', '.join(fingerprints)}; extract the same images with each backbone")
    aligned = [p if np.array_equal(p.sha256, order) else p.subset(rows_of(p.sha256, order)) for p in parts]
    info = {"rows": len(order), "dropped": {p.fingerprint: len(p) - len(order) for p in parts}}
    return aligned, info


def concatenated(parts: list[Labelled]) -> Labelled:
    """Aligned members' rows side by side (an ensemble head's input); fingerprint ``A+B+...``."""
    first = parts[0]
    X = np.hstack([p.X for p in parts])
    return Labelled("+".join(p.fingerprint for p in parts), first.tap, X, first.y, first.sha256, first.keys,
                    first.conflicts)


def holdout_split(y: np.ndarray, fraction: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Stratified (train, test) indices."""
    if not 0 < fraction < 1:
        raise UsageError(f"--test-split must be between 0 and 1, got {fraction}")
    return stratified_holdout(y, fraction, seed)


def source_split(data: Labelled, source: str) -> tuple[np.ndarray, np.ndarray, dict]:
    """(train, test) indices: rows whose image content (sha256) or key is in SOURCE are the test set."""
    from ..extract.sources import list_source

    items = list_source(source, "none").items
    if not items:
        raise NotFoundError(f"--test-source {source} holds no images")
    hashes = set()
    for it in items:
        try:
            hashes.add(sha256_file(it.path))
        except OSError:
            continue
    keys = {it.key for it in items} | {Path(it.key).as_posix() for it in items}
    test = np.asarray([s in hashes or k in keys for s, k in zip(data.sha256, data.keys)])
    matched = int(test.sum())
    info = {"test_source": str(source), "source_images": len(items), "matched_rows": matched}
    if matched == 0:
        raise UsageError(f"none of the {len(items)} images in --test-source {source} are in the cache; "
                         f"extract them first: featcache extract {source} --cache CACHE")
    if matched == len(data):
        raise UsageError(f"every labelled row is in --test-source {source}; nothing left to train on")
    return np.flatnonzero(~test), np.flatnonzero(test), info


def kfold(y: np.ndarray, k: int, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """Stratified K-fold (train, test) index pairs."""
    from sklearn.model_selection import StratifiedKFold

    counts = np.unique(y, return_counts=True)[1]
    if k < 2 or counts.min() < k:
        raise UsageError(f"--cv {k} needs k >= 2 and at least k images per class (smallest class has {counts.min()})")
    return list(StratifiedKFold(k, shuffle=True, random_state=seed).split(np.zeros(len(y)), y))
