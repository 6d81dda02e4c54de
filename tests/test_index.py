"""faiss indexes over real cached vectors: exact vs approximate, manifests, in-place updates, CLI."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from featcache.cli import main
from featcache.errors import FingerprintMismatch, NotFoundError
from featcache.extract.pipeline import ExtractConfig, Extraction
from featcache.store.cache import FeatureCache
from featcache.store.index import CacheMismatch, IndexParams, VectorIndex, build_from_cache, dedupe, normalise


@pytest.fixture(scope="module")
def feats(imagenet_cache):
    return FeatureCache(imagenet_cache).read()


def test_flat_index_is_exact_and_round_trips(imagenet_cache, feats, tmp_path):
    out = tmp_path / "idx"
    summary = build_from_cache(imagenet_cache, out)
    assert summary["action"] == "built" and summary["kind"] == "flat" and summary["count"] == len(feats)
    manifest = json.loads((out / "manifest.json").read_text())
    attrs = FeatureCache(imagenet_cache).group_attrs(feats.fingerprint)
    assert manifest["fingerprint"] == feats.fingerprint
    assert manifest["fingerprint_description"] == attrs["fingerprint"]
    assert manifest["backbone"]["name"] == attrs["backbone"]["name"]
    assert manifest["tap"] == "final" and manifest["recall_at_10"] == 1.0 and manifest["memory_bytes"] > 0
    assert not list(out.glob("*.pkl")) and (out / "keys.npy").is_file()
    np.load(out / "keys.npy", allow_pickle=False)  # plain arrays, no pickle

    vi = VectorIndex.load(out)
    x = normalise(feats.vectors)
    sims = x @ x.T
    for q in range(len(feats)):
        hits = vi.search_key(str(feats.keys[q]), k=5)
        order = [j for j in np.argsort(-sims[q]) if j != q][:5]
        assert [h.key for h in hits] == [str(feats.keys[j]) for j in order]
        assert hits[0].score == pytest.approx(float(sims[q, order[0]]), abs=1e-5)
    with pytest.raises(NotFoundError):
        vi.search_key("no/such/key.jpg")
    with pytest.raises(FingerprintMismatch):
        vi.check("0" * 20)


@pytest.mark.parametrize("kind", ["hnsw", "ivf"])
def test_approximate_index_tunes_to_target_recall(feats, kind):
    # 20 real vectors are few for IVF/HNSW: replicate nothing, just use them as they are
    vi = VectorIndex.build(feats.vectors, np.arange(len(feats)), feats.keys, feats.sha256, fingerprint=feats.fingerprint,
                           canon={}, backbone={"name": "efficientnet_lite0"}, tap="final",
                           params=IndexParams(kind=kind, eval_queries=10))
    assert vi.kind == kind
    assert vi.manifest["recall_at_10"] >= 0.9
    assert "held-out" in vi.manifest["recall_note"]
    hits = vi.search(feats.vectors[:1], k=3)[0]
    assert hits[0].key == str(feats.keys[0]) and hits[0].score == pytest.approx(1.0, abs=1e-5)


def test_index_grows_and_shrinks_with_the_cache(tmp_path, imagenet_dir, lite0_embedder):
    src = tmp_path / "src"
    shutil.copytree(imagenet_dir, src)
    files = sorted(p for p in src.rglob("*.jpg"))
    stash = tmp_path / "stash"
    stash.mkdir()
    for p in files[12:]:  # start with 12 images
        p.rename(stash / f"{p.parent.name}__{p.name}")
    cache = tmp_path / "cache"
    Extraction(ExtractConfig(str(src), str(cache), progress=False), lite0_embedder).run()
    kinds = ("flat", "hnsw", "ivf")
    created = {}
    for kind in kinds:
        build_from_cache(cache, tmp_path / kind, params=IndexParams(kind=kind, eval_queries=4))
        vi = VectorIndex.load(tmp_path / kind)
        assert vi.kind == kind and vi.manifest["count"] == 12
        created[kind] = vi.manifest["created"]

    for p in stash.iterdir():  # the collection grows
        label, name = p.name.split("__")
        (src / label).mkdir(exist_ok=True)
        p.rename(src / label / name)
    Extraction(ExtractConfig(str(src), str(cache), progress=False), lite0_embedder).run()
    for kind in kinds:
        s = build_from_cache(cache, tmp_path / kind)
        assert s["action"] == "updated" and s["added"] == 8 and s["removed"] == 0 and s["count"] == 20

    gone = files[0]
    gone_key = gone.relative_to(src).as_posix()
    gone.unlink()  # an image is removed from the collection
    feats = FeatureCache(cache).read()
    x = normalise(feats.vectors)
    for kind in kinds:
        s = build_from_cache(cache, tmp_path / kind)
        assert s["removed"] == 1 and s["count"] == 19
        vi = VectorIndex.load(tmp_path / kind)
        assert len(vi.manifest["updates"]) == 2
        assert vi.manifest["created"] == created[kind]  # updated in place, not rebuilt
        for q in x[:5]:
            assert gone_key not in [h.key for h in vi.search(q[None], k=19)[0]]
        with pytest.raises(NotFoundError):
            vi.search_key(gone_key)
        if kind == "flat":  # exact: neighbours of every remaining key match brute force
            live = [i for i, k in enumerate(feats.keys.tolist()) if k != gone_key]
            for q in live[:5]:
                sims = x[live] @ x[q]
                want = [feats.keys[live[j]] for j in np.argsort(-sims) if live[j] != q][:3]
                assert [h.key for h in vi.search_key(str(feats.keys[q]), 3)] == [str(w) for w in want]


def test_cli_index_search_dedupe(imagenet_cache, imagenet_dir, tmp_path, capsys):
    out = tmp_path / "idx"
    assert main(["index", "--cache", str(imagenet_cache), "--out", str(out), "--json"]) == 0
    built = json.loads(capsys.readouterr().out)
    assert built["count"] == 20 and built["kind"] == "flat"
    img = sorted(Path(imagenet_dir).rglob("*.jpg"))[3]
    key = img.relative_to(imagenet_dir).as_posix()
    assert main(["search", "--index", str(out), str(img), "-k", "3", "--json"]) == 0
    by_image = json.loads(capsys.readouterr().out)
    assert by_image["hits"][0]["key"] == key and by_image["hits"][0]["score"] > 0.9999
    assert main(["search", "--index", str(out), "--key", key, "-k", "3", "--json"]) == 0
    by_key = json.loads(capsys.readouterr().out)
    assert len(by_key["hits"]) == 3 and key not in [h["key"] for h in by_key["hits"]]
    assert main(["search", "--index", str(out), "--key", "nope", "--json"]) == 3  # NotFoundError exit code
    capsys.readouterr()
    assert main(["dedupe", "--cache", str(imagenet_cache), "--threshold", "0.5", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["images"] == 20 and all(g["min_cosine"] <= 1.0 and g["size"] >= 2 for g in d["groups"])


def test_dedupe_finds_mirrored_pairs(tmp_path, imagenet_dir, lite0_embedder):
    from PIL import Image

    src = tmp_path / "src"
    src.mkdir()
    originals = sorted(Path(imagenet_dir).rglob("*.jpg"))[:4]
    for i, p in enumerate(originals):
        img = Image.open(p).convert("RGB")
        img.save(src / f"{i}.png")
        img.resize((300, 300)).save(src / f"{i}_resized.jpg", quality=85)  # same photo, other size and codec
    cache = tmp_path / "cache"
    Extraction(ExtractConfig(str(src), str(cache), labels="none", progress=False), lite0_embedder).run()
    d = dedupe(cache, threshold=0.9)
    pairs = sorted(tuple(sorted(g["keys"])) for g in d["groups"])
    assert pairs == [(f"{i}.png", f"{i}_resized.jpg") for i in range(4)]


def _small_cache(tmp_path: Path, imagenet_dir, embedder, name: str, n: int) -> Path:
    """A real cache of the first ``n`` ImageNet JPEGs (same backbone, so the same fingerprint as imagenet_cache)."""
    src = tmp_path / f"{name}-src"
    for p in sorted(Path(imagenet_dir).rglob("*.jpg"))[:n]:
        (src / p.parent.name).mkdir(parents=True, exist_ok=True)
        shutil.copy(p, src / p.parent.name / p.name)
    cache = tmp_path / name
    Extraction(ExtractConfig(str(src), str(cache), progress=False), embedder).run()
    return cache


def test_an_index_belongs_to_the_cache_it_was_built_from(imagenet_cache, imagenet_dir, tmp_path, lite0_embedder, capsys):
    """Two caches of one fingerprint: updating B's index from A is refused (ids are row numbers), naming both."""
    other = _small_cache(tmp_path, imagenet_dir, lite0_embedder, "other", 6)
    assert FeatureCache(other).resolve_fingerprint() == FeatureCache(imagenet_cache).resolve_fingerprint()
    out = tmp_path / "idx"
    build_from_cache(other, out)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["source"] == {"cache": str(other.resolve()), "cache_uid": FeatureCache(other).uid}
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(CacheMismatch, match=f"built from cache {other} .*not from cache {imagenet_cache} "):
        build_from_cache(imagenet_cache, out)
    with pytest.raises(CacheMismatch):
        VectorIndex.load(out).update_from_cache(FeatureCache(imagenet_cache))
    assert main(["index", "--cache", str(imagenet_cache), "--out", str(out), "--json"]) == 5  # the fingerprint exit code
    err = json.loads(capsys.readouterr().out)
    assert err["error"] == "CacheMismatch" and FeatureCache(other).uid in err["message"]
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # nothing merged, nothing written

    moved = other.rename(tmp_path / "moved")  # the same cache elsewhere: its uid still matches
    s = build_from_cache(moved, out)
    assert s["action"] == "updated" and s["added"] == 0 and s["count"] == 6
    assert json.loads((out / "manifest.json").read_text())["source"]["cache"] == str(moved.resolve())


