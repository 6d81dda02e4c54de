"""Export cached features to plain files in any format of ``store.formats`` (npy, parquet, ...)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import UsageError
from . import formats
from .cache import FeatureCache, rows_of
from .names import encode_name
from .outputs import writable_dir


def export(cache_dir: str, out: str, fmt: str, fingerprint: str | None = None, taps: list[str] | None = None,
           include_failed: bool = False) -> dict:
    """Write one fingerprint's taps and image columns to ``out``.

    Rows are those ``FeatureCache.read`` gives (``include_failed``: failed rows with NaN vectors and
    orphans too). An unknown format is a usage error and an unwritable ``out`` an OSError, both
    before any vector is read.
    """
    writer = formats.load(fmt)
    cache = FeatureCache(cache_dir)
    fp = cache.resolve_fingerprint(fingerprint)
    out_path = Path(out)
    writable_dir(out_path if writer.TARGET == "dir" else out_path.parent)
    taps = taps or sorted(cache.group_attrs(fp)["taps"])
    table = _table(cache, fp, taps, include_failed)
    writer.write(table, out_path)
    return {"out": str(out_path), "format": fmt, "rows": len(table), "taps": taps, "fingerprint": fp,
            "columns": list(table.columns)}


def _table(cache: FeatureCache, fp: str, taps: list[str], include_failed: bool) -> formats.Table:
    feats = {tap: cache.read(fp, tap, include_failed=include_failed) for tap in taps}
    first = feats[taps[0]]
    if any(not np.array_equal(f.sha256, first.sha256) for f in feats.values()):
        raise UsageError("taps hold different rows (an extraction is catching up); export one tap at a time")
    imgs = cache.images()
    paths = imgs.path[rows_of(imgs.sha256, first.sha256)].tolist()
    columns = {"key": first.keys, "label": first.labels, "sha256": first.sha256,
               "path": np.array([encode_name(p) for p in paths], dtype=str),
               "status": first.status.astype(np.int8), "error": first.errors}
    return formats.Table(fp, columns, {tap: f.vectors for tap, f in feats.items()})
