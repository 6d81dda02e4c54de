"""A cold start that does no needless work: a re-run with nothing new loads no model and imports no
torch, a cache keeps the precision it was built with, and predicting a cached image with a linear head
imports neither torch nor scikit-learn, yet gives the estimator's very probabilities (real caches,
real JPEGs, real weights). The caches hold a few photos: what is checked does not grow with their number."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file
from sklearn.datasets import make_blobs

from featcache.classify.bundle import STATE, load_bundle, save_bundle
from featcache.classify.heads import HeadInputError, LinearSVMHead, LogRegHead
from featcache.classify.heads.numpy_predict import ARRAYS
from featcache.errors import UsageError
from featcache.extract.pipeline import ExtractConfig, Extraction
from featcache.hashing import sha256_bytes
from featcache.store.cache import FeatureCache, rows_of

ROOT = Path(__file__).resolve().parents[1]
# ``python -m featcache.cli ARGS``, reporting on stderr which heavy modules the process imported by its exit
WATCH = ("torch", "torchvision", "timm", "openvino", "sklearn")
PROBE = ("import atexit, runpy, sys\n"
         f"atexit.register(lambda: print('IMPORTED', [m for m in {WATCH!r} if m in sys.modules], file=sys.stderr))\n"
         "sys.argv = ['featcache', *sys.argv[1:]]\n"
         "runpy.run_module('featcache.cli', run_name='__main__')\n")


def cli_imports(*args: str, env: dict | None = None) -> tuple[dict | None, list[str], subprocess.CompletedProcess]:
    """(the --json result, the watched modules imported, the process) of one CLI command in a fresh interpreter."""
    proc = subprocess.run([sys.executable, "-c", PROBE, *args], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}, timeout=600)
    line = next(ln for ln in proc.stderr.splitlines() if ln.startswith("IMPORTED"))
    result = json.loads(proc.stdout) if "--json" in args and proc.returncode == 0 else None
    return result, eval(line.split(" ", 1)[1]), proc  # noqa: S307 - our own repr of a list of names


def extract(source: Path, cache: Path, **kw) -> tuple[dict, Extraction]:
    ex = Extraction(ExtractConfig(str(source), str(cache), progress=False, **kw))
    return ex.run(), ex


@pytest.fixture(scope="module")
def photos(imagenet_dir, tmp_path_factory) -> tuple[Path, Path]:
    """A labelled folder of 3 ImageNet photos, and a folder of 2 others, held back."""
    root = tmp_path_factory.mktemp("photos")
    jpgs = sorted(imagenet_dir.rglob("*.jpg"))
    for folder, part in (("src", jpgs[:3]), ("held", jpgs[3:5])):
        for p in part:
            dest = root / folder / p.relative_to(imagenet_dir)
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(p, dest)
    return root / "src", root / "held"


@pytest.fixture(scope="module")
def built(photos, tmp_path_factory) -> tuple[Path, dict]:
    """An fp32 cache of ``photos``' source (torch, the tests' ``auto``) and its first run's result; copy to change it."""
    cache = tmp_path_factory.mktemp("built") / "c"
    first, ex = extract(photos[0], cache)
    assert first["extracted"] == 3 and ex.loaded and first["precision"] == "fp32"
    return cache, first


def copy_of(cache: Path, dest: Path) -> Path:
    shutil.copytree(cache, dest)
    return dest


def test_noop_rerun_imports_no_torch_and_loads_no_model(photos, built):
    src, _ = photos
    cache, first = built
    again, imported, proc = cli_imports("extract", str(src), "--cache", str(cache), "--json", "-q")
    assert proc.returncode == 0, proc.stderr
    assert imported == [], f"a re-run with nothing to compute imported {imported}"
    assert again["fingerprint"] == first["fingerprint"] and again["precision"] == "fp32"
    assert again["extracted"] == 0 and again["already_cached"] == 3
    assert again["model_loaded"] is False and again["timings"].get("model", 0) == 0

    for args in (["--help"], ["backbones", "--json"], ["info", "--cache", str(cache), "--json"]):
        _, imported, proc = cli_imports(*args)
        assert proc.returncode == 0, proc.stderr
        assert imported == [], f"featcache {' '.join(args)} imported {imported}"


