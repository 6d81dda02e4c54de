"""Ensembles across backbones (issue 15): the head, ``train`` over several fingerprints, bundles, ``predict``,
``serve``.

Real data: the Tux Paint cache through EfficientNet-Lite0 (240 images), plus MobileNetV2 vectors of
a subset of those images (15 per class), so an ensemble's aligned rows leave some Lite0 rows out.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import httpx
import numpy as np
import pytest
from sklearn.base import clone
from sklearn.model_selection import GridSearchCV, cross_val_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from featcache.classify.bundle import load_bundle
from featcache.classify.data import concatenated, holdout_split, load_aligned
from featcache.classify.heads import EnsembleHead, HeadInputError, LogRegHead
from featcache.cli import main
from featcache.errors import FingerprintMismatch, UsageError
from featcache.extract.pipeline import ExtractConfig, Extraction
from featcache.service.app import create_app
from featcache.service.config import ServiceConfig
from featcache.service.state import preflight
from featcache.store.cache import FeatureCache

from .images import jpeg_bytes, real_photo
from .live import LiveServer
from .tux import per_class_csv

FAST_LOGREG = {"Cs": (0.1, 1.0), "path_iter": 5}
PER_CLASS = 15


@pytest.fixture(scope="module")
def ens_cache(tux_cache, tux_csv, mnv2_embedder, tmp_path_factory):
    """A copy of the Lite0 Tux cache plus MobileNetV2 vectors of up to 15 images per class."""
    root = tmp_path_factory.mktemp("enscache")
    cache = root / "cache"
    shutil.copytree(tux_cache, cache)
    rows = per_class_csv(tux_csv, root / "subset.csv", PER_CLASS)
    Extraction(ExtractConfig(str(root / "subset.csv"), str(cache), progress=False), mnv2_embedder).run()
    return cache, rows


@pytest.fixture(scope="module")
def aligned(ens_cache):
    cache = FeatureCache(ens_cache[0])
    fps = sorted(cache.fingerprints(), key=lambda fp: cache.group_attrs(fp)["backbone"]["name"])  # lite0, mnv2
    parts, info = load_aligned(cache, fps)
    return parts, info, fps


def test_aligned_rows_are_the_images_every_backbone_has(aligned, ens_cache):
    parts, info, fps = aligned
    _, subset = ens_cache
    assert info["rows"] == subset == len(parts[0]) == len(parts[1])
    assert info["dropped"] == {fps[0]: 240 - subset, fps[1]: 0}
    assert all((p.sha256 == parts[0].sha256).all() and (p.y == parts[0].y).all() for p in parts)
    data = concatenated(parts)
    assert data.X.shape == (subset, parts[0].X.shape[1] + parts[1].X.shape[1]) and data.fingerprint == "+".join(fps)


def test_ensemble_is_a_scikit_learn_estimator_on_blocks(aligned):
    parts, _, _ = aligned
    data = concatenated(parts)
    blocks = tuple(p.X.shape[1] for p in parts)
    head = EnsembleHead(blocks=blocks, member_params=FAST_LOGREG, folds=3)
    assert clone(head).get_params() == head.get_params() and not hasattr(clone(head), "weights_")
    pipe = make_pipeline(StandardScaler(), clone(head))
    scores = cross_val_score(pipe, data.X, data.y, cv=3)
    assert scores.min() > 0.6, scores
    grid = GridSearchCV(clone(head), [{"member": ["logreg"]}, {"member": ["knn"], "member_params": [{"n_neighbors": 5}]}],
                        cv=3).fit(data.X, data.y)
    assert grid.best_params_["member"] in ("logreg", "knn") and grid.best_score_ > 0.6
    fitted = head.fit(data.X, data.y)
    proba = fitted.predict_proba(data.X)
    assert proba.shape == (len(data), 7) and np.allclose(proba.sum(1), 1)
    assert np.isclose(fitted.weights_.sum(), 1) and (fitted.weights_ >= 0).all()
    # never worse than the best member on the validation rows: the one-hot choices are candidates
    val = fitted.validation_
    assert val[fitted.choice_]["accuracy"] >= max(val[f"member{i}"]["accuracy"] for i in range(2))
    with pytest.raises(HeadInputError, match="blocks"):
        EnsembleHead(blocks=(5, 5)).fit(data.X, data.y)
    with pytest.raises(HeadInputError, match="cannot be ensembles"):
        EnsembleHead(blocks=blocks, member="ensemble").fit(data.X, data.y)
    with pytest.raises(HeadInputError, match="no parameter"):
        EnsembleHead(blocks=blocks, member_params={"hiden": 3}).fit(data.X, data.y)


def test_a_useless_backbone_gets_no_weight_and_costs_nothing_held_out(aligned):
    """A member on pure noise: validation picks the real backbone alone, held-out accuracy equals it."""
    parts, _, _ = aligned
    real = parts[1]
    noise = np.random.default_rng(0).normal(size=(len(real), 64)).astype(np.float32)
    X = np.hstack([noise, real.X])
    tr, te = holdout_split(real.y, 0.3, seed=1)
    head = EnsembleHead(blocks=(64, real.X.shape[1]), member_params=FAST_LOGREG).fit(X[tr], real.y[tr])
    alone = LogRegHead(**FAST_LOGREG).fit(real.X[tr], real.y[tr])
    # log-loss may keep a little of the noise member's near-uniform probabilities (it smooths
    # over-confident ones); it never gets enough to move the argmax much
    assert head.weights_[0] < 0.1 and head.choice_ in ("member1", "log-loss")
    assert head.score(X[te], real.y[te]) >= alone.score(real.X[te], real.y[te]) - 1 / len(te)


def test_train_over_backbones_compares_saves_and_refuses_wrong_vectors(ens_cache, aligned, tmp_path, capsys):
    cache, subset = ens_cache
    parts, _, fps = aligned
    out, report = tmp_path / "ens", tmp_path / "report.html"
    rc = main(["train", "--cache", str(cache), "--fingerprint", *fps, "--cv", "3", "--param",
               "logreg.Cs=[0.1,1.0]", "--out", str(out), "--report", str(report), "--json"])
    res = json.loads(capsys.readouterr().out)
    assert rc == 0 and res["labelled_rows"] == subset
    by = {r["name"]: r for r in res["results"]}
    names = ["efficientnet_lite0", "mobilenet_v2"]
    assert set(by) == {f"final / logreg / {n}" for n in names} | {"final / ensemble(logreg) / 2 backbones"}
    ens = by["final / ensemble(logreg) / 2 backbones"]
    assert res["best"]["name"] == ens["name"] and ens["member"] == "logreg"
    assert set(ens["weights"]) == set(names) and set(ens["singles"]) == set(names)
    assert ens["gain_over_best_single"] == ens["accuracy"] - max(by[f"final / logreg / {n}"]["accuracy"] for n in names)
    assert {m["backbone"]: m["dropped_rows"] for m in res["members"]} == {names[0]: 240 - subset, names[1]: 0}
    assert "Ensembles" in report.read_text() and "images left out" in report.read_text()

    bundle = load_bundle(out)
    m = bundle.manifest
    assert bundle.is_ensemble and m["head"]["type"] == "ensemble" and bundle.fingerprint == "+".join(fps)
    assert [x["fingerprint"] for x in m["members"]] == fps and [x["tap"] for x in m["members"]] == ["final"] * 2
    assert [x["dim"] for x in m["members"]] == [p.X.shape[1] for p in parts]
    attrs = FeatureCache(cache).group_attrs(fps[1])
    assert m["members"][1]["fingerprint_description"] == attrs["fingerprint"]
    assert m["members"][1]["backbone"] == attrs["backbone"]
    X = concatenated(parts).X[:5]
    p = bundle.predict_proba(X, bundle.fingerprint)
    assert np.allclose(bundle.predict_proba([parts[0].X[:5], parts[1].X[:5]], fps), p)
    for wrong, named in ((fps[0], fps[1]), (fps[::-1], "another order"), ([fps[0], "0123456789abcdef0123"],
                                                                           "0123456789abcdef0123")):
        with pytest.raises(FingerprintMismatch, match=named):
            bundle.predict_proba(X, wrong)
    with pytest.raises(UsageError, match="widths"):
        bundle.predict_proba([parts[0].X[:5], parts[1].X[:5, :10]], fps)

    # no pickle: a fresh process loads the bundle and predicts the same
    np.save(tmp_path / "x.npy", X)
    code = ("import sys, numpy as np; from featcache.classify.bundle import load_bundle; "
            "b = load_bundle(sys.argv[1]); np.save(sys.argv[3], b.predict_proba(np.load(sys.argv[2]), b.fingerprint))")
    subprocess.run([sys.executable, "-c", code, str(out), str(tmp_path / "x.npy"), str(tmp_path / "p.npy")], check=True)
    assert np.allclose(np.load(tmp_path / "p.npy"), p, atol=1e-6)


@pytest.fixture(scope="module")
def ens_bundle(ens_cache, aligned, tmp_path_factory):
    """An ensemble bundle (Lite0 + MobileNetV2) trained through the CLI."""
    cache, _ = ens_cache
    _, _, fps = aligned
    out = tmp_path_factory.mktemp("ensbundle") / "ens"
    assert main(["train", "--cache", str(cache), "--fingerprint", *fps, "--test-split", "0.3",
                 "--param", "logreg.Cs=[0.3]", "--out", str(out), "--json"]) == 0
    return out


def _probabilities(result: dict) -> dict:
    return {t["label"]: t["probability"] for t in result["top"]}


def test_predict_with_an_ensemble_cached_equals_embedded(ens_cache, aligned, ens_bundle, tmp_path, capsys):
    """Parity: predict's probabilities from cached vectors equal those from freshly embedded ones."""
    cache, _ = ens_cache
    parts, _, _ = aligned
    out = ens_bundle
    capsys.readouterr()
    paths = dict(zip(FeatureCache(cache).images().sha256, FeatureCache(cache).images().path))
    images = [str(paths[s]) for s in parts[0].sha256[:6]]
    only_lite0 = next(str(p) for s, p in paths.items() if s not in set(parts[0].sha256))
    assert main(["predict", "--head", str(out), *images, only_lite0, "--json"]) == 0
    cached = json.loads(capsys.readouterr().out)
    assert [r["source"] for r in cached["results"]] == ["cache"] * 6 + ["embedded"]  # no MobileNetV2 vector cached
    assert [m["backbone"] for m in cached["members"]] == ["efficientnet_lite0", "mobilenet_v2"]

    fresh = tmp_path / "fresh"  # the same bundle, naming no cache: every member embeds every image
    shutil.copytree(out, fresh)
    manifest = json.loads((fresh / "manifest.json").read_text())
    (fresh / "manifest.json").write_text(json.dumps({**manifest, "cache": None}))
    assert main(["predict", "--head", str(fresh), *images, only_lite0, "--json", "--top", "7"]) == 0
    embedded = json.loads(capsys.readouterr().out)
    assert [r["source"] for r in embedded["results"]] == ["embedded"] * 7
    capsys.readouterr()
    assert main(["predict", "--head", str(out), *images, only_lite0, "--json", "--top", "7"]) == 0
    cached = json.loads(capsys.readouterr().out)
    for a, b in zip(cached["results"], embedded["results"]):
        pa, pb = _probabilities(a), _probabilities(b)
        assert a["label"] == b["label"] and np.allclose([pa[k] for k in pb], list(pb.values()), atol=1e-3), (a, b)


