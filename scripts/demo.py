"""The main job, end to end on real data with the bundled default backbone.

1. Embeds the 20 ImageNet validation photos (foolbox) and the 240 Tux Paint stamps
   (7 classes) into a local Zarr cache with EfficientNet-Lite0, once.
2. Shows what the cache holds, and proves the weights and preprocessing are right:
   the backbone's own ImageNet classifier on the cached features.
3. Runs the same extraction again: nothing to do, so it returns in a moment.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

from featcache.datasets import imagenet20, write_tuxpaint_csv
from featcache.extract.embedder import embedder_for
from featcache.store.cache import FeatureCache

FC = [sys.executable, "-m", "featcache.cli"]


def step(title: str, *args: str) -> None:
    print(f"\n== {title}\n$ featcache {' '.join(args)}", flush=True)
    subprocess.run([*FC, *args], check=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--cache", default="featcache-cache")
    p.add_argument("--work", default="demo-out")
    a = p.parse_args()
    work = Path(a.work)
    imagenet = work / "imagenet20"
    for path, label in imagenet20():
        (imagenet / str(label)).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, imagenet / str(label) / path.name)
    tux = write_tuxpaint_csv(work / "tuxpaint.csv")

    step("backbones", "backbones")
    step("embed 20 ImageNet photos", "extract", str(imagenet), "--cache", a.cache)
    step("embed 240 Tux Paint stamps (7 classes)", "extract", str(tux), "--cache", a.cache)
    step("what the cache holds", "info", "--cache", a.cache)

    cache = FeatureCache(a.cache)
    fp = cache.resolve_fingerprint()
    attrs = cache.group_attrs(fp)
    feats = cache.read(fp)
    names = __import__("torchvision").models.MobileNet_V2_Weights.IMAGENET1K_V1.meta["categories"]
    emb = embedder_for(attrs["backbone"], attrs["fingerprint"], device="cpu")
    is_imagenet = np.char.isdigit(feats.labels.astype(str))
    logits = emb.classify_imagenet(feats.vectors[is_imagenet])
    truth = feats.labels[is_imagenet].astype(int)
    pred = logits.argmax(1)
    print(f"\n== ImageNet check: the backbone's own classifier on cached features: "
          f"top-1 {int((pred == truth).sum())}/{len(truth)}")
    for key, t, q in list(zip(feats.keys[is_imagenet], truth, pred))[:5]:
        print(f"  {key:32} true {names[t]:24} predicted {names[q]}")

    step("run again: unchanged collection, no model work", "extract", str(tux), "--cache", a.cache)


if __name__ == "__main__":
    main()
