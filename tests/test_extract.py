"""The extraction job on real images with real weights: accuracy, identity, bad input, resume."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import zarr

from featcache.extract.embedder import Embedder
from featcache.extract.pipeline import ExtractConfig, Extraction
from featcache.extract.registry import resolve
from featcache.extract.sources import Listing, list_source
from featcache.extract.spec import fingerprint
from featcache.store.cache import FeatureCache

from .images import bad_files, jpeg_bytes, real_photo
from .tux import per_class_csv

CLI = [sys.executable, "-m", "featcache.cli"]


def run(source, cache, emb, **kw) -> dict:
    return Extraction(ExtractConfig(str(source), str(cache), progress=False, **kw), emb).run()


@pytest.mark.parametrize("name", ["efficientnet_lite0", "mobilenet_v2"])
def test_imagenet20_top1_through_the_cache(name, imagenet_dir, tmp_path, lite0_embedder, mnv2_embedder):
    """Weights and preprocessing are right: the original 1000-way layer on cached features."""
    emb = {"efficientnet_lite0": lite0_embedder, "mobilenet_v2": mnv2_embedder}[name]
    summary = run(imagenet_dir, tmp_path / "c", emb)
    assert summary["extracted"] == 20 and summary["failed"] == 0
    feats = FeatureCache(tmp_path / "c").read(tap="final")
    pred = emb.classify_imagenet(feats.vectors).argmax(1)
    correct = int((pred == feats.labels.astype(int)).sum())
    assert correct >= 18, f"{name}: top-1 {correct}/20"


def test_rerun_is_noop_grow_and_move(imagenet_dir, tmp_path, lite0_embedder):
    src = tmp_path / "src"
    shutil.copytree(imagenet_dir, src)
    extra = sorted(src.rglob("*.jpg"))[:3]
    held = tmp_path / "held"
    held.mkdir()
    for p in extra:
        shutil.move(p, held / p.name)
    cache = tmp_path / "c"
    first = run(src, cache, lite0_embedder)
    assert first["extracted"] == 17

    again = run(src, cache, lite0_embedder)
    assert again["extracted"] == 0 and again["already_cached"] == 17
    assert again["timings"].get("model", 0) == 0, "an unchanged collection must do no model work"

    (src / "new").mkdir()
    for p in held.iterdir():
        shutil.copy(p, src / "new" / p.name)
    grown = run(src, cache, lite0_embedder)
    assert grown["extracted"] == 3 and grown["already_cached"] == 17

    before = FeatureCache(cache).read()
    moved_from = sorted((src / "new").iterdir())[0]
    moved_to = src / "renamed" / "x.jpg"
    moved_to.parent.mkdir()
    shutil.move(moved_from, moved_to)
    after_move = run(src, cache, lite0_embedder)
    assert after_move["extracted"] == 0
    feats = FeatureCache(cache).read()
    assert len(feats) == 20 and len(set(feats.sha256.tolist())) == 20
    row = list(feats.keys).index("renamed/x.jpg")
    assert feats.labels[row] == "renamed"
    old_row = list(before.sha256).index(feats.sha256[row])
    np.testing.assert_array_equal(before.vectors[old_row], feats.vectors[row])


def test_bad_files_are_rows_with_reasons(tmp_path, imagenet_dir, lite0_embedder):
    src = tmp_path / "src"
    shutil.copytree(imagenet_dir, src)
    (src / "junk").mkdir()
    for name, data in bad_files().items():
        (src / "junk" / name).write_bytes(data)
    (src / "junk" / "readme.txt").write_text("not an image suffix: skipped and counted")
    summary = run(src, tmp_path / "c", lite0_embedder)
    assert summary["failed"] == len(bad_files())
    assert summary["skipped_non_image_suffix"] == 1
    reasons = {f["key"]: f["error"] for f in summary["failures"]}
    assert "empty" in reasons["junk/zero.jpg"] and "decompression bomb" in reasons["junk/bomb.png"]
    cache = FeatureCache(tmp_path / "c")
    ok = cache.read()
    assert len(ok) == 20 and np.isfinite(ok.vectors).all()
    everything = cache.read(include_failed=True)
    assert len(everything) == 20 + len(bad_files())
    failed = everything.status != 0
    assert np.isnan(everything.vectors[failed]).all() and all(everything.errors[failed])
    info = cache.info()["fingerprints"][0]
    assert info["failed"] == len(bad_files()) and info["ok"] == 20
    # failures are remembered, not retried on every run
    assert run(src, tmp_path / "c", lite0_embedder)["extracted"] == 0


def test_fingerprint_changes_when_it_must_and_only_then(lite0):
    spec = lite0.spec
    base, _ = fingerprint(spec, lite0.weights_sha256, "fp32")
    renamed = type(spec)(**{**spec.__dict__, "name": "other-name"})
    assert fingerprint(renamed, lite0.weights_sha256, "fp32")[0] == base
    assert fingerprint(spec, lite0.weights_sha256, "bf16")[0] != base
    assert fingerprint(spec, "0" * 64, "fp32")[0] != base
    from dataclasses import replace

    for change in ({"crop": 240}, {"interpolation": "bilinear"}, {"mean": (0.4, 0.5, 0.5)}, {"background": (0, 0, 0)}):
        other = replace(spec, preprocess=replace(spec.preprocess, **change))
        assert fingerprint(other, lite0.weights_sha256, "fp32")[0] != base, change
    other_arch = resolve("efficientnet_lite1")
    assert fingerprint(other_arch, lite0.weights_sha256, "fp32")[0] != base


def test_two_fingerprints_live_side_by_side(imagenet_dir, imagenet_cache, tmp_path, lite0, lite0_embedder):
    cache = tmp_path / "c"
    shutil.copytree(imagenet_cache, cache)  # the fp32 run of imagenet_dir, as run() above would write it
    bf16 = Embedder(lite0, ["final"], "cpu", "bf16")
    # bf16 on 8 of the photos (one CPU batch): without native bf16 (AVX2 only) each image costs seconds
    some = Listing(list_source(imagenet_dir).items[:8])
    Extraction(ExtractConfig(str(imagenet_dir), str(cache), taps=["final"], progress=False), bf16).run(some)
    c = FeatureCache(cache)
    assert sorted(c.fingerprints()) == sorted([lite0_embedder.fingerprint, bf16.fingerprint])
    a, b = c.read(lite0_embedder.fingerprint), c.read(bf16.fingerprint)
    assert len(a) == 20 and sorted(b.keys.tolist()) == sorted(it.key for it in some.items)
    a_vectors = a.vectors[[a.keys.tolist().index(k) for k in b.keys.tolist()]]
    cos = (a_vectors * b.vectors).sum(1) / np.linalg.norm(a_vectors, axis=1) / np.linalg.norm(b.vectors, axis=1)
    assert cos.min() > 0.99 and not np.array_equal(a_vectors, b.vectors)


def test_new_tap_is_added_for_existing_rows(imagenet_dir, imagenet_cache, tmp_path, lite0):
    cache = tmp_path / "c"
    shutil.copytree(imagenet_cache, cache)  # the final tap of imagenet_dir's 20 photos
    summary = run(imagenet_dir, cache, Embedder(lite0, ["final", "stage3"], "cpu"))
    assert summary["taps"] == ["final", "stage3"]
    c = FeatureCache(cache)
    assert c.read(tap="stage3").vectors.shape == (20, 40)
    assert len(c.read(tap="final")) == 20


def test_zarr_layout_is_readable_without_featcache(imagenet_cache):
    cache = imagenet_cache  # read only
    root = zarr.open_group(str(cache), mode="r")
    fp = list(root["features"].group_keys())[0]
    g = root["features"][fp]
    n = g.attrs["tap_rows"]["final"]
    vectors = g["taps"]["final"][:n]
    rows = g["image"][:n]
    keys = root["images"]["key"][:][rows]
    ours = FeatureCache(cache).read()
    np.testing.assert_array_equal(vectors, ours.vectors)
    assert list(keys) == list(ours.keys)


def test_export_npy_and_parquet(imagenet_cache, tmp_path):
    import pyarrow.parquet as pq

    cache = imagenet_cache  # read only: export writes under tmp_path
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    out = subprocess.run([*CLI, "export", "--cache", str(cache), "--format", "npy", "--out", str(tmp_path / "npy"), "--json"],
                         capture_output=True, text=True, env=env, check=True)
    assert json.loads(out.stdout)["rows"] == 20
    feats = FeatureCache(cache).read()
    np.testing.assert_array_equal(np.load(tmp_path / "npy" / "final.npy"), feats.vectors)
    subprocess.run([*CLI, "export", "--cache", str(cache), "--format", "parquet", "--out", str(tmp_path / "f.parquet")],
                   env=env, check=True, capture_output=True)
    table = pq.read_table(tmp_path / "f.parquet")
    assert table.num_rows == 20
    np.testing.assert_array_equal(np.stack(table.column("final").to_numpy(zero_copy_only=False)), feats.vectors)


def test_cli_errors_are_clear(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    missing = subprocess.run([*CLI, "extract", str(tmp_path / "nope"), "--cache", str(tmp_path / "c")],
                             capture_output=True, text=True, env=env)
    assert missing.returncode == 3 and "does not exist" in missing.stderr
    bad = subprocess.run([*CLI, "extract", str(tmp_path), "--backbone", "nosuchnet", "--cache", str(tmp_path / "c")],
                         capture_output=True, text=True, env=env)
    assert bad.returncode == 3 and "unknown backbone" in bad.stderr
    flag = subprocess.run([*CLI, "extract", str(tmp_path), "--precision", "fp8"], capture_output=True, text=True, env=env)
    assert flag.returncode == 2
    info = subprocess.run([*CLI, "info", "--cache", str(tmp_path / "none")], capture_output=True, text=True, env=env)
    assert info.returncode == 3 and "no featcache cache" in info.stderr


def test_sigkill_then_resume_equals_uninterrupted(tux_csv, tmp_path, tux_cache):
    """Kill a real extraction mid-run; the rerun completes with every image exactly once."""
    cache = tmp_path / "killed"
    csv = tmp_path / "half.csv"  # half the stamps (119): the resume then has about 70 images left, not 200
    n = per_class_csv(tux_csv, csv, 18)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    cmd = [*CLI, "extract", str(csv), "--cache", str(cache), "--batch-size", "4", "--commit-every", "8", "-q", "--json"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    committed = 0
    while time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
        try:
            g = zarr.open_group(str(cache / "features"), mode="r")
            fps = list(g.group_keys())
            committed = g[fps[0]].attrs["rows"] if fps else 0
        except Exception:  # noqa: BLE001 - cache not created yet
            committed = 0
        if committed >= 8:  # the first commit seen: kill early, group commits can take 64 rows at a time
            break
    assert proc.poll() is None, "the extraction finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert 8 <= committed < n, f"kill landed at {committed} rows"
    resumed = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
    summary = json.loads(resumed.stdout)
    assert summary["already_cached"] >= committed and summary["already_cached"] + summary["extracted"] == n

    got, want = FeatureCache(cache).read(include_failed=True), FeatureCache(tux_cache).read(include_failed=True)
    assert len(got) == n and len(want) == 240
    assert len(set(got.sha256.tolist())) == n, "every image stored exactly once"
    order = {s: i for i, s in enumerate(want.sha256)}
    idx = np.array([order[s] for s in got.sha256])
    np.testing.assert_allclose(got.vectors, want.vectors[idx], rtol=0, atol=1e-4)


def test_vectors_of_finds_what_read_returns_and_nothing_else(imagenet_dir, tmp_path, lite0, lite0_embedder):
    """``predict``'s lookup of a few contents: a failed row, an orphaned content, a row that lacks a tap added
    later and an unknown hash are left out, as ``read`` leaves them out; the others get ``read``'s vectors."""
    src, cache = tmp_path / "src", tmp_path / "c"
    shutil.copytree(imagenet_dir, src / "photos")
    for name, data in bad_files().items():
        (src / name).write_bytes(data)
    run(src, cache, lite0_embedder)
    photos = sorted((src / "photos").rglob("*.jpg"))
    photos[0].write_bytes(jpeg_bytes(real_photo(0).rotate(90)))  # its old content loses its key: an orphan
    photos[1].unlink()  # gone before the stage2 tap is added: its row lacks stage2
    run(src, cache, Embedder(lite0, ["final", "stage2"], "cpu"))
    c = FeatureCache(cache)
    every = c.images().sha256.tolist() + ["0" * 64]
    for tap, left_out in (("final", len(bad_files()) + 1), ("stage2", len(bad_files()) + 2)):
        want = c.read(tap=tap)
        got = c.vectors_of(every, tap=tap)
        assert len(every) - 1 - len(want) == left_out
        assert sorted(got) == sorted(want.sha256.tolist())
        for sha, v in zip(want.sha256.tolist(), want.vectors):
            np.testing.assert_array_equal(got[sha], v)
    assert c.vectors_of(["0" * 64]) == {}


