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
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..store.append import Batch, settle, writing
from ..store.cache import STATUS_FAILED, STATUS_OK, FeatureCache, FeatureGroup
from .sources import Item
from .stages import reason_bucket

MAX_LISTED = 1000  # failures and conflicts listed in a summary (all are counted)


@dataclass
class _Occurrences:
    """Every name and label a content was found under in this run, kept only once it has two or more."""

    labels: set[str]
    keys: list[str]

    def conflict(self) -> str:
        labels = sorted(self.labels - {""})
        return json.dumps(labels) if len(labels) > 1 else ""


class _Rows:
    """Feature rows computed but not committed yet: a contiguous run starting at ``start``, in
    buffers kept between commits (NaN where a row failed), so a commit copies no row twice."""

    def __init__(self, start: int, capacity: int, taps: dict[str, int]):
        self.start = start
        self.image: list[int] = []
        self.status: list[int] = []
        self.error: list[str] = []
        self.taps = {tap: np.empty((capacity, dim), np.float32) for tap, dim in taps.items()}

    def __len__(self) -> int:
        return len(self.image)

    def grow(self) -> None:
        """Twice the room (rows wait longer while a commit is being written)."""
        for tap, buf in self.taps.items():
            bigger = np.empty((2 * len(buf), buf.shape[1]), np.float32)
            bigger[: len(self)] = buf[: len(self)]
            self.taps[tap] = bigger

    def reset(self, start: int) -> None:
        self.start = start
        self.image, self.status, self.error = [], [], []


Result = dict[str, dict[str, np.ndarray]] | str  # {fingerprint: {tap: vector}}, or why the image failed


GROUP_COMMIT = 8  # rows may wait for up to this many times ``commit_every`` while a commit is being written
GROUP_COMMIT_BYTES = 64 << 20  # ... and no more than this much of vectors per fingerprint


