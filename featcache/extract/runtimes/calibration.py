"""The images int8 ranges are measured on: a fixed sample of the collection, named by content hash.

The sample is chosen from the keys (relative paths), so the same collection gives the same
sample on any machine without hashing every file; only the chosen files are read. Its
record (count, the sha256 of the sorted content hashes, and 16-hex prefixes of each) goes
into the int8 fingerprint, so a model calibrated on other images never shares a cache, and
a machine without the prepared model can quantise it again from the same cached images.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ...errors import FingerprintMismatch, UsageError

CALIBRATION_IMAGES = 300  # NNCF's default subset size
MIN_CALIBRATION_IMAGES = 64  # auto picks int8 only with at least this many images to calibrate on


@dataclass(frozen=True)
class Calibration:
    """Calibration images: (sha256, path) pairs in sha256 order, decoded only when a model is quantised."""

    files: tuple[tuple[str, Path], ...]
    source: str = ""
    recorded: dict | None = None  # known by its record only (the files were not found): fine while the model is on disk

    def __len__(self) -> int:
        return self.recorded["images"] if self.recorded else len(self.files)

    @property
    def digest(self) -> str:
        return hashlib.sha256("\n".join(s for s, _ in self.files).encode()).hexdigest()

    def record(self) -> dict:
        if self.recorded:
            return self.recorded
        return {"images": len(self.files), "sha256": self.digest, "keys": [s[:16] for s, _ in self.files]}

    def images(self, pre) -> np.ndarray:
        """uint8 (N, 3, crop, crop), decoded as extract decodes; a changed file is an error, not a new model.

        A file that does not decode is left out the same way every time (it is a failed row in extract too).
        """
        from ...errors import FeatcacheError
        from ..decode import load_image
        from ..stages import read_file

        if self.recorded:
            raise FingerprintMismatch(
                f"the int8 model of this fingerprint is not in the model cache and its {len(self)} calibration images "
                "were not found: pass the cache that holds them (or re-extract with --precision int8)")
        out = []
        for sha, path in self.files:
            read = read_file(path)
            if read.sha256 != sha:
                raise FingerprintMismatch(f"calibration image {path} changed since it was chosen; its old content "
                                          f"{sha[:16]} is what the int8 fingerprint records")
            try:
                out.append(load_image(read.data, pre).numpy())
            except FeatcacheError:
                continue
        if not out:
            raise UsageError(f"none of the {len(self.files)} calibration images of {self.source} decodes")
        return np.stack(out)

    @classmethod
    def from_files(cls, paths: list[Path], keys: list[str] | None = None, n: int = CALIBRATION_IMAGES,
                   source: str = "") -> Calibration:
        """Up to ``n`` distinct images of ``paths``: those whose key hashes lowest (a fixed random sample)."""
        from ..stages import read_file

        keys = keys or [p.name for p in paths]
        order = sorted(range(len(paths)), key=lambda i: hashlib.sha256(keys[i].encode()).digest())
        chosen: dict[str, Path] = {}
        for i in order:
            if len(chosen) >= n:
                break
            read = read_file(paths[i])  # regular files only, bounded: a CSV may list a FIFO or /dev/zero
            if read.data is not None:
                chosen.setdefault(read.sha256, Path(paths[i]))
        return cls(tuple(sorted(chosen.items())), source)

    @classmethod
    def from_source(cls, source: str, n: int = CALIBRATION_IMAGES) -> Calibration:
        """The sample of an extract SOURCE (folder or CSV)."""
        from ..sources import list_source

        items = list_source(source, "none").items
        if not items:
            raise UsageError(f"{source} holds no images to calibrate int8 on")
        return cls.from_files([it.path for it in items], [it.key for it in items], n, source)

    @classmethod
    def from_record(cls, record: dict) -> Calibration:
        return cls((), "recorded", record)

    @classmethod
    def from_cache(cls, cache: str | Path, record: dict) -> Calibration:
        """The recorded images, found by content in a cache's image table (to quantise the same model again)."""
        from ...store.cache import FeatureCache

        table = FeatureCache(cache).images()
        wanted = set(record["keys"])
        files = {s: Path(p) for s, p in zip(table.sha256, table.path) if s[:16] in wanted}
        found = cls(tuple(sorted(files.items())), str(cache))
        if found.record()["sha256"] != record["sha256"]:
            raise FingerprintMismatch(
                f"cache {cache} no longer holds the {record['images']} calibration images this int8 fingerprint was "
                f"quantised on, and no prepared model is on disk; re-extract with --precision int8 into a new cache")
        return found
