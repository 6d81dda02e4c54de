"""Assemble a featcache cache of Fashion-MNIST `final` vectors embedded on a GPU box.

The CPU extraction of all 70,000 Fashion-MNIST images takes hours on the shared 2-core
machine; ``benchmarks/gpu_mirror_vectors.py --no-mirror`` embedded them on an H100
through featcache's own path (PNG bytes -> ``load_image`` -> ``Embedder``, EfficientNet-Lite0,
fp32, TF32 off; same fingerprint) and returned float16 parts (cosine to fp32 >= 0.9999997).
This script writes those vectors, with the PNG folders' sha256/key/path/label, into a
normal cache, so ``featcache train``/reports run on the full data set.

    python benchmarks/assemble_fmnist_cache.py --parts /work/.device --pngs /work/data/fmnist \
        --like /work/data/fmnist-cache --out /work/data/fmnist-gpu-cache
"""

from __future__ import annotations

import argparse
import hashlib
import re
from pathlib import Path

import numpy as np

from featcache.datasets import FASHION_CLASSES, fashion_mnist
from featcache.store.cache import STATUS_OK, FeatureCache


def parts(root: Path, prefix: str, n: int | None = None) -> np.ndarray:
    """``PREFIX_START_STOP.npy`` files under ``root`` concatenated in order; rows [0, n) must all
    be there (``n`` None: as far as the parts run contiguously from 0)."""
    found = {}
    for f in root.rglob(f"{prefix}_*_*.npy"):
        m = re.fullmatch(rf"{prefix}_(\d+)_(\d+)\.npy", f.name)
        if m:
            found[int(m.group(1))] = (int(m.group(2)), f)
    out, pos = [], 0
    while pos < n if n is not None else pos in found:
        if pos not in found:
            raise SystemExit(f"missing {prefix} part starting at {pos} under {root}")
        stop, f = found[pos]
        out.append(np.load(f).astype(np.float32))
        pos = stop
    return np.concatenate(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", default="/work/.device")
    p.add_argument("--pngs", default="/work/data/fmnist")
    p.add_argument("--like", default="/work/data/fmnist-cache", help="a cache holding the same fingerprint's description")
    p.add_argument("--out", default="/work/data/fmnist-gpu-cache")
    a = p.parse_args()
    like = FeatureCache(a.like)
    fp = like.resolve_fingerprint(None)
    attrs = like.group_attrs(fp)
    cache = FeatureCache(a.out, create=True)
    group = cache.feature_group(fp, attrs["fingerprint"], attrs["backbone"], {"final": 1280})
    if group.rows:
        raise SystemExit(f"{a.out} already holds {group.rows} rows")
    seen: set[str] = set()
    for split in ("train", "test"):
        _, labels = fashion_mnist(split)
        vecs = parts(Path(a.parts), split, len(labels))
        sha, keys, paths, labs, keep = [], [], [], [], []
        for i, lab in enumerate(labels):
            cls = FASHION_CLASSES[lab]
            path = Path(a.pngs) / split / cls / f"{split}-{i:05d}.png"
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
            if digest in seen:  # identical bytes: one image, one row (as the extractor does)
                continue
            seen.add(digest)
            sha.append(digest), keys.append(f"{cls}/{path.name}"), paths.append(str(path.resolve())), labs.append(cls)
            keep.append(i)
        start = len(cache.images())
        cache.append_images(sha, keys, paths, labs)
        rows = np.arange(start, start + len(keep), dtype=np.int64)
        group.write_rows(group.rows, rows, np.full(len(keep), STATUS_OK, np.int8), [""] * len(keep))
        group.write_tap("final", group.rows, vecs[keep])
        group.commit(group.rows + len(keep), {"final": group.rows + len(keep)})
        print(f"{split}: {len(keep)} rows ({len(labels) - len(keep)} duplicate images skipped)")
    print(cache.info()["fingerprints"][0]["rows"], "rows in", a.out)


if __name__ == "__main__":
    main()
