"""A cold start that does no needless work: a re-run with nothing new loads no model and imports no
torch, and a cache keeps the precision it was built with (real caches, real JPEGs, real weights)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from featcache.errors import UsageError
from featcache.extract.pipeline import ExtractConfig, Extraction
from featcache.store.cache import FeatureCache

ROOT = Path(__file__).resolve().parents[1]
# ``python -m featcache.cli ARGS``, reporting on stderr which heavy modules the process imported by its exit
WATCH = ("torch", "torchvision", "timm", "openvino")
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


@pytest.fixture()
def half(imagenet_dir, tmp_path) -> tuple[Path, Path]:
    """A copy of the ImageNet-20 folder holding 12 photos, and a folder of the 8 others, held back."""
    src = tmp_path / "src"
    shutil.copytree(imagenet_dir, src)
    held = tmp_path / "held"
    for p in sorted(src.rglob("*.jpg"))[12:]:
        dest = held / p.relative_to(src)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(p, dest)
    return src, held


def test_noop_rerun_imports_no_torch_and_loads_no_model(half, tmp_path):
    src, _ = half
    cache = tmp_path / "c"
    first, ex = extract(src, cache)
    assert first["extracted"] == 12 and ex.loaded

    again, imported, proc = cli_imports("extract", str(src), "--cache", str(cache), "--json", "-q")
    assert proc.returncode == 0, proc.stderr
    assert imported == [], f"a re-run with nothing to compute imported {imported}"
    assert again["fingerprint"] == first["fingerprint"] and again["precision"] == "fp32"
    assert again["extracted"] == 0 and again["already_cached"] == 12
    assert again["model_loaded"] is False and again["timings"].get("model", 0) == 0

    for args in (["--help"], ["backbones", "--json"], ["info", "--cache", str(cache), "--json"]):
        _, imported, proc = cli_imports(*args)
        assert proc.returncode == 0, proc.stderr
        assert imported == [], f"featcache {' '.join(args)} imported {imported}"


def test_new_images_after_a_noop_get_the_vectors_of_a_fresh_run(half, tmp_path, monkeypatch):
    """The kept fingerprint is rebuilt (and checked) only when new images need the model."""
    src, held = half
    cache = tmp_path / "c"
    first, _ = extract(src, cache)
    monkeypatch.setenv("FEATCACHE_PRECISION", "bf16")  # what auto would choose now: the cache keeps fp32
    noop, ex = extract(src, cache)
    assert noop["fingerprint"] == first["fingerprint"] and noop["extracted"] == 0 and not ex.loaded
    shutil.copytree(held, src, dirs_exist_ok=True)
    grown, ex = extract(src, cache)
    assert ex.loaded and grown["model_loaded"] and grown["extracted"] == 8
    assert grown["fingerprint"] == first["fingerprint"] and grown["precision"] == "fp32"

    monkeypatch.setenv("FEATCACHE_PRECISION", "fp32")
    fresh, _ = extract(src, tmp_path / "fresh")
    assert fresh["fingerprint"] == first["fingerprint"]
    a, b = FeatureCache(cache).read(first["fingerprint"]), FeatureCache(tmp_path / "fresh").read(first["fingerprint"])
    assert len(a.sha256) == len(b.sha256) == 20
    order_a, order_b = np.argsort(a.sha256), np.argsort(b.sha256)
    assert (a.sha256[order_a] == b.sha256[order_b]).all()
    np.testing.assert_array_equal(a.vectors[order_a], b.vectors[order_b])


def test_explicit_other_precision_is_a_new_fingerprint_beside_the_kept_one(half, tmp_path, monkeypatch):
    src, _ = half
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
    assert other["extracted"] == 12
    assert sorted(FeatureCache(cache).fingerprints()) == sorted([first["fingerprint"], other["fingerprint"]])
    again, ex = extract(src, cache, precision="bf16")  # an explicit precision the cache holds: kept, no model
    assert again["fingerprint"] == first["fingerprint"] and again["extracted"] == 0 and not ex.loaded


def test_a_new_tap_on_a_kept_cache_loads_the_model_for_its_catch_up(half, tmp_path):
    src, _ = half
    cache = tmp_path / "c"
    first, _ = extract(src, cache)
    grown, ex = extract(src, cache, taps=["final", "stage3"])
    assert ex.loaded and grown["fingerprint"] == first["fingerprint"]
    assert grown["taps"] == ["final", "stage3"] and grown["extracted"] == 12
    feats = FeatureCache(cache).read(first["fingerprint"], "stage3")
    assert feats.vectors.shape[0] == 12 and np.isfinite(feats.vectors).all()
    with pytest.raises(UsageError, match="unknown tap"):
        extract(src, cache, taps=["no-such-tap"])