def test_new_images_after_a_noop_get_the_vectors_of_a_fresh_run(photos, built, tmp_path, monkeypatch):
    """The kept fingerprint is rebuilt (and checked) only when new images need the model."""
    src, held = photos
    cache, first = copy_of(built[0], tmp_path / "c"), built[1]
    src = Path(shutil.copytree(src, tmp_path / "src"))
    monkeypatch.setenv("FEATCACHE_PRECISION", "bf16")  # what auto would choose now: the cache keeps fp32
    noop, ex = extract(src, cache)
    assert noop["fingerprint"] == first["fingerprint"] and noop["extracted"] == 0 and not ex.loaded
    shutil.copytree(held, src, dirs_exist_ok=True)
    grown, ex = extract(src, cache)
    assert ex.loaded and grown["model_loaded"] and grown["extracted"] == 2
    assert grown["fingerprint"] == first["fingerprint"] and grown["precision"] == "fp32"

    monkeypatch.setenv("FEATCACHE_PRECISION", "fp32")
    fresh, _ = extract(src, tmp_path / "fresh")
    assert fresh["fingerprint"] == first["fingerprint"]
    a, b = FeatureCache(cache).read(first["fingerprint"]), FeatureCache(tmp_path / "fresh").read(first["fingerprint"])
    assert len(a.sha256) == len(b.sha256) == 5
    order_a, order_b = np.argsort(a.sha256), np.argsort(b.sha256)
    assert (a.sha256[order_a] == b.sha256[order_b]).all()
    np.testing.assert_array_equal(a.vectors[order_a], b.vectors[order_b])


def test_explicit_other_precision_is_a_new_fingerprint_beside_the_kept_one(photos, tmp_path, monkeypatch):
    src, _ = photos
    cache = tmp_path / "c"
    monkeypatch.setenv("FEATCACHE_RUNTIME", "torch")
    monkeypatch.setenv("FEATCACHE_PRECISION", "bf16")  # the cache is built by auto = torch bf16
    first, _ = extract(src, cache)
    assert first["precision"] == "bf16"
    monkeypatch.setenv("FEATCACHE_PRECISION", "fp32")  # auto now says fp32: the bf16 cache keeps bf16
    kept, ex = extract(src, cache)
    assert kept["fingerprint"] == first["fingerprint"] and kept["precision"] == "bf16" and not ex.loaded

    other, ex = extract(src, cache, precision="fp32")  # told otherwise: a new fingerprint beside it
    assert ex.loaded and other["precision"] == "fp32" and other["fingerprint"] != first["fingerprint"]
    assert other["extracted"] == 3
    assert sorted(FeatureCache(cache).fingerprints()) == sorted([first["fingerprint"], other["fingerprint"]])
    again, ex = extract(src, cache, precision="bf16")  # an explicit precision the cache holds: kept, no model
    assert again["fingerprint"] == first["fingerprint"] and again["extracted"] == 0 and not ex.loaded


def test_a_new_tap_on_a_kept_cache_loads_the_model_for_its_catch_up(photos, built, tmp_path):
    src, _ = photos
    cache, first = copy_of(built[0], tmp_path / "c"), built[1]
    grown, ex = extract(src, cache, taps=["final", "stage3"])
    assert ex.loaded and grown["fingerprint"] == first["fingerprint"]
    assert grown["taps"] == ["final", "stage3"] and grown["extracted"] == 3
    feats = FeatureCache(cache).read(first["fingerprint"], "stage3")
    assert feats.vectors.shape[0] == 3 and np.isfinite(feats.vectors).all()
    with pytest.raises(UsageError, match="unknown tap"):
        extract(src, cache, taps=["no-such-tap"])


# -- predict (issue 13: one cached image <= 2 s) ---------------------------------------------------------
def test_predict_of_a_cached_image_imports_neither_torch_nor_sklearn(photos, built, tmp_path):
    """A linear head's bundle is applied in plain numpy: the CLI prints the estimator's exact probabilities."""
    src, _ = photos
    cache, first = built
    fc = FeatureCache(cache)
    feats, attrs = fc.read(first["fingerprint"]), fc.group_attrs(first["fingerprint"])
    labels = np.array(["cat", "dog", "eel"])[np.arange(len(feats)) % 3]
    image = sorted(src.rglob("*.jpg"))[1]
    row = rows_of(feats.sha256, [sha256_bytes(image.read_bytes())])[0]
    for head in (LogRegHead(C=1.0), LinearSVMHead(C=1.0)):
        head.fit(feats.vectors, labels)
        out = save_bundle(tmp_path / head.kind, head, fingerprint=first["fingerprint"], canon=attrs["fingerprint"],
                          backbone=attrs["backbone"], tap="final", cache=str(cache))
        result, imported, proc = cli_imports("predict", "--head", str(out), str(image), "--json")  # the head's cache
        assert proc.returncode == 0, proc.stderr
        assert imported == [], f"predict of a cached image with a {head.kind} head imported {imported}"
        got = result["results"][0]
        want = head.predict_proba(feats.vectors[row : row + 1])[0]
        assert got["source"] == "cache" and got["label"] == head.predict(feats.vectors[row : row + 1])[0]
        assert {t["label"]: t["probability"] for t in got["top"]} == dict(zip(head.classes_.tolist(), want.tolist()))