def test_index_and_cache_from_before_uids_are_matched_by_path(imagenet_dir, tmp_path, lite0_embedder):
    """An index with no recorded uid is matched by the cache's resolved path, and adopts the uid the cache gets."""
    cache = _small_cache(tmp_path, imagenet_dir, lite0_embedder, "old", 5)
    other = _small_cache(tmp_path, imagenet_dir, lite0_embedder, "old-other", 5)
    zarr_json = cache / "zarr.json"  # make it a cache from before uids: no "id" in its attributes
    meta = json.loads(zarr_json.read_text())
    del meta["attributes"]["featcache"]["id"]
    zarr_json.write_text(json.dumps(meta))
    assert FeatureCache(cache).uid is None
    out = tmp_path / "idx"
    build_from_cache(cache, out)
    assert json.loads((out / "manifest.json").read_text())["source"]["cache_uid"] is None
    assert build_from_cache(cache, out)["action"] == "updated"  # same path: accepted
    with pytest.raises(CacheMismatch, match="id none"):
        build_from_cache(other, out)  # another path, whatever its uid

    uid = FeatureCache(cache, create=True).uid  # its next writer gives the cache a uid
    assert uid
    build_from_cache(cache, out)  # still the recorded path: accepted, and the index now records the uid
    assert json.loads((out / "manifest.json").read_text())["source"]["cache_uid"] == uid


def test_index_out_that_cannot_be_written_fails_before_building(imagenet_cache, tmp_path):
    """``--out`` under a regular file: OSError (the CLI's exit code 8) before any vector is read."""
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(NotADirectoryError):
        build_from_cache(imagenet_cache, blocker / "idx")
    with pytest.raises(FileExistsError):
        build_from_cache(imagenet_cache, blocker)
