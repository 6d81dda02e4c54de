"""Export cached features to plain files: ``.npy`` per array, or one parquet table."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..errors import UsageError
from .cache import FeatureCache
from .outputs import writable_dir


def export(cache_dir: str, out: str, fmt: str, fingerprint: str | None = None, taps: list[str] | None = None) -> dict:
    """Write one fingerprint's taps to ``out``; an unwritable ``out`` raises OSError before any vector is read."""
    if fmt not in ("npy", "parquet"):
        raise UsageError(f"--format must be npy or parquet, got {fmt!r}")
    cache = FeatureCache(cache_dir)
    fp = cache.resolve_fingerprint(fingerprint)
    out_path = Path(out)
    writable_dir(out_path if fmt == "npy" else out_path.parent)
    taps = taps or sorted(cache.group_attrs(fp)["taps"])
    feats = {tap: cache.read(fp, tap) for tap in taps}
    first = feats[taps[0]]
    if any(not np.array_equal(f.sha256, first.sha256) for f in feats.values()):
        raise UsageError("taps hold different rows (an extraction is catching up); export one tap at a time")
    if fmt == "npy":
        for tap, f in feats.items():
            np.save(out_path / f"{tap}.npy", f.vectors)
        for name in ("keys", "labels", "sha256"):
            np.save(out_path / f"{name}.npy", getattr(first, name))
        (out_path / "meta.json").write_text(json.dumps({"fingerprint": fp, "taps": taps, "rows": len(first)}, indent=2))
    elif fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        cols = {"key": pa.array(first.keys.tolist()), "label": pa.array(first.labels.tolist()),
                "sha256": pa.array(first.sha256.tolist())}
        for tap, f in feats.items():
            dim = f.vectors.shape[1]
            cols[tap] = pa.FixedSizeListArray.from_arrays(pa.array(f.vectors.reshape(-1)), dim)
        table = pa.table(cols).replace_schema_metadata({"featcache_fingerprint": fp})
        pq.write_table(table, out_path)
    return {"out": str(out_path), "rows": len(first), "taps": taps, "fingerprint": fp}
