"""Extraction throughput: featcache end to end vs the tutorial loop, and the two stages alone.

One run, the same JPEG files (about 500x375, made from the 20 real ImageNet photos by
random crops, flips and colour changes), the same frozen backbone:

  featcache   files -> Zarr cache with ``featcache.extract`` (default settings)
  tutorial    torchvision ImageFolder + DataLoader(num_workers=2, batch 32) + the same
              network in fp32, NCHW, no_grad, features gathered into numpy
  M           model-only forward throughput at featcache's precision, all cores
  D           decode + resize throughput alone, all cores (featcache's decoder)
  ceiling     1 / (1/M + 1/D): both stages share the cores

    python benchmarks/bench_extract.py [--images 2000] [--backbones efficientnet_lite0 resnet50] [--device auto]

Writes benchmarks/results/extract-<device>.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import platform
import random
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from PIL import Image, ImageEnhance
from record import RESULTS, save

from featcache.datasets import imagenet20
from featcache.extract.backbone import Backbone
from featcache.extract.decode import load_image
from featcache.extract.embedder import Embedder
from featcache.extract.pipeline import ExtractConfig, Extraction
from featcache.extract.registry import resolve
from featcache.runtime import available_cpus

BACKBONES = {"efficientnet_lite0": ("efficientnet_lite0", None), "resnet50": ("torchvision:resnet50", "random")}


def make_jpegs(root: Path, n: int, seed: int = 0) -> list[Path]:
    """n distinct ~500x375 JPEGs in 10 class folders, derived from the real ImageNet photos."""
    rng = random.Random(seed)
    photos = [Image.open(p).convert("RGB") for p, _ in imagenet20()]
    paths = []
    for i in range(n):
        img = photos[i % len(photos)]
        w, h = img.size
        cw, ch = rng.randint(int(w * 0.6), w), rng.randint(int(h * 0.6), h)
        x, y = rng.randint(0, w - cw), rng.randint(0, h - ch)
        out = img.crop((x, y, x + cw, y + ch)).resize((500, 375), Image.BICUBIC)
        if rng.random() < 0.5:
            out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        out = ImageEnhance.Color(out).enhance(rng.uniform(0.6, 1.4))
        path = root / f"class{i % 10}" / f"img{i:05d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        out.save(path, "JPEG", quality=rng.randint(80, 95))
        paths.append(path)
    return paths


def tutorial(root: Path, backbone: Backbone, device: torch.device) -> float:
    """What a user writes by hand: ImageFolder + DataLoader(num_workers=2) + fp32 NCHW no_grad."""
    import torchvision.transforms as T
    from torch.utils.data import DataLoader
    from torchvision.datasets import ImageFolder

    pre = backbone.spec.preprocess
    interp = {"bicubic": T.InterpolationMode.BICUBIC, "bilinear": T.InterpolationMode.BILINEAR}[pre.interpolation]
    tf = T.Compose([T.Resize(pre.resize, interpolation=interp), T.CenterCrop(pre.crop), T.ToTensor(),
                    T.Normalize(pre.mean, pre.std)])
    loader = DataLoader(ImageFolder(str(root), transform=tf), batch_size=32, num_workers=2)
    model = backbone.tap_model(["final"]).eval().to(device)
    feats = []
    t = time.perf_counter()
    with torch.no_grad():
        for x, _ in loader:
            feats.append(model(x.to(device))["final"].cpu().numpy())
    n = sum(len(f) for f in feats)
    return n / (time.perf_counter() - t)


def model_only(emb: Embedder, batch: int, seconds: float = 8.0) -> float:
    size = emb.spec.preprocess.crop
    x = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8)
    emb.embed(x)
    emb.embed(x)
    n, t = 0, time.perf_counter()
    while time.perf_counter() - t < seconds:
        emb.embed(x)
        n += batch
    if emb.device.type == "cuda":
        torch.cuda.synchronize()
    return n / (time.perf_counter() - t)


def decode_only(paths: list[Path], emb: Embedder, workers: int) -> float:
    pre = emb.spec.preprocess
    torch.set_num_threads(1)
    with ThreadPoolExecutor(workers) as pool:
        t = time.perf_counter()
        list(pool.map(lambda p: load_image(p.read_bytes(), pre), paths))
        rate = len(paths) / (time.perf_counter() - t)
    torch.set_num_threads(emb.threads)
    return rate


def bench(name: str, root: Path, paths: list[Path], device: str, work: Path, batch_size: int | None = None) -> dict:
    arch, weights = BACKBONES[name]
    backbone = Backbone.load(resolve(arch, weights))
    emb = Embedder(backbone, ["final"], device)
    ex = Extraction(ExtractConfig(str(root), str(work / f"cache-{name}"), batch_size=batch_size, progress=False), emb)
    batch = ex.batch_size
    result = {"backbone": name, "images": len(paths), "device": str(emb.device), "precision": emb.precision,
              "batch_size": batch, "workers": ex.workers}
    result["M_model_only"] = model_only(emb, batch)
    result["D_decode_only"] = decode_only(paths, emb, ex.workers)
    summary = ex.run()
    result["featcache"] = summary["extracted"] / summary["seconds"]
    result["featcache_stage_seconds"] = summary["timings"]
    result["tutorial"] = tutorial(root, backbone, emb.device)
    result["ceiling"] = 1 / (1 / result["M_model_only"] + 1 / result["D_decode_only"])
    result["speedup_vs_tutorial"] = result["featcache"] / result["tutorial"]
    result["fraction_of_ceiling"] = result["featcache"] / result["ceiling"]
    return {k: round(v, 3) if isinstance(v, float) else v for k, v in result.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=2000)
    p.add_argument("--backbones", nargs="+", default=list(BACKBONES), choices=list(BACKBONES))
    p.add_argument("--device", default="auto")
    p.add_argument("--batch-size", type=int, help="featcache batch size (default: featcache's own default)")
    p.add_argument("--out", default=str(RESULTS))
    a = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="featcache-bench-"))
    try:
        root = work / "jpegs"
        paths = make_jpegs(root, a.images)
        rows = [bench(name, root, paths, a.device, work, a.batch_size) for name in a.backbones]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    meta = {"cpus": available_cpus(), "cpu": platform.processor() or platform.machine(), "torch": torch.__version__,
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            "command": f"python benchmarks/bench_extract.py --images {a.images} --backbones {' '.join(a.backbones)} --device {a.device}"}
    tag = "cuda" if rows and rows[0]["device"].startswith("cuda") else "cpu"
    save({"meta": meta, "results": rows}, Path(a.out) / f"extract-{tag}.json")
    print(f"\n{meta}\n")
    print("| backbone | device/precision | featcache img/s | tutorial img/s | speedup | M img/s | D img/s | ceiling | % of ceiling |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['backbone']} | {r['device']}/{r['precision']} | {r['featcache']:.1f} | {r['tutorial']:.1f} | "
              f"{r['speedup_vs_tutorial']:.2f}x | {r['M_model_only']:.1f} | {r['D_decode_only']:.1f} | "
              f"{r['ceiling']:.1f} | {100 * r['fraction_of_ceiling']:.0f}% |")


if __name__ == "__main__":
    main()
