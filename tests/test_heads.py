"""Heads on the cache (issue 3), on the real Tux Paint cache through EfficientNet-Lite0."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from sklearn.base import clone
from sklearn.model_selection import GridSearchCV
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import Normalizer

from featcache.classify.bundle import load_bundle, save_bundle
from featcache.classify.data import holdout_split, load_labelled, source_split
from featcache.classify.heads import KNNHead, LinearSVMHead, LogRegHead, MLPHead
from featcache.cli import main
from featcache.errors import FingerprintMismatch
from featcache.store.cache import FeatureCache


@pytest.fixture(scope="module")
def tux(tux_cache):
    data = load_labelled(FeatureCache(tux_cache))
    tr, te = holdout_split(data.y, 0.25, seed=0)
    return data, tr, te


def test_heads_learn_real_classes(tux):
    data, tr, te = tux
    chance = np.unique(data.y[te], return_counts=True)[1].max() / len(te)
    for head in (LogRegHead(), LinearSVMHead(), KNNHead(n_neighbors=5), MLPHead(max_epochs=30)):
        head.fit(data.X[tr], data.y[tr])
        acc = head.score(data.X[te], data.y[te])
        proba = head.predict_proba(data.X[te])
        assert acc > 0.7 > chance + 0.3, (head.kind, acc)
        assert proba.shape == (len(te), 7) and np.allclose(proba.sum(1), 1, atol=1e-4)
        assert list(head.classes_) == sorted(set(data.y))
        assert (head.predict(data.X[te]) == head.classes_[proba.argmax(1)]).all()


def test_sklearn_contract_pipeline_and_gridsearch(tux):
    data, tr, te = tux
    head = LogRegHead(C=0.1)
    assert clone(head).get_params() == head.get_params()
    assert not hasattr(clone(head), "coef_")
    pipe = make_pipeline(Normalizer(), LogRegHead(C=1.0)).fit(data.X[tr], data.y[tr])
    assert pipe.score(data.X[te], data.y[te]) > 0.7
    grid = GridSearchCV(KNNHead(), {"n_neighbors": [1, 5]}, cv=3).fit(data.X[tr], data.y[tr])
    assert grid.best_params_["n_neighbors"] in (1, 5) and grid.score(data.X[te], data.y[te]) > 0.6


def test_logreg_picks_C_on_validation_and_mlp_is_seeded(tux):
    data, tr, _ = tux
    lr = LogRegHead().fit(data.X[tr], data.y[tr])
    assert lr.C_ in lr.default_Cs and len(lr.validation_) == len(lr.default_Cs)
    a = MLPHead(max_epochs=5, random_state=3).fit(data.X[tr], data.y[tr])
    b = MLPHead(max_epochs=5, random_state=3).fit(data.X[tr], data.y[tr])
    assert np.array_equal(a.w1_, b.w1_) and 1 <= a.best_epoch_ <= a.n_epochs_ <= 5


def test_bundle_loads_in_fresh_process_and_refuses_other_fingerprint(tux, tux_cache, tmp_path):
    data, tr, te = tux
    cache = FeatureCache(tux_cache)
    attrs = cache.group_attrs(data.fingerprint)
    for head in (LogRegHead(C=0.3), MLPHead(max_epochs=3)):
        head.fit(data.X[tr], data.y[tr])
        out = save_bundle(tmp_path / head.kind, head, fingerprint=data.fingerprint, canon=attrs["fingerprint"],
                          backbone=attrs["backbone"], tap="final")
        assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "state.safetensors"]
        np.save(tmp_path / "x.npy", data.X[te])
        code = ("import sys, numpy as np; from featcache.classify.bundle import load_bundle; "
                "b = load_bundle(sys.argv[1]); x = np.load(sys.argv[2]); "
                "np.save(sys.argv[3], b.predict_proba(x, b.fingerprint))")
        subprocess.run([sys.executable, "-c", code, str(out), str(tmp_path / "x.npy"), str(tmp_path / "p.npy")],
                       check=True)
        assert np.allclose(np.load(tmp_path / "p.npy"), head.predict_proba(data.X[te]), atol=1e-5)
    bundle = load_bundle(tmp_path / "logreg")
    m = bundle.manifest
    assert m["fingerprint_description"] == attrs["fingerprint"] and m["labels"] == sorted(set(data.y))
    assert "torch" in m["versions"] and m["head"]["type"] == "logreg"
    with pytest.raises(FingerprintMismatch) as e:
        bundle.predict_proba(data.X[te], "0123456789abcdef0123")
    assert data.fingerprint in str(e.value) and "0123456789abcdef0123" in str(e.value)


def test_test_source_matches_images_by_content(tux, tux_csv, tmp_path):
    data, _, _ = tux
    rows = tux_csv.read_text().splitlines()[1:]
    sub = tmp_path / "test.csv"
    sub.write_text("path,label\n" + "\n".join(rows[::4]) + "\n")
    tr, te, info = source_split(data, str(sub))
    assert info["matched_rows"] == len(te) == len(set(r.split(",")[0] for r in rows[::4]))
    assert len(tr) + len(te) == len(data)


def test_cli_train_report_predict(tux_cache, tux_csv, imagenet_dir, tmp_path, capsys):
    head, report = tmp_path / "head", tmp_path / "report.html"
    rc = main(["train", "--cache", str(tux_cache), "--head", "logreg", "knn", "--cv", "3", "--out", str(head),
               "--report", str(report), "--json"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert {r["head"] for r in out["results"]} == {"logreg", "knn"} and out["metrics"]["accuracy"] > 0.75
    html = report.read_text()
    assert html.count("data:image/png;base64,") >= 4 and "Calibration" in html
    doc = json.loads(report.with_suffix(".json").read_text())
    assert doc["misclassified"] and Path(doc["misclassified"][0]["path"]).is_file()
    assert set(doc["metrics"]["per_class"]["bird"]) >= {"precision", "recall"}
    manifest = json.loads((head / "manifest.json").read_text())
    assert manifest["metrics"]["evaluation"]["mode"] == "cv" and len(manifest["comparison"]) == 2

    cached = tux_csv.read_text().splitlines()[1].split(",")[0]
    new = next(imagenet_dir.rglob("*.jpg"))
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    rc = main(["predict", "--head", str(head), cached, str(new), str(bad), "--json"])
    res = json.loads(capsys.readouterr().out)
    assert rc == 0 and res["predicted"] == 2 and res["failed"] == 1
    by = {r["image"]: r for r in res["results"]}
    assert by[cached]["source"] == "cache" and by[str(new)]["source"] == "embedded"
    assert "error" in by[str(bad)] and by[cached]["label"] in manifest["labels"]


def test_probe_on_real_cache(tux_cache, capsys):
    assert main(["probe", "--cache", str(tux_cache), "--json"]) == 0
    pr = json.loads(capsys.readouterr().out)
    assert pr["rows"] == 240 and pr["evaluation"] == "5-fold CV" and pr["best_tap"] == "final"
    row = pr["taps"][0]
    assert row["tap"] == "final" and row["accuracy"] > 0.75 and row["interval"][0] <= row["accuracy"] <= row["interval"][1]
