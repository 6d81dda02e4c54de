"""The main job, end to end on real data with real ImageNet weights and the embedded defaults.

1. Proves weights and preprocessing: the 20 ImageNet validation photos (foolbox) through
   the default backbone into a cache, then the backbone's own ImageNet classifier on the
   cached vectors (expect 18/20 top-1).
2. Embeds 240 Tux Paint stamps (7 classes) into the local cache ./featcache-cache, once.
3. Trains a logistic-regression head on the cache (5-fold CV, HTML report), builds a
   faiss index and finds an image's neighbours, labels new photos with the head.
4. Runs the extraction again: nothing to do.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

from featcache.datasets import imagenet20, write_tuxpaint_csv
from featcache.extract.embedder import embedder_for
from featcache.store.cache import FeatureCache

FC = [sys.executable, "-m", "featcache.cli"]


def step(title: str, *args: str) -> None:
    print(f"\n== {title}\n$ featcache {' '.join(args)}", flush=True)
    subprocess.run([*FC, *args], check=True)


def imagenet_check(work: Path) -> None:
    src, cache = work / "imagenet20", work / "imagenet-cache"
    for path, label in imagenet20():
        (src / str(label)).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, src / str(label) / path.name)
    step("embed 20 real ImageNet validation photos", "extract", str(src), "--cache", str(cache))
    c = FeatureCache(cache)
    feats, attrs = c.read(), c.group_attrs(c.resolve_fingerprint())
    emb = embedder_for(attrs["backbone"], attrs["fingerprint"], device="cpu")
    pred = emb.classify_imagenet(feats.vectors).argmax(1)
    truth = feats.labels.astype(int)
    names = __import__("torchvision").models.MobileNet_V2_Weights.IMAGENET1K_V1.meta["categories"]
    print(f"\n== the backbone's own ImageNet classifier on the cached vectors: top-1 {int((pred == truth).sum())}/20")
    for key, t, q in list(zip(feats.keys, truth, pred))[:4]:
        print(f"  {key:30} true {names[t]:22} predicted {names[q]}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cache", default="featcache-cache")
    p.add_argument("--work", default="demo-out")
    a = p.parse_args()
    work = Path(a.work)
    step("backbones", "backbones")
    imagenet_check(work)

    tux = write_tuxpaint_csv(work / "tuxpaint.csv")
    step("embed 240 Tux Paint stamps (7 classes) into the local cache", "extract", str(tux), "--cache", a.cache)
    step("what the cache holds", "info", "--cache", a.cache)
    step("train a head on the cache (5-fold CV)", "train", "--cache", a.cache, "--cv", "5",
         "--out", str(work / "head"), "--report", str(work / "report.html"))
    step("index the cache for similarity search", "index", "--cache", a.cache, "--out", str(work / "index"))
    key = str(FeatureCache(a.cache).read().keys[0])
    step(f"nearest neighbours of {Path(key).name}", "search", "--index", str(work / "index"), "--key", key, "-k", "5")
    photos = [str(path) for path, label in imagenet20() if label in (22, 129, 251)]  # eagle, spoonbill, dalmatian
    step("label new photos with the head", "predict", "--head", str(work / "head"), *photos)
    step("run the extraction again: unchanged collection, no model work", "extract", str(tux), "--cache", a.cache)
    print(f"\nreport: {work / 'report.html'}   cache: {a.cache}   head: {work / 'head'}   index: {work / 'index'}")


if __name__ == "__main__":
    main()
