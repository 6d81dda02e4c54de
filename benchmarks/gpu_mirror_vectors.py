"""Embed Fashion-MNIST (and 30,000 mirrored extras) for the 100k search benchmark, on a GPU box.

The Fashion-MNIST cache holds 70,000 vectors. For a 100,000-vector index we embed the
horizontal mirror images of train images 0..29,999 through the same featcache code path
as the extractor (PNG bytes -> ``load_image`` -> ``Embedder.embed``, EfficientNet-Lite0,
fp32, TF32 off). Mirrored clothes are real images the backbone has not seen in the cache,
so their vectors are neither copies nor synthetic noise.

    PYTHONPATH=.:bench-data/devcarry python3 benchmarks/gpu_mirror_vectors.py \
        --npz bench-data/devcarry/train30k.npz --start 0 --stop 15000 --out OUTDIR
    # the unmirrored images (the CPU extraction of the cache was too slow on a shared 2-core box):
    ... --gz bench-data/devcarry/train-images-idx3-ubyte.gz --prefix train --no-mirror --start 0 --stop 25000

Writes ``mirror_<start>_<stop>.npy`` files of float16 (transfer size; cosine to the fp32
vectors > 0.99999) in parts of 5,000 and ``orig_parity.npy`` (fp32 vectors of the first
256 *unmirrored* images, to compare with the CPU-extracted cache).
"""

from __future__ import annotations

import argparse
import io
import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from featcache.extract.backbone import Backbone
from featcache.extract.decode import load_image
from featcache.extract.embedder import Embedder
from featcache.extract.registry import resolve


def png_bytes(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img, "L").save(buf, format="PNG")  # as featcache.datasets.write_fashion_mnist does
    return buf.getvalue()


def embed_all(emb: Embedder, images: np.ndarray, batch: int = 500) -> np.ndarray:
    pre = emb.spec.preprocess
    out = []
    with ThreadPoolExecutor(14) as pool:
        for s in range(0, len(images), batch):
            x = torch.stack(list(pool.map(lambda im: load_image(png_bytes(im), pre), images[s : s + batch])))
            out.append(emb.embed(x)["final"])
    return np.concatenate(out)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--npz", help="npz with an 'images' array")
    p.add_argument("--gz", help="an IDX images .gz file (Fashion-MNIST)")
    p.add_argument("--prefix", default="mirror", help="output file prefix")
    p.add_argument("--no-mirror", action="store_true", help="embed the images as they are")
    p.add_argument("--start", type=int, default=0)
    p.add_argument("--stop", type=int, default=15000)
    p.add_argument("--part", type=int, default=5000)
    p.add_argument("--out", required=True)
    p.add_argument("--device", default="cuda")
    p.add_argument("--parity", type=int, default=256)
    a = p.parse_args()
    out = Path(a.out)
    if a.gz:
        from featcache.datasets import _idx

        images = _idx(Path(a.gz))
    else:
        images = np.load(a.npz)["images"]
    emb = Embedder(Backbone.load(resolve("efficientnet_lite0")), ["final"], a.device, "fp32")
    t0 = time.perf_counter()
    info = {"fingerprint": emb.fingerprint, "device": torch.cuda.get_device_name(0) if a.device == "cuda" else "cpu"}
    if a.start == 0 and a.parity:
        np.save(out / "orig_parity.npy", embed_all(emb, images[: a.parity]))
    for s in range(a.start, a.stop, a.part):
        e = min(a.stop, s + a.part)
        sel = images[s:e] if a.no_mirror else images[s:e, :, ::-1]
        vec = embed_all(emb, np.ascontiguousarray(sel))
        half = vec.astype(np.float16)
        back = half.astype(np.float32)
        cos = (vec * back).sum(1) / np.linalg.norm(vec, axis=1) / np.linalg.norm(back, axis=1)
        info[f"min_cos_fp16_{s}"] = float(cos.min())
        np.save(out / f"{a.prefix}_{s}_{e}.npy", half)
    info["seconds"] = round(time.perf_counter() - t0, 1)
    (out / f"info_{a.prefix}_{a.start}.json").write_text(json.dumps(info, indent=1))
    print(json.dumps(info))


if __name__ == "__main__":
    main()
