"""The cache in the array ecosystem: xarray and dask on real caches, during and after a write."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import dask.array as da
import numpy as np
import pytest
import xarray as xr
import zarr

from featcache.errors import NotFoundError
from featcache.store.cache import FeatureCache, writer_lock


def _open(cache: Path, group: str, **kw) -> xr.Dataset:
    """xarray.open_zarr as a user calls it, failing on any warning about consolidated metadata."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = xr.open_zarr(cache, group=group, **kw)
    assert not [w for w in caught if "consolidated" in str(w.message)], [str(w.message) for w in caught]
    return ds


def _ledger(cache: Path) -> tuple[str, dict]:
    c = FeatureCache(cache)
    fp = c.resolve_fingerprint()
    return fp, c.group_attrs(fp)


def test_finished_cache_opens_in_xarray_and_dask_with_no_rows_past_the_ledger(tux_cache):
    fp, attrs = _ledger(tux_cache)
    n = attrs["tap_rows"]["final"]
    assert "consolidated_metadata" in json.loads((tux_cache / "zarr.json").read_text())
    everything = FeatureCache(tux_cache).read(include_failed=True)

    taps = _open(tux_cache, f"features/{fp}/taps")
    assert dict(taps.sizes) == {"row": n, "final_dim": attrs["taps"]["final"]}
    np.testing.assert_array_equal(taps["final"].values, everything.vectors)
    rows = _open(tux_cache, f"features/{fp}")
    assert dict(rows.sizes) == {"row": attrs["rows"]} and rows.attrs["rows"] == n
    images = _open(tux_cache, "images")
    assert images.sizes["image"] == images.attrs["rows"] == len(FeatureCache(tux_cache).images())
    assert images["key"].values[rows["image"].values].tolist() == everything.keys.tolist()

    x = da.from_zarr(str(tux_cache / "features" / fp / "taps" / "final"))
    assert x.shape == (n, attrs["taps"]["final"])
    np.testing.assert_array_equal(x.compute(), everything.vectors)
    tree = xr.open_datatree(tux_cache, engine="zarr")
    assert tree[f"features/{fp}/taps"].sizes["row"] == n


def test_to_xarray_is_every_committed_row_and_filters_to_read(tux_cache):
    cache = FeatureCache(tux_cache)
    fp, attrs = _ledger(tux_cache)
    ds = cache.to_xarray()
    assert dict(ds.sizes) == {"row": attrs["rows"], "dim": attrs["taps"]["final"]}
    assert ds.vectors.chunks is not None, "vectors stay lazy (dask)"
    assert ds.attrs["fingerprint"] == fp and ds.attrs["tap"] == "final" and ds.attrs["cache_id"] == cache.uid
    ok = ds.isel(row=((ds.status == 0) & (ds.key != "")).values)
    want = cache.read()
    np.testing.assert_array_equal(ok.vectors.values, want.vectors)
    assert ok.key.values.tolist() == want.keys.tolist() and ok.label.values.tolist() == want.labels.tolist()
    assert ok.sha256.values.tolist() == want.sha256.tolist()
    with pytest.raises(NotFoundError, match="tap 'stage9'"):
        cache.to_xarray(tap="stage9")


def test_what_readers_see_while_a_writer_runs(imagenet_cache, tmp_path):
    """Consolidated metadata lags the ledger during a run, never leads it; featcache reads the live ledger."""
    cache = tmp_path / "c"
    shutil.copytree(imagenet_cache, cache)
    fp, attrs = _ledger(cache)
    n0 = attrs["rows"]
    before = FeatureCache(cache).read(include_failed=True)
    m = 300  # rows past the ledger: enough to grow every array's capacity
    with writer_lock(cache):
        writer = FeatureCache(cache, create=True)
        group = writer.feature_group(fp, attrs["fingerprint"], attrs["backbone"], attrs["taps"])
        group.write_rows(n0, np.arange(m) % n0, np.zeros(m, np.int8), [""] * m)
        group.write_tap("final", n0, np.tile(before.vectors, (m // n0 + 1, 1))[:m])

        live = xr.open_zarr(cache, group=f"features/{fp}/taps", consolidated=False)
        assert live.sizes["row"] > n0 + m, "uncommitted capacity is visible to a raw reader of the live metadata"
        live_attrs = zarr.open_group(str(cache / "features" / fp), mode="r").attrs
        np.testing.assert_array_equal(live["final"][: live_attrs["tap_rows"]["final"]].values, before.vectors)
        snapshot = _open(cache, f"features/{fp}/taps")
        assert snapshot.sizes["row"] == n0
        assert FeatureCache(cache).to_xarray().sizes["row"] == n0

        group.commit(n0 + m, {"final": n0 + m})
        other = writer.feature_group("f" * 20, {"other": 1}, attrs["backbone"], attrs["taps"])
        assert other.rows == 0
        snapshot = _open(cache, f"features/{fp}/taps")
        assert snapshot.sizes["row"] == n0, "the snapshot of the last finished write, not ahead of the ledger"
        np.testing.assert_array_equal(snapshot["final"].values, before.vectors)
        assert "f" * 20 not in zarr.open_group(str(cache), mode="r")["features"]
        reader = FeatureCache(cache)
        assert reader.to_xarray(fp).sizes["row"] == n0 + m and len(reader.read(fp, include_failed=True)) == n0 + m
        assert "f" * 20 in reader.fingerprints()

    for ds in (_open(cache, f"features/{fp}/taps"), xr.open_zarr(cache, group=f"features/{fp}/taps", consolidated=False)):
        assert ds.sizes["row"] == n0 + m
    assert da.from_zarr(str(cache / "features" / fp / "taps" / "final")).shape[0] == n0 + m
    assert _open(cache, f"features/{'f' * 20}").sizes["row"] == 0


def test_next_writer_names_and_trims_a_cache_from_before(imagenet_cache, tmp_path):
    """A cache written before dimension names and sealing: capacity past the ledger, no names, no consolidation."""
    cache = tmp_path / "c"
    shutil.copytree(imagenet_cache, cache)
    fp, attrs = _ledger(cache)
    root = json.loads((cache / "zarr.json").read_text())
    del root["consolidated_metadata"]
    (cache / "zarr.json").write_text(json.dumps(root))
    for meta_file in cache.rglob("zarr.json"):
        meta = json.loads(meta_file.read_text())
        if meta["node_type"] == "array":
            del meta["dimension_names"]
            meta["shape"][0] = meta["shape"][0] + 4096  # capacity past the ledger
            meta_file.write_text(json.dumps(meta))
    before = FeatureCache(cache).read(include_failed=True)
    with pytest.raises(KeyError, match="dimension_names"):
        xr.open_zarr(cache, group=f"features/{fp}/taps", consolidated=False)
    assert FeatureCache(cache).to_xarray().sizes["row"] == attrs["rows"], "to_xarray names dimensions itself"

    with writer_lock(cache):
        FeatureCache(cache, create=True)
    ds = _open(cache, f"features/{fp}/taps")
    assert dict(ds.sizes) == {"row": attrs["rows"], "final_dim": attrs["taps"]["final"]}
    assert da.from_zarr(str(cache / "images" / "key")).shape == (len(FeatureCache(cache).images()),)
    after = FeatureCache(cache).read(include_failed=True)
    np.testing.assert_array_equal(after.vectors, before.vectors)
    assert after.keys.tolist() == before.keys.tolist()