@pytest.fixture(scope="module")
def linear_heads() -> list[tuple[LogRegHead | LinearSVMHead, np.ndarray]]:
    """Fitted linear heads of every kind ``numpy_predict`` applies, on 2 and 4 classes, and rows to predict."""
    out = []
    for kind, cls in (("logreg", LogRegHead), ("linear-svm", LinearSVMHead)):
        assert cls.kind == kind and cls.state_names == ARRAYS[kind]
        for centers in (2, 4):
            X, y = make_blobs(n_samples=400, centers=centers, n_features=48, cluster_std=6.0, random_state=centers)
            labels = np.array(["bird", "cat", "dog", "eel"])[y] if centers == 4 else y + 10
            out.append((cls(Cs=(0.01, 1.0), threads=1).fit(X[:300], labels[:300]), X[300:]))  # float64 rows
    assert {h.kind for h, _ in out} == set(ARRAYS)
    return out


def test_bundles_of_linear_heads_predict_bit_for_bit_what_the_estimator_does_without_sklearn(linear_heads, tmp_path):
    fp = "f" * 20
    code = ("import sys, numpy as np; from featcache.classify.bundle import load_bundle; "
            "got = {d: load_bundle(d).predict_proba(np.load(x), 'ffffffffffffffffffff') "
            "for d, x in zip(sys.argv[1::2], sys.argv[2::2])}; "
            "assert 'sklearn' not in sys.modules and 'torch' not in sys.modules, 'heavy import'; "
            "np.savez(sys.argv[1] + '/../proba.npz', *got.values())")
    args = []
    for i, (head, X) in enumerate(linear_heads):
        save_bundle(tmp_path / f"h{i}", head, fingerprint=fp, canon={}, backbone={"name": "test"}, tap="final")
        np.save(tmp_path / f"x{i}.npy", X)
        args += [str(tmp_path / f"h{i}"), str(tmp_path / f"x{i}.npy")]
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=300)
    assert proc.returncode == 0, proc.stderr
    fresh = np.load(tmp_path / "proba.npz")
    for i, (head, X) in enumerate(linear_heads):
        want = head.predict_proba(X)
        bundle = load_bundle(tmp_path / f"h{i}")
        for got in (fresh[f"arr_{i}"], bundle.predict_proba(X, fp), bundle.predict_proba(X.astype(np.float32), fp),
                    bundle.head.predict_proba(X)):
            assert got.dtype == want.dtype and np.array_equal(got, want), (head.kind, np.abs(got - want).max())
        assert (head.classes_[want.argmax(1)] == head.predict(X)).all()
        assert type(bundle.head) is type(head) and bundle.labels == head.classes_.tolist()
        for bad in (X[:, :-1], X[0], X[:0], np.where(np.arange(X.shape[1]) == 2, np.nan, X)):
            with pytest.raises(HeadInputError):
                head.predict_proba(bad)
            with pytest.raises(HeadInputError):
                bundle.predict_proba(bad, fp)


def test_a_linear_bundle_whose_state_does_not_fit_is_refused_at_load(linear_heads, tmp_path):
    head = next(h for h, _ in linear_heads if h.kind == "linear-svm")
    out = save_bundle(tmp_path / "h", head, fingerprint="f" * 20, canon={}, backbone={}, tap="final")
    state = load_file(str(out / STATE))
    save_file({**state, "coef_": state["coef_"][:, :-1].copy()}, str(out / STATE))
    with pytest.raises(UsageError, match=r"coef_ has shape \(\d+, 47\), expected \(\d+, 48\)"):
        load_bundle(out)
    save_file({k: v for k, v in state.items() if k != "temperature_"}, str(out / STATE))
    with pytest.raises(UsageError, match=r"lacks \['temperature_'\]"):
        load_bundle(out)
