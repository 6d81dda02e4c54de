"""Runtimes and precisions: parity with torch fp32 on real photos, int8's recorded calibration,
the accuracy gate and auto's recorded choice, fingerprints, and torch-free cold start."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from featcache.datasets import tuxpaint_items
from featcache.errors import FingerprintMismatch, UsageError
from featcache.extract.decode import load_image
from featcache.extract.embedder import Embedder, embedder_for
from featcache.extract.pipeline import ExtractConfig, Extraction
from featcache.extract.runtimes import choice
from featcache.extract.runtimes.calibration import MIN_CALIBRATION_IMAGES, Calibration
from featcache.extract.spec import fingerprint
from featcache.store.cache import FeatureCache

pytest.importorskip("openvino")
pytest.importorskip("nncf")

CLI = [sys.executable, "-m", "featcache.cli"]


@pytest.fixture(scope="module", autouse=True)
def model_cache(tmp_path_factory):
    """Prepared models and recorded choices of this module live in a temporary model cache; ``auto`` is measured."""
    root = tmp_path_factory.mktemp("models")
    mp = pytest.MonkeyPatch()
    mp.setenv("FEATCACHE_MODEL_CACHE", str(root))
    mp.delenv(choice.RUNTIME_ENV, raising=False)  # conftest pins torch fp32 for the rest of the suite
    mp.delenv(choice.PRECISION_ENV, raising=False)
    yield root
    mp.undo()


@pytest.fixture(scope="module")
def photos(lite0):
    return choice.photos(lite0.spec.preprocess)


@pytest.fixture(scope="module")
def reference(lite0, photos):
    return Embedder(lite0, ["final", "stage3"], "cpu", "fp32", runtime="torch").embed(photos[0])


@pytest.fixture(scope="module")
def tux_calibration():
    items = tuxpaint_items()
    return Calibration.from_files([p for p, _ in items], [str(p) for p, _ in items], source="tux")


@pytest.fixture(scope="module")
def int8_calibration():
    """What the tests that quantise calibrate on: 64 of the stamps (the fewest ``auto`` calibrates int8 on).

    NNCF's statistics pass costs about a tenth of a second per image here, so all 240 would cost ~20 s
    more per quantisation and check nothing more; one model serves both tests (same fingerprint and taps).
    """
    items = tuxpaint_items()
    return Calibration.from_files([p for p, _ in items], [str(p) for p, _ in items], MIN_CALIBRATION_IMAGES, "tux")


@pytest.fixture(scope="module")
def gate(model_cache, lite0, int8_calibration):
    """The gate measured once into this module's model cache (short timings); the tests that read it ask for it."""
    return choice.measure(lite0, seconds=0.3, rounds=1, calibration=int8_calibration)


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def test_openvino_fp32_matches_torch_and_shares_its_fingerprint(lite0, photos, reference):
    torch_fp32 = Embedder(lite0, ["final", "stage3"], "cpu", "fp32", runtime="torch")
    ov = Embedder(lite0, ["final", "stage3"], "cpu", "fp32", runtime="openvino")
    assert ov.fingerprint == torch_fp32.fingerprint and "runtime" not in ov.canon
    out = ov.embed(photos[0], pad_to=24)
    for tap in ("final", "stage3"):
        assert out[tap].shape == reference[tap].shape and out[tap].dtype == np.float32
        assert cosines(out[tap], reference[tap]).min() > 0.99999  # well inside the 0.9999 sharing rule
    assert (ov.prepared_dir() / "model.xml").is_file()  # prepared once, on disk


def test_fingerprints_keep_old_caches_and_split_what_differs(lite0, tux_calibration):
    spec, sha = lite0.spec, lite0.weights_sha256
    assert fingerprint(spec, sha, "fp32") == fingerprint(spec, sha, "fp32", runtime="openvino")
    torch_bf16 = fingerprint(spec, sha, "bf16")
    assert "runtime" not in torch_bf16[1]  # the torch descriptions are unchanged: old caches keep their fingerprints
    assert fingerprint(spec, sha, "bf16", runtime="openvino")[0] != torch_bf16[0]
    int8 = Embedder(lite0, ["final"], "cpu", "int8", runtime="openvino", calibration=tux_calibration)
    q = int8.canon["quantization"]
    assert q["calibration"]["images"] == len(tux_calibration) == 240
    assert q["calibration"]["sha256"] == tux_calibration.digest
    assert q["fp32_convolutions"] == lite0.early_convolutions() == 9
    other = Calibration(tux_calibration.files[:100], "fewer")
    assert Embedder(lite0, ["final"], "cpu", "int8", runtime="openvino", calibration=other).fingerprint != int8.fingerprint


def test_int8_embeds_close_to_fp32_and_refuses_what_it_cannot_do(lite0, photos, reference, int8_calibration):
    int8 = Embedder(lite0, ["final", "stage3"], "cpu", "int8", runtime="openvino", calibration=int8_calibration)
    assert len(int8.calibration) == MIN_CALIBRATION_IMAGES
    out = int8.embed(photos[0])
    assert cosines(out["final"], reference["final"]).min() > 0.99
    assert set(out) == {"final", "stage3"}
    with pytest.raises(UsageError, match="int8"):
        Embedder(lite0, ["final"], "cpu", "int8", runtime="torch", calibration=int8_calibration)
    with pytest.raises(UsageError, match="calibrate"):
        Embedder(lite0, ["final"], "cpu", "int8", runtime="openvino")
    with pytest.raises(UsageError, match="pooled"):
        Embedder(lite0, ["raw:stage2"], "cpu", "int8", runtime="openvino", calibration=int8_calibration)


