"""The served cache's images, as the page and the listing endpoints see them.

One snapshot taken at start-up: the rows of the served fingerprint that decoded and that a file
still holds (the rows ``FeatureCache.read`` returns), with their content hash, key, label and
path. Only metadata stays in memory (about 200 bytes an image); a cached vector is read from
the Zarr array when a request needs it (one chunk). An image grown into the cache after
start-up is served after a restart, as the index is.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import NotFoundError
from ..store.cache import STATUS_OK, FeatureCache


@dataclass(frozen=True)
class CachedImage:
    sha256: str
    key: str
    label: str | None  # None: unlabelled
    path: str


class Catalogue:
    """Served images by content hash and by label; keys sorted within each label, so pages are stable."""

    def __init__(self, cache: FeatureCache, fingerprint: str):
        self.cache = cache
        self.fingerprint = fingerprint
        group = cache.group["features"][fingerprint]  # the documented layout: features/<fp>/{image,status,taps}
        self._group = group
        self._tap_rows = {k: int(v) for k, v in dict(group.attrs)["tap_rows"].items()}
        rows = int(dict(group.attrs)["rows"])
        image = group["image"][:rows]
        status = group["status"][:rows]
        table = cache.images()
        ok = (status == STATUS_OK) & (table.key[image] != "") if rows else np.zeros(0, bool)
        self._feature_row = np.flatnonzero(ok)
        img = image[ok]
        keys, labels = table.key[img], table.label[img]
        order = np.lexsort((keys, labels))  # by label, then key
        self._feature_row = self._feature_row[order]
        self.sha256 = table.sha256[img][order]
        self.keys = keys[order]
        self.labels = labels[order]
        self.paths = np.asarray(table.path, dtype=object)[img][order] if rows else np.array([], dtype=object)
        self._pos = {s: i for i, s in enumerate(self.sha256.tolist())}
        names, starts, counts = np.unique(self.labels, return_index=True, return_counts=True)
        self._label_span = {str(n): (int(s), int(c)) for n, s, c in zip(names, starts, counts, strict=True)}

    def __len__(self) -> int:
        return len(self.sha256)

    def __contains__(self, sha256: str) -> bool:
        return sha256 in self._pos

    def _at(self, i: int) -> CachedImage:
        label = str(self.labels[i])
        return CachedImage(str(self.sha256[i]), str(self.keys[i]), label or None, self.paths[i])

    def get(self, sha256: str) -> CachedImage:
        i = self._pos.get(sha256)
        if i is None:
            raise NotFoundError(f"no image with sha256 {sha256} in the served cache")
        return self._at(i)

    def label_of(self, sha256: str) -> str | None:
        i = self._pos.get(sha256)
        return (str(self.labels[i]) or None) if i is not None else None

    def label_counts(self) -> list[tuple[str, int]]:
        """(label, images) for every label, "" for unlabelled images, by label."""
        return [(name, count) for name, (_, count) in self._label_span.items()]

    def page(self, label: str | None, offset: int, limit: int) -> tuple[int, list[CachedImage]]:
        """(total, images) of one label ("" for unlabelled; None for all), sorted by label then key."""
        if label is None:
            start, total = 0, len(self)
        else:
            start, total = self._label_span.get(label, (0, 0))
        lo = start + min(offset, total)
        hi = start + min(offset + limit, total)
        return total, [self._at(i) for i in range(lo, hi)]

    def vector(self, sha256: str, tap: str) -> np.ndarray:
        """The cached vector of one image and tap, exactly as extracted (read from its Zarr chunk)."""
        i = self._pos.get(sha256)
        if i is None:
            raise NotFoundError(f"no image with sha256 {sha256} in the served cache")
        row = int(self._feature_row[i])
        if tap not in self._tap_rows or row >= self._tap_rows[tap]:
            raise NotFoundError(f"image {sha256} has no cached vector for tap {tap!r}")
        vec = np.asarray(self._group["taps"][tap][row], dtype=np.float32)
        if np.isnan(vec[0]):
            raise NotFoundError(f"image {sha256} has no cached vector for tap {tap!r} (it failed for that tap)")
        return vec
