"""The single writer of an extraction: the image table and each fingerprint's rows, through the ledger.

Whatever engine computed them, results arrive here (in any order) and are committed the same way:
new image rows first, then metadata changes, then each fingerprint's feature rows past its ledger
and one atomic ledger move per fingerprint. A killed job leaves at most image rows without
features, which the next run extracts. One run may extract several backbones (fingerprints) at
once: an image is registered once and gets a row in every fingerprint that lacks it.

Per run, the writer also keeps the identity rules:
- one row per content: the same bytes under several names are one image (its key is the smallest
  name), the others are counted as duplicates;
- one content per key: when a file's bytes change, the row of its old bytes gives the key up
  (key and path become "": an orphan, left out of reads);
- label conflicts: the same bytes under different labels are recorded (``conflict``: a JSON list),
  never silently resolved.
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from dataclasses import dataclass

import numpy as np

from ..store.cache import STATUS_FAILED, STATUS_OK, FeatureCache, FeatureGroup
from .sources import Item
from .stages import reason_bucket

MAX_LISTED = 1000  # failures and conflicts listed in a summary (all are counted)


@dataclass
class _Seen:
    """A content's occurrences in this run."""

    key: str
    path: str | os.PathLike
    label: str
    labels: set[str]
    keys: list[str]

    def conflict(self) -> str:
        labels = sorted(self.labels - {""})
        return json.dumps(labels) if len(labels) > 1 else ""


class _Rows:
    """Feature rows computed but not committed yet: a contiguous run starting at ``start``, in
    buffers allocated once (NaN where a row failed), so a commit copies no row twice."""

    def __init__(self, start: int, capacity: int, taps: dict[str, int]):
        self.start = start
        self.image: list[int] = []
        self.status: list[int] = []
        self.error: list[str] = []
        self.taps = {tap: np.full((capacity, dim), np.nan, np.float32) for tap, dim in taps.items()}

    def __len__(self) -> int:
        return len(self.image)

    def reset(self, start: int) -> None:
        self.start = start
        self.image, self.status, self.error = [], [], []
        for buf in self.taps.values():
            buf.fill(np.nan)