def test_gate_records_figures_and_auto_reads_the_choice(lite0, gate):
    entry = gate
    rows = {(r["runtime"], r["precision"]): r for r in entry["rows"]}
    assert rows["torch", "fp32"]["min_cosine"] == pytest.approx(1.0) and rows["torch", "fp32"]["passes"]
    assert rows["openvino", "fp32"]["passes"] and rows["openvino", "fp32"]["min_cosine"] > 0.99999
    assert rows["torch", "fp32"]["top1"] == entry["gate"]["fp32_top1"] >= 18
    for r in rows.values():
        if r["available"]:
            assert r["passes"] == (r["min_cosine"] >= 0.995 and r["top1"] >= entry["gate"]["fp32_top1"])
            assert r["images_per_second"] > 0
    best = max((r for r in rows.values() if r["passes"]), key=lambda r: r["images_per_second"])
    assert entry["choice"] == {"runtime": best["runtime"], "precision": best["precision"]}
    doc = json.loads(choice.record_path().read_text())
    assert doc["cpu"] == entry["cpu"] and "backbones" in doc
    # auto reads the record: same choice, nothing measured again
    stamp = entry["measured_at"]
    runtime, precision = choice.choose(lite0, int8=True)
    assert (runtime, precision) == (best["runtime"], best["precision"])
    assert choice.recorded(lite0)["measured_at"] == stamp
    emb = Embedder(lite0, ["final"], "cpu", "fp32")  # precision given, runtime auto: the recorded fastest fp32
    fp32_rows = [r for r in rows.values() if r["precision"] == "fp32"]
    assert emb.runtime == max(fp32_rows, key=lambda r: r["images_per_second"])["runtime"]


def test_cli_backbones_shows_the_recorded_choice_without_torch(model_cache, gate):
    code = ("import sys, json, io, contextlib\nfrom featcache.cli import main\nbuf = io.StringIO()\n"
            "with contextlib.redirect_stdout(buf): rc = main(['backbones', '--json'])\n"
            "print(json.dumps({'rc': rc, 'torch': 'torch' in sys.modules, 'out': json.loads(buf.getvalue())}))")
    env = {**os.environ, "FEATCACHE_MODEL_CACHE": str(model_cache)}
    res = json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                                    check=True).stdout)
    assert res["rc"] == 0 and not res["torch"]
    lite = next(b for b in res["out"]["backbones"] if b["name"] == "efficientnet_lite0")
    assert lite["auto"] is not None  # the gate's record (same model cache)
    for argv in (["--help"], ["info", "--cache", str(model_cache / "no-cache")]):
        probe = f"import sys\nfrom featcache.cli import main\ntry: main({argv!r})\nexcept SystemExit: pass\nprint('torch' in sys.modules)"
        out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env).stdout
        assert out.strip().splitlines()[-1] == "False", argv


def test_int8_cache_is_reproduced_by_embedder_for_even_without_the_prepared_model(
        lite0, imagenet_dir, tmp_path, model_cache):
    cache = tmp_path / "c"
    ex = Extraction(ExtractConfig(str(imagenet_dir), str(cache), precision="int8", runtime="auto", progress=False))
    summary = ex.run()
    assert summary["precision"] == "int8" and summary["extracted"] == 20
    c = FeatureCache(cache)
    feats = c.read(summary["fingerprint"])
    attrs = c.group_attrs(summary["fingerprint"])
    assert attrs["fingerprint"]["quantization"]["calibration"]["images"] == 20
    img = torch.stack([load_image((imagenet_dir / k).read_bytes(), lite0.spec.preprocess) for k in feats.keys[:4]])
    again = embedder_for(attrs["backbone"], attrs["fingerprint"], ["final"], "cpu", cache=str(cache))
    assert again.fingerprint == summary["fingerprint"]
    np.testing.assert_allclose(again.embed(img)["final"], feats.vectors[:4], rtol=0, atol=1e-4)
    with pytest.raises(FingerprintMismatch, match="int8"):
        embedder_for(attrs["backbone"], attrs["fingerprint"], ["final"], "cpu", precision="fp32")
    # another machine: no prepared model; quantised again on the recorded images found in the cache
    shutil.rmtree(again.prepared_dir())
    fresh = embedder_for(attrs["backbone"], attrs["fingerprint"], ["final"], "cpu", cache=str(cache))
    assert fresh.fingerprint == summary["fingerprint"]
    assert cosines(fresh.embed(img)["final"], feats.vectors[:4]).min() > 0.9999


def test_resolve_keeps_what_a_cache_was_built_with_without_loading_a_model(lite0):
    from featcache.extract.registry import weights_sha256
    from featcache.extract.runtimes import resolve, same_backbone

    spec, sha = lite0.spec, lite0.weights_sha256
    assert weights_sha256(spec) == sha  # the fingerprint's digest, computed without torch
    fp32, bf16 = fingerprint(spec, sha, "fp32")[1], fingerprint(spec, sha, "bf16", runtime="openvino")[1]
    assert same_backbone(fp32, bf16) and not same_backbone(fp32, fingerprint(spec, "other", "fp32")[1])
    assert resolve("auto", "auto", None) == ("auto", "auto")
    assert resolve("auto", "auto", bf16) == ("openvino", "bf16")  # auto elsewhere does not fork the cache
    assert resolve("auto", "auto", fp32) == ("auto", "fp32")  # fp32: any runtime gives these numbers
    assert resolve("auto", "int8", fp32) == ("auto", "int8")  # told otherwise: a new fingerprint beside it
    with pytest.raises(UsageError, match="openvino"):
        resolve("torch", "auto", bf16)