def test_serve_an_ensemble_head_answers_like_predict(ens_cache, aligned, ens_bundle, tux_cache, tmp_path, capsys):
    """A real server loads both member backbones; /v1/classify (upload or cached sha256) answers as predict does,
    for images in the cache and a photo that is not; a single-backbone head keeps serving beside it."""
    cache, _ = ens_cache
    parts, _, fps = aligned
    table = FeatureCache(cache).images()
    paths = dict(zip(table.sha256, table.path))
    shas = [str(s) for s in parts[0].sha256[:3]]
    photo = tmp_path / "photo.jpg"  # a real photo no cache holds
    photo.write_bytes(jpeg_bytes(real_photo(0)))
    files = [str(paths[s]) for s in shas] + [str(photo)]
    capsys.readouterr()
    assert main(["predict", "--head", str(ens_bundle), *files, "--json", "--top", "7"]) == 0
    want = json.loads(capsys.readouterr().out)["results"]
    assert [r["source"] for r in want] == ["cache"] * 3 + ["embedded"]
    single = tmp_path / "single"
    assert main(["train", "--cache", str(cache), "--fingerprint", fps[1], "--param", "logreg.Cs=[0.3]",
                 "--out", str(single), "--json"]) == 0
    capsys.readouterr()

    cfg = ServiceConfig(cache=str(cache), heads={"ens": str(ens_bundle), "mnv2": str(single)}, device="cpu")
    plan = preflight(cfg)  # no --fingerprint: the one both heads read (MobileNetV2), Lite0 as an ensemble member
    assert plan.fingerprint == fps[1] and plan.members == {fps[0]: ("final",)}
    with LiveServer(create_app(cfg, plan)) as srv, httpx.Client(base_url=srv.url, timeout=120) as client:
        info = client.get("/v1/info").json()
        assert {h["name"]: h["fingerprint"] for h in info["heads"]} == {"ens": "+".join(fps), "mnv2": fps[1]}
        for path, expected in zip(files, want):
            with open(path, "rb") as f:
                r = client.post("/v1/classify", files={"image": ("x.jpg", f, "image/jpeg")},
                                data={"head": "ens", "top_k": "7"})
            assert r.status_code == 200, r.text
            got = r.json()
            assert got["fingerprint"] == "+".join(fps) and got["label"] == expected["label"]
            pg, pe = {t["label"]: t["probability"] for t in got["top"]}, _probabilities(expected)
            assert np.allclose([pg[k] for k in pe], list(pe.values()), atol=1e-3), (got, expected)
        for sha, expected in zip(shas, want):  # cached vectors of both members: exactly predict's numbers
            got = client.post("/v1/classify", data={"sha256": sha, "head": "ens", "top_k": "7"}).json()
            pg, pe = {t["label"]: t["probability"] for t in got["top"]}, _probabilities(expected)
            assert np.allclose([pg[k] for k in pe], list(pe.values()), atol=1e-6), (got, expected)
        with open(files[0], "rb") as f:
            r = client.post("/v1/classify", files={"image": ("x.png", f, "image/png")}, data={"head": "mnv2"})
        assert r.status_code == 200 and r.json()["fingerprint"] == fps[1]
        r = client.get("/v1/heads/ens/review")
        assert r.status_code == 400 and "ensemble" in r.json()["message"]

    with pytest.raises(FingerprintMismatch, match="mobilenet_v2"):  # a cache without the MobileNetV2 vectors
        preflight(ServiceConfig(cache=str(tux_cache), heads={"ens": str(ens_bundle)}, device="cpu"))


def test_train_refuses_bad_ensemble_requests(ens_cache, aligned, capsys):
    cache, _ = ens_cache
    _, _, fps = aligned
    assert main(["train", "--cache", str(cache), "--fingerprint", fps[0], "ffffffff"]) == 3
    assert "ffffffff" in capsys.readouterr().err
    assert main(["train", "--cache", str(cache), "--fingerprint", *fps, "--head", "ensemble"]) == 2
    assert "--fingerprint FP1 FP2" in capsys.readouterr().err
    assert main(["train", "--cache", str(cache)]) == 2  # two fingerprints, none chosen
    assert "choose one with --fingerprint" in capsys.readouterr().err