class CacheWriter:
    """Registers contents and appends each fingerprint's feature rows; ``summary()`` counts the run."""

    def __init__(self, cache: FeatureCache, groups: dict[str, FeatureGroup], commit_every: int = 512):
        self.cache, self.groups, self.commit_every = cache, groups, max(1, commit_every)
        table = cache.images()
        self.committed_images = len(table)
        self.sha = table.sha256.tolist()
        self.cols = {"key": table.key.tolist(), "path": list(table.path), "label": table.label.tolist(),
                     "conflict": table.conflict.tolist()}
        self.row_of = {s: i for i, s in enumerate(self.sha)}
        self.key_row = {k: i for i, k in enumerate(self.cols["key"]) if k}
        self.in_group = {fp: set(g.image_rows().tolist()) for fp, g in groups.items()}
        self.seen: dict[int, _Seen] = {}
        self.dirty: set[int] = set()
        self.rows = {fp: _Rows(g.rows, self.commit_every, g.taps) for fp, g in groups.items()}
        self.timings: Counter = Counter()
        self.counts: Counter = Counter()
        self.failures: list[dict] = []
        self.reasons: Counter = Counter()
        self._updates: set[int] = set()  # committed image rows whose metadata changed

    # -- contents -----------------------------------------------------------------
    def needs(self, row: int) -> frozenset[str]:
        """The fingerprints that have no row for image ``row`` yet: the model work it needs."""
        return frozenset(fp for fp, rows in self.in_group.items() if row not in rows)

    def known_digests(self, fingerprint: str) -> list[bytes]:
        """Raw sha256 digests of the contents ``fingerprint`` holds (what an engine can skip)."""
        return [bytes.fromhex(self.sha[r]) for r in self.in_group[fingerprint]]

    def register(self, item: Item, sha256: str) -> tuple[str, int]:
        """("new" | "known" | "duplicate", image row) for a file that was read."""
        self.counts["files"] += 1
        row = self.row_of.get(sha256)
        if row is not None and row in self.seen:
            s = self.seen[row]
            s.labels.add(item.label)
            s.keys.append(item.key)
            if item.key < s.key:  # the smallest name stands for the content, whatever the arrival order
                s.key, s.path, s.label = item.key, item.path, item.label
            self.dirty.add(row)
            self.counts["duplicate_files"] += 1
            return "duplicate", row
        if row is None:
            row = len(self.sha)
            self.sha.append(sha256)
            for col in self.cols.values():
                col.append("")
            self.row_of[sha256] = row
        self.seen[row] = _Seen(item.key, item.path, item.label, {item.label}, [item.key])
        self.dirty.add(row)
        self.counts["unique_images"] += 1
        if not self.needs(row):
            self.counts["already_cached"] += 1
            return "known", row
        return "new", row

    def unreadable(self, key: str, reason: str) -> None:
        """A listed entry with no content to identify (unreadable, special file, too large)."""
        self.counts["files"] += 1
        self._fail(key, reason)

    def _fail(self, key: str, reason: str) -> None:
        self.counts["failed"] += 1
        self.reasons[reason_bucket(reason)] += 1
        if len(self.failures) < MAX_LISTED:
            self.failures.append({"key": key, "error": reason})

    # -- feature rows -------------------------------------------------------------
    def add(self, row: int, result: dict[str, dict[str, np.ndarray]] | str) -> None:
        """New feature rows for image ``row`` in every fingerprint that lacks it: {fingerprint: {tap:
        vector}}, or the reason the image failed (a failed row in each of them)."""
        failed = isinstance(result, str)
        for fp in self.needs(row):
            buf = self.rows[fp]
            if not failed:
                for tap, vectors in buf.taps.items():
                    vectors[len(buf)] = result[fp][tap]
            buf.image.append(row)
            buf.status.append(STATUS_FAILED if failed else STATUS_OK)
            buf.error.append(result if failed else "")
            self.in_group[fp].add(row)
        self.counts["extracted"] += 1
        if failed:
            self._fail(self.seen[row].key if row in self.seen else self.cols["key"][row], result)
        if max(len(b) for b in self.rows.values()) >= self.commit_every:
            self.commit()

    def commit(self) -> None:
        """Make everything added so far durable and visible (image rows, metadata, then the ledger)."""
        t = time.perf_counter()
        self._flush_images()
        for fp, buf in self.rows.items():
            if not len(buf):
                continue
            group, end = self.groups[fp], buf.start + len(buf)
            group.write_rows(buf.start, np.asarray(buf.image, np.int64), np.asarray(buf.status, np.int8), buf.error)
            for tap, vectors in buf.taps.items():
                group.write_tap(tap, buf.start, vectors[: len(buf)])
            group.commit(end, dict.fromkeys(buf.taps, end))
            buf.reset(end)
        self.timings["write"] += time.perf_counter() - t

    def _flush_images(self) -> None:
        dirty = sorted(self.dirty)
        for row in dirty:  # keys that move away are released first, so contents can swap names
            old = self.cols["key"][row]
            if old and old != self.seen[row].key and self.key_row.get(old) == row:
                del self.key_row[old]
        for row in dirty:
            s = self.seen[row]
            holder = self.key_row.get(s.key)
            if holder is not None and holder != row:  # the key's file now holds other bytes
                self._set(holder, key="", path="")
                self.counts["orphaned"] += 1
            self.key_row[s.key] = row
            self._set(row, key=s.key, path=os.fspath(s.path), label=s.label, conflict=s.conflict())
        self.dirty.clear()
        new = range(self.committed_images, len(self.sha))
        if len(new):
            self.cache.append_images([self.sha[r] for r in new], *([self.cols[c][r] for r in new]
                                                                     for c in ("key", "path", "label", "conflict")))
            self.committed_images = len(self.sha)
        if self._updates:
            rows = np.asarray(sorted(self._updates), np.int64)
            self.cache.update_images(rows, **{c: [self.cols[c][r] for r in rows] for c in self.cols})
            self._updates.clear()

    def _set(self, row: int, **values: str) -> None:
        for name, value in values.items():
            if self.cols[name][row] != value:
                self.cols[name][row] = value
                if row < self.committed_images:  # rows not appended yet are written whole
                    self._updates.add(row)

    # -- summary ------------------------------------------------------------------
    def conflicts(self) -> list[dict]:
        out = [{"sha256": self.sha[r], "keys": sorted(s.keys), "labels": json.loads(s.conflict())}
               for r, s in self.seen.items() if s.conflict()]
        return sorted(out, key=lambda c: c["keys"][0])

    def summary(self) -> dict:
        c = self.counts
        conflicts = self.conflicts()
        return {"files": c["files"], "unique_images": c["unique_images"], "duplicate_files": c["duplicate_files"],
                "already_cached": c["already_cached"], "extracted": c["extracted"], "failed": c["failed"],
                "failure_reasons": dict(self.reasons), "failures": self.failures,
                "label_conflicts": len(conflicts), "conflicts": conflicts[:MAX_LISTED],
                "orphaned": c["orphaned"]}


class TapCatchUp:
    """Fills taps that were added to a fingerprint later, for its existing rows, in row order.

    A row whose image can no longer be computed (file gone, its bytes changed, a per-run limit)
    keeps NaN in the new taps and stays as it was: history is never rewritten.
    """

    def __init__(self, group: FeatureGroup, commit_every: int = 512):
        self.group, self.commit_every = group, max(1, commit_every)
        self.start = min(group.tap_rows.values())
        self.next = self.start
        self.vecs: dict[str, list[np.ndarray]] = {t: [] for t in group.taps}
        self.missing: Counter = Counter()
        self.timings: Counter = Counter()

    def add(self, feature_row: int, result: dict[str, np.ndarray] | str | None) -> None:
        """Taps for ``feature_row`` (the next one): vectors, a reason they are missing, or None (failed row)."""
        assert feature_row == self.next, "catch-up rows must arrive in order"
        for tap, dim in self.group.taps.items():
            ok = isinstance(result, dict)
            self.vecs[tap].append(result[tap] if ok else np.full(dim, np.nan, np.float32))
        if isinstance(result, str):
            self.missing[reason_bucket(result)] += 1
        self.next += 1
        if self.next - self.start >= self.commit_every:
            self.commit()

    def commit(self) -> None:
        t = time.perf_counter()
        end = self.next
        moved = {}
        for tap, vecs in self.vecs.items():
            first = max(self.start, self.group.tap_rows[tap])
            if vecs and first < end:
                self.group.write_tap(tap, first, np.stack(vecs)[first - self.start :])
                moved[tap] = end
        if moved:
            self.group.commit(self.group.rows, moved)
        self.start = end
        self.vecs = {t: [] for t in self.group.taps}
        self.timings["write"] += time.perf_counter() - t
