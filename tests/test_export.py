"""Export formats: the same columns in every format (path and status included), and a format is one module."""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from featcache.cli import build_parser, main
from featcache.errors import UsageError
from featcache.extract.pipeline import ExtractConfig, Extraction
from featcache.store import formats
from featcache.store.cache import FeatureCache
from featcache.store.export import export
from featcache.store.names import decode_name

from .images import bad_files

COLUMNS = ["key", "label", "sha256", "path", "status", "error"]
ODD_NAME = os.fsdecode(b"caf\xe9.jpg")  # not UTF-8: stored as text, decoded back to this OS name


@pytest.fixture(scope="module")
def mixed_cache(tmp_path_factory, imagenet_dir, lite0_embedder) -> Path:
    """4 real photos (one under a name that is not UTF-8) and 2 files that fail to decode."""
    root = tmp_path_factory.mktemp("mixed")
    src = root / "src" / "photos"
    src.mkdir(parents=True)
    photos = sorted(imagenet_dir.rglob("*.jpg"))[:4]
    for p in photos[:3]:
        shutil.copy(p, src / p.name)
    shutil.copy(photos[3], os.path.join(src, ODD_NAME))
    junk = root / "src" / "junk"
    junk.mkdir()
    for name in ("zero.jpg", "text.jpg"):
        (junk / name).write_bytes(bad_files()[name])
    cache = root / "cache"
    summary = Extraction(ExtractConfig(str(root / "src"), str(cache), progress=False), lite0_embedder).run()
    assert summary["extracted"] == 6 and summary["failed"] == 2
    return cache


def _cli(capsys, *args: str) -> dict:
    assert main(["export", *args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_parquet_has_path_status_and_error(mixed_cache, tmp_path, capsys):
    out = _cli(capsys, "--cache", str(mixed_cache), "--format", "parquet", "--out", str(tmp_path / "all.parquet"),
               "--include-failed")
    table = pq.read_table(tmp_path / "all.parquet")
    assert table.column_names == [*COLUMNS, "final"] and out["rows"] == table.num_rows == 6
    assert table.schema.metadata[b"featcache_fingerprint"].decode() == out["fingerprint"]
    status = np.array(table.column("status").to_pylist())
    errors = table.column("error").to_pylist()
    vectors = np.stack(table.column("final").to_numpy(zero_copy_only=False))
    assert sorted(status.tolist()) == [0, 0, 0, 0, 1, 1]
    assert all(errors[i] for i in np.flatnonzero(status)) and not any(errors[i] for i in np.flatnonzero(status == 0))
    assert np.isnan(vectors[status == 1]).all() and np.isfinite(vectors[status == 0]).all()
    paths = [decode_name(p) for p in table.column("path").to_pylist()]
    keys = table.column("key").to_pylist()
    assert all(os.path.isfile(p) and p.endswith(os.path.basename(decode_name(k))) for p, k in zip(paths, keys))
    assert os.path.join(mixed_cache.parent, "src", "photos", ODD_NAME) in paths

    _cli(capsys, "--cache", str(mixed_cache), "--format", "parquet", "--out", str(tmp_path / "ok.parquet"))
    ok = pq.read_table(tmp_path / "ok.parquet")
    want = FeatureCache(mixed_cache).read()
    assert ok.num_rows == len(want) == 4 and set(ok.column("status").to_pylist()) == {0}
    np.testing.assert_array_equal(np.stack(ok.column("final").to_numpy(zero_copy_only=False)), want.vectors)
    assert ok.column("key").to_pylist() == want.keys.tolist()


def test_npy_writes_the_same_columns_as_parquet(mixed_cache, tmp_path):
    export(str(mixed_cache), str(tmp_path / "t.parquet"), "parquet", include_failed=True)
    export(str(mixed_cache), str(tmp_path / "npy"), "npy", include_failed=True)
    meta = json.loads((tmp_path / "npy" / "meta.json").read_text())
    assert list(meta["columns"]) == COLUMNS and meta["rows"] == 6 and meta["taps"] == ["final"]
    table = pq.read_table(tmp_path / "t.parquet")
    for name, file in meta["columns"].items():
        assert np.load(tmp_path / "npy" / file).tolist() == table.column(name).to_pylist(), name
    np.testing.assert_array_equal(np.load(tmp_path / "npy" / "final.npy"),
                                  np.stack(table.column("final").to_numpy(zero_copy_only=False)))


def test_a_new_format_is_one_module(mixed_cache, tmp_path, capsys, monkeypatch):
    """Drop a module into the formats package: the CLI offers it and export writes through it, no other edit."""
    extra = tmp_path / "more_formats"
    extra.mkdir()
    (extra / "tsv.py").write_text(
        '"""Tab-separated key, status and vector norm."""\n'
        "import numpy as np\n"
        'TARGET = "file"\n'
        "def write(table, out):\n"
        "    norms = np.linalg.norm(table.taps['final'], axis=1)\n"
        "    rows = zip(table.columns['key'], table.columns['status'], norms)\n"
        "    out.write_text(''.join(f'{k}\\t{s}\\t{n:.3f}\\n' for k, s, n in rows))\n")
    monkeypatch.setattr(formats, "__path__", [*formats.__path__, str(extra)])
    monkeypatch.delitem(sys.modules, "featcache.store.formats.tsv", raising=False)
    assert build_parser().parse_args(["export", "--format", "tsv", "--out", "f.tsv"]).format == "tsv"
    out = _cli(capsys, "--cache", str(mixed_cache), "--format", "tsv", "--out", str(tmp_path / "f.tsv"))
    lines = (tmp_path / "f.tsv").read_text().splitlines()
    assert len(lines) == out["rows"] == 4 and all(line.split("\t")[1] == "0" for line in lines)
    monkeypatch.delitem(sys.modules, "featcache.store.formats.tsv", raising=False)


def test_unknown_format_is_a_usage_error_before_any_work(mixed_cache, tmp_path, capsys):
    with pytest.raises(UsageError, match="unknown export format 'xlsx'; choose one of npy, parquet"):
        export(str(mixed_cache), str(tmp_path / "x" / "f.xlsx"), "xlsx")
    assert not (tmp_path / "x").exists()
    with pytest.raises(SystemExit) as e:
        main(["export", "--cache", str(mixed_cache), "--format", "xlsx", "--out", str(tmp_path / "f")])
    assert e.value.code == 2 and "invalid choice: 'xlsx'" in capsys.readouterr().err
