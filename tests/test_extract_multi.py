"""Several backbones in one run: each image read and decoded once, one fingerprint group each."""

from __future__ import annotations

import numpy as np

from featcache.extract.pipeline import ExtractConfig, Extraction
from featcache.store.cache import FeatureCache


def test_two_backbones_in_one_run_equal_two_single_runs(imagenet_dir, tmp_path, lite0_embedder, mnv2_embedder):
    mnv2 = mnv2_embedder
    cfg = ExtractConfig(str(imagenet_dir), str(tmp_path / "both"), progress=False)
    both = Extraction(cfg, [lite0_embedder, mnv2]).run()
    assert [b["fingerprint"] for b in both["backbones"]] == [lite0_embedder.fingerprint, mnv2.fingerprint]
    assert both["extracted"] == 20 and both["failed"] == 0
    for emb in (lite0_embedder, mnv2):
        single = tmp_path / emb.spec.name
        Extraction(ExtractConfig(str(imagenet_dir), str(single), progress=False), emb).run()
        a = FeatureCache(tmp_path / "both").read(emb.fingerprint)
        b = FeatureCache(single).read(emb.fingerprint)
        ia, ib = np.argsort(a.sha256), np.argsort(b.sha256)
        assert a.sha256[ia].tolist() == b.sha256[ib].tolist()
        np.testing.assert_allclose(a.vectors[ia], b.vectors[ib], rtol=1e-5, atol=1e-5)
    # adding a backbone to a cache computes only that backbone
    grown = tmp_path / lite0_embedder.spec.name
    again = Extraction(ExtractConfig(str(imagenet_dir), str(grown), progress=False), [lite0_embedder, mnv2]).run()
    assert again["extracted"] == 20 and again["already_cached"] == 0
    cache = FeatureCache(grown)
    assert len(cache.read(lite0_embedder.fingerprint)) == 20 == len(cache.read(mnv2.fingerprint))
    assert cache.info()["fingerprints"][0]["rows"] == 20  # no second row for lite0
    noop = Extraction(ExtractConfig(str(imagenet_dir), str(grown), progress=False), [lite0_embedder, mnv2]).run()
    assert noop["extracted"] == 0 and noop["timings"].get("model", 0) == 0