def test_process_decoding_gives_the_same_vectors(imagenet_dir, imagenet_cache, tmp_path, lite0_embedder):
    """The GPU path decodes in worker processes; it must produce the same pixels as threads."""
    run(imagenet_dir, tmp_path / "procs", lite0_embedder, decode_processes=True, workers=2)
    a, b = FeatureCache(imagenet_cache).read(), FeatureCache(tmp_path / "procs").read()  # imagenet_cache: threads
    np.testing.assert_array_equal(a.sha256, b.sha256)
    np.testing.assert_allclose(a.vectors, b.vectors, rtol=0, atol=1e-5)


def test_tap_catch_up_skips_images_that_vanished(imagenet_dir, tmp_path, lite0, lite0_embedder):
    """A tap added later cannot be computed for a file that is gone: that row lacks the new tap, and stays ok."""
    src = tmp_path / "src"
    shutil.copytree(imagenet_dir, src)
    run(src, tmp_path / "c", lite0_embedder)
    gone = sorted(src.rglob("*.jpg"))[0]
    gone.unlink()
    summary = run(src, tmp_path / "c", Embedder(lite0, ["final", "stage2"], "cpu"))
    assert summary["failed"] == 0 and summary["tap_rows_missing"] == {"unreadable file": 1}
    c = FeatureCache(tmp_path / "c")
    assert len(c.read(tap="stage2")) == 19 and len(c.read(tap="final")) == 20
    assert np.isfinite(c.read(tap="stage2").vectors).all()