class CacheWriter:
    """Registers contents and appends each fingerprint's feature rows; ``summary()`` counts the run.

    ``register_many`` / ``add_many`` take a whole batch of files or results at once (what the engines
    hand over); ``register`` / ``add`` are the same for one.

    Commits are written in the background while rows keep coming: one commit is written at a time,
    and ``commit_every`` rows start the next as soon as the one before is written. Rows that arrive
    faster than commits are written join the next commit (a group commit, up to ``GROUP_COMMIT`` times
    ``commit_every`` rows, then the writer waits): a saturated writer commits fewer, larger batches
    instead of falling behind. ``commit()`` returns once everything added is committed.
    """

    def __init__(self, cache: FeatureCache, groups: dict[str, FeatureGroup], commit_every: int = 512):
        self.cache, self.groups, self.commit_every = cache, groups, max(1, commit_every)
        row_bytes = max((4 * sum(g.taps.values()) for g in groups.values()), default=1) or 1
        self.most_waiting = max(self.commit_every, min(GROUP_COMMIT * self.commit_every, GROUP_COMMIT_BYTES // row_bytes))
        self.commits = 0
        table = cache.images()
        self.committed_images = len(table)
        self.sha = table.sha256.tolist()
        self.cols = {"key": table.key.tolist(), "path": list(table.path), "label": table.label.tolist(),
                     "conflict": table.conflict.tolist()}
        self.row_of = {s: i for i, s in enumerate(self.sha)}
        self.key_row = {k: i for i, k in enumerate(self.cols["key"]) if k}
        self.in_group = {fp: set(g.image_rows().tolist()) for fp, g in groups.items()}
        # content row -> (key, path, label) standing for it in this run: plain strings, which Python's cycle
        # collector stops tracking, so a run of millions of images does not slow every collection down
        self.seen: dict[int, tuple[str, str, str]] = {}
        self.more: dict[int, _Occurrences] = {}  # contents found under several names in this run
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

    def register(self, item: Item, sha256: str) -> tuple[str, int]:
        """("new" | "known" | "duplicate", image row) for a file that was read."""
        return self.register_many([item], [sha256])[0]

    def register_many(self, items: Sequence[Item], sha256s: Sequence[str]) -> list[tuple[str, int]]:
        """``register`` for each (item, sha256) of a batch, in order."""
        out: list[tuple[str, int]] = []
        row_of, seen, dirty, sha, cols = self.row_of, self.seen, self.dirty, self.sha, list(self.cols.values())
        groups = list(self.in_group.values())
        duplicates = known = 0
        for item, digest in zip(items, sha256s, strict=True):
            row = row_of.get(digest)
            if row is not None and row in seen:
                key, _, label = seen[row]
                more = self.more.get(row) or self.more.setdefault(row, _Occurrences({label}, [key]))
                more.labels.add(item.label)
                more.keys.append(item.key)
                if item.key < key:  # the smallest name stands for the content, whatever the arrival order
                    seen[row] = (item.key, os.fspath(item.path), item.label)
                dirty.add(row)
                duplicates += 1
                out.append(("duplicate", row))
                continue
            fresh = row is None
            if fresh:
                row = len(sha)
                sha.append(digest)
                for col in cols:
                    col.append("")
                row_of[digest] = row
            seen[row] = (item.key, os.fspath(item.path), item.label)
            dirty.add(row)
            if (fresh and groups) or any(row not in g for g in groups):
                out.append(("new", row))
            else:
                known += 1
                out.append(("known", row))
        c = self.counts
        c["files"] += len(out)
        c["duplicate_files"] += duplicates
        c["unique_images"] += len(out) - duplicates
        c["already_cached"] += known
        return out

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
    def add(self, row: int, result: Result) -> None:
        """New feature rows for image ``row`` in every fingerprint that lacks it: {fingerprint: {tap:
        vector}}, or the reason the image failed (a failed row in each of them)."""
        self.add_many([row], [result])

    def add_many(self, rows: Sequence[int], results: Sequence[Result]) -> None:
        """``add`` for each (row, result) of a batch, in order; commits once ``commit_every`` rows wait
        (later while a commit is still being written, up to ``most_waiting`` rows)."""
        targets = [(fp, self.rows[fp], self.in_group[fp]) for fp in self.groups]
        waiting = max(len(b) for b in self.rows.values()) if self.rows else 0
        for row, result in zip(rows, results, strict=True):
            failed = isinstance(result, str)
            for fp, buf, have in targets:
                if row in have:
                    continue
                n = len(buf.image)
                if buf.taps and n == len(next(iter(buf.taps.values()))):
                    buf.grow()
                for tap, buffer in buf.taps.items():
                    buffer[n] = np.nan if failed else result[fp][tap]
                buf.image.append(row)
                buf.status.append(STATUS_FAILED if failed else STATUS_OK)
                buf.error.append(result if failed else "")
                have.add(row)
                waiting = max(waiting, n + 1)
            if failed:
                self._fail(self.seen[row][0] if row in self.seen else self.cols["key"][row], result)
            if waiting >= self.commit_every and (waiting >= self.most_waiting or not writing()):
                self._commit()
                waiting = 0
        self.counts["extracted"] += len(rows)

    def commit(self) -> None:
        """Make everything added so far durable and visible (image rows, metadata, then the ledger)."""
        self._commit()
        t = time.perf_counter()
        settle()
        self.timings["write"] += time.perf_counter() - t

    def _commit(self) -> None:
        """Queue everything added so far as one batch, written in the background while rows keep coming
        (``add_many`` commits this way): it is committed once written, and the next batch waits for it."""
        t = time.perf_counter()
        batch = Batch()  # image rows, then every fingerprint's rows, written at once; the ledgers after, in order
        self._flush_images(batch)
        ends = {}
        for fp, buf in self.rows.items():
            if not len(buf):
                continue
            group, end = self.groups[fp], buf.start + len(buf)
            group.write_rows(buf.start, np.asarray(buf.image, np.int64), np.asarray(buf.status, np.int8), buf.error,
                             batch)
            for tap, vectors in buf.taps.items():
                group.write_tap(tap, buf.start, vectors[: len(buf)], batch)
            group.commit(end, dict.fromkeys(buf.taps, end), batch)
            ends[fp] = end
        batch.start()
        self.commits += 1
        for fp, end in ends.items():
            self.rows[fp].reset(end)
        self.timings["write"] += time.perf_counter() - t

    def _flush_images(self, batch: Batch) -> None:
        """Settle this run's names for the contents seen since the last commit; committed rows whose
        names changed are rewritten now, new rows (and the images ledger) are queued in ``batch``."""
        dirty = sorted(self.dirty)
        keys, key_row, seen, committed = self.cols["key"], self.key_row, self.seen, self.committed_images
        for row in dirty:  # keys that move away are released first, so contents can swap names
            old = keys[row]
            if old and old != seen[row][0] and key_row.get(old) == row:
                del key_row[old]
        paths, labels, conflicts = self.cols["path"], self.cols["label"], self.cols["conflict"]
        for row in dirty:
            key, path, label = seen[row]
            more = self.more.get(row)
            conflict = more.conflict() if more is not None else ""
            holder = key_row.get(key)
            if holder is not None and holder != row:  # the key's file now holds other bytes
                self._set(holder, key="", path="")
                self.counts["orphaned"] += 1
            key_row[key] = row
            if row >= committed:  # a row not appended yet is written whole
                keys[row], paths[row], labels[row], conflicts[row] = key, path, label, conflict
            else:
                self._set(row, key=key, path=path, label=label, conflict=conflict)
        self.dirty.clear()
        if self._updates:  # before the append: it may rewrite the chunk these rows are in
            rows = np.asarray(sorted(self._updates), np.int64)
            self.cache.update_images(rows, **{c: [self.cols[c][r] for r in rows] for c in self.cols})
            self._updates.clear()
        if len(self.sha) > committed:
            self.cache.append_images(self.sha[committed:], *(self.cols[c][committed:] for c in
                                                             ("key", "path", "label", "conflict")), batch=batch)
            self.committed_images = len(self.sha)

    def _set(self, row: int, **values: str) -> None:
        for name, value in values.items():
            if self.cols[name][row] != value:
                self.cols[name][row] = value
                if row < self.committed_images:  # rows not appended yet are written whole
                    self._updates.add(row)

    # -- summary ------------------------------------------------------------------
    def conflicts(self) -> list[dict]:
        out = [{"sha256": self.sha[r], "keys": sorted(m.keys), "labels": json.loads(m.conflict())}
               for r, m in self.more.items() if m.conflict()]
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
