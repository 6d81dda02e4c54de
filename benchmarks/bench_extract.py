"""Extraction throughput on this machine: featcache ``auto`` end to end vs the tutorial loop, the
model alone for every runtime x precision, and the plain OpenVINO a user would build, in one run.

The same JPEG files (about 500x375, made from the 20 real ImageNet photos by random crops, flips
and colour changes) and the same frozen backbone throughout:

  featcache auto  files -> Zarr cache with ``featcache.extract`` defaults (runtime and precision
                  auto: the fastest that passes the accuracy gate here; int8 calibrated on these
                  files). The one-time preparation (gate, conversion, quantisation) is timed apart.
  tutorial        torchvision ImageFolder + DataLoader(num_workers=2, batch 32) + the same network
                  in fp32, NCHW, no_grad, features gathered into numpy
  model-only      ``Embedder.embed`` alone at featcache's batch, per runtime x precision (int8
                  calibrated on these files), with the gate's figures on the 20 real photos
  openvino-user   what OpenVINO users build: ``ov.convert_model`` + ``compile_model`` with the
                  THROUGHPUT hint + ``AsyncInferQueue`` at batch 32 (fp32; bf16 where the CPU has
                  it; int8 with NNCF's default ``nncf.quantize`` on these files), with the same gate
  D               decode + resize alone, all cores (featcache's decoder)
  ceiling         1 / (1/M + 1/D) with M = featcache auto's model-only rate: both stages share the cores

    python benchmarks/bench_extract.py [--images 2000] [--backbones efficientnet_lite0 resnet50]

Writes benchmarks/results/extract-cpu-<cpu model>.json (extract-cuda-<gpu>.json on a GPU), so results
of different machines never mix, and prints markdown tables. Prepared models go to a temporary model
cache (``FEATCACHE_MODEL_CACHE``), so every run measures its own preparation.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageEnhance
from record import RESULTS, save

from featcache.datasets import imagenet20
from featcache.extract.backbone import Backbone
from featcache.extract.decode import load_image
from featcache.extract.embedder import Embedder
from featcache.extract.pipeline import ExtractConfig, Extraction
from featcache.extract.registry import resolve
from featcache.extract.runtimes import available, cpu_flags, cpu_model, slug
from featcache.extract.runtimes.calibration import Calibration
from featcache.extract.runtimes.choice import CANDIDATES, judge, model_only, photos
from featcache.runtime import available_cpus

BACKBONES = {"efficientnet_lite0": ("efficientnet_lite0", None), "resnet50": ("torchvision:resnet50", "random")}


def make_jpegs(root: Path, n: int, seed: int = 0) -> list[Path]:
    """n distinct ~500x375 JPEGs in 10 class folders, derived from the real ImageNet photos."""
    rng = random.Random(seed)
    originals = [Image.open(p).convert("RGB") for p, _ in imagenet20()]
    paths = []
    for i in range(n):
        img = originals[i % len(originals)]
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
    torch.set_num_threads(available_cpus())
    feats = []
    t = time.perf_counter()
    with torch.no_grad():
        for x, _ in loader:
            feats.append(model(x.to(device))["final"].cpu().numpy())
    n = sum(len(f) for f in feats)
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


class _UserOpenVINO:
    """Plain OpenVINO as its docs suggest: THROUGHPUT hint, an AsyncInferQueue, a batch of 32."""

    classify_imagenet = Embedder.classify_imagenet  # so the gate's ``judge`` reads it like an Embedder

    def __init__(self, backbone: Backbone, precision: str, calibration: Calibration | None, batch: int = 32):
        import openvino as ov

        from featcache.extract.runtimes.openvino_runner import convert
        from featcache.extract.runtimes.torch_runner import Normalised

        pre = backbone.spec.preprocess
        model = convert(Normalised(backbone.tap_model(["final"]), pre.mean, pre.std).eval(), pre.crop)
        if precision == "int8":
            import nncf

            images = calibration.images(pre)
            model = nncf.quantize(model, nncf.Dataset([images[i : i + 1] for i in range(len(images))]),
                                  subset_size=len(images))
        hint = {"bf16": "bf16", "int8": "f32"}.get(precision, "f32")
        self.compiled = ov.Core().compile_model(model, "CPU", {"PERFORMANCE_HINT": "THROUGHPUT",
                                                               "INFERENCE_PRECISION_HINT": hint})
        self.batch, self.crop, self.spec, self.backbone = batch, pre.crop, backbone.spec, backbone

    def embed(self, x) -> dict[str, np.ndarray]:
        return {"final": self.compiled(np.asarray(x))[0].copy()}

    def rate(self, seconds: float) -> float:
        import openvino as ov

        x = np.random.default_rng(0).integers(0, 256, (self.batch, 3, self.crop, self.crop), dtype=np.uint8)
        queue = ov.AsyncInferQueue(self.compiled, self.compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS"))
        for _ in range(len(queue) * 2):
            queue.start_async({0: x})
        queue.wait_all()
        n, t = 0, time.perf_counter()
        while time.perf_counter() - t < seconds:
            queue.start_async({0: x})
            n += self.batch
        queue.wait_all()
        return n / (time.perf_counter() - t)


# OpenVINO 2026.4 compiled models are never freed here: freeing one after torch had run in this process
# crashed it (SIGSEGV, three runs, right after an int8 row); main() leaves with os._exit once results are saved.
_KEEP: list = []


def stage(what: str, data) -> None:
    """A line on stderr per finished step, with its figures (a long run that dies still leaves them)."""
    print(f"[bench] {what}: {json.dumps(data, default=str)[:2000]}", file=sys.stderr, flush=True)


def reference(backbone: Backbone) -> tuple:
    """The gate's inputs: the 20 real photos, their labels, torch fp32's embeddings and its top-1 count."""
    x, labels = photos(backbone.spec.preprocess)
    ref_emb = Embedder(backbone, ["final"], "cpu", "fp32", runtime="torch")
    ref = ref_emb.embed(x)["final"]
    return x, labels, ref, judge(ref_emb, x, labels, ref, None)["top1"]


def user_row(name: str, precision: str, calibration: Calibration, seconds: float) -> dict:
    """Plain OpenVINO's row, in a process of its own (as a user's script runs): a crash there is a note here."""
    paths = [str(p) for _, p in calibration.files]
    cmd = [sys.executable, __file__, "--user-row", name, precision, "--seconds", str(seconds), "--calibration", *paths]
    done = subprocess.run(cmd, capture_output=True, text=True)
    row = {"who": "openvino-user", "runtime": "openvino", "precision": precision, "batch": 32}
    if done.returncode != 0:
        return {**row, "note": f"exit {done.returncode}: {done.stderr.strip().splitlines()[-1:] or ''}"}
    row = json.loads(done.stdout.strip().splitlines()[-1])
    stage(f"openvino-user {precision}", row)
    return row


def _user_row_here(name: str, precision: str, paths: list[str], seconds: float) -> dict:
    backbone = Backbone.load(resolve(*BACKBONES[name]))
    x, labels, ref, ref_top1 = reference(backbone)
    row = {"who": "openvino-user", "runtime": "openvino", "precision": precision, "batch": 32}
    try:
        from featcache.extract.runtimes.openvino_runner import supports

        if not supports(precision):
            raise RuntimeError(f"no {precision} kernels on this CPU")
        calibration = Calibration.from_files([Path(p) for p in paths], paths, source="bench jpegs")
        user = _UserOpenVINO(backbone, precision, calibration)
        row["images_per_second"] = user.rate(seconds)
        row.update(judge(user, x, labels, ref, ref_top1))
    except Exception as e:  # noqa: BLE001 - a row that cannot run here says why
        row["note"] = f"{type(e).__name__}: {e}"
    return row


def model_rows(name: str, backbone: Backbone, calibration: Calibration, batch: int, seconds: float) -> list[dict]:
    """Model-only throughput and gate figures of every runtime x precision, featcache's and plain OpenVINO's."""
    x, labels, ref, ref_top1 = reference(backbone)
    rows = []
    for runtime, precision in CANDIDATES:
        row = {"who": "featcache", "runtime": runtime, "precision": precision, "batch": batch}
        t = time.perf_counter()
        try:
            emb = Embedder(backbone, ["final"], "cpu", precision, runtime=runtime, calibration=calibration)
            row.update(judge(emb, x, labels, ref, ref_top1))
        except Exception as e:  # noqa: BLE001 - a row that cannot run here says why
            rows.append({**row, "note": f"{type(e).__name__}: {e}"})
            continue
        row["prepare_seconds"] = round(time.perf_counter() - t, 2)
        row["images_per_second"] = model_only(emb, batch, seconds)
        rows.append(row)
        stage(f"row {runtime} {precision}", row)
        _KEEP.append(emb)
    if available("openvino"):
        rows += [user_row(name, precision, calibration, seconds) for precision in ("fp32", "bf16", "int8")]
    return rows


def bench(name: str, root: Path, paths: list[Path], device: str, work: Path, seconds: float,
          batch_size: int | None = None) -> dict:
    arch, weights = BACKBONES[name]
    backbone = Backbone.load(resolve(arch, weights))
    cfg = ExtractConfig(str(root), str(work / f"cache-{name}"), backbone=arch, weights=weights, device=device,
                        batch_size=batch_size, progress=False)
    t = time.perf_counter()
    ex = Extraction(cfg)  # runtime and precision auto: gate, conversion, quantisation happen here, once
    prepare = time.perf_counter() - t
    emb, batch = ex.targets[0].embedder, ex.batch_size
    result = {"backbone": name, "images": len(paths), "device": str(emb.device), "runtime": emb.runtime,
              "precision": emb.precision, "fingerprint": emb.fingerprint, "batch_size": batch, "workers": ex.workers,
              "auto_prepare_seconds": prepare}
    result["M_auto_model_only"] = model_only(emb, batch, seconds)
    result["D_decode_only"] = decode_only(paths, emb, ex.workers)
    summary = ex.run()
    result["featcache_auto"] = summary["extracted"] / summary["seconds"]
    result["featcache_stage_seconds"] = summary["timings"]
    result["tutorial"] = tutorial(root, backbone, emb.device)
    result["ceiling"] = 1 / (1 / result["M_auto_model_only"] + 1 / result["D_decode_only"])
    result["speedup_vs_tutorial"] = result["featcache_auto"] / result["tutorial"]
    result["fraction_of_ceiling"] = result["featcache_auto"] / result["ceiling"]
    stage(f"{name}: end to end and tutorial done", result)
    _KEEP.append(emb)
    if emb.device.type == "cpu":
        calibration = Calibration.from_files(paths, [str(p.relative_to(root)) for p in paths], source="bench jpegs")
        rows = model_rows(name, backbone, calibration, batch, seconds)
        stage(f"{name}: model-only rows done", rows)
        result["model_only"] = [{k: round(v, 3) if isinstance(v, float) else v for k, v in r.items()} for r in rows]
        fp32 = next(r["images_per_second"] for r in rows if (r["who"], r["runtime"], r["precision"]) ==
                    ("featcache", "torch", "fp32"))
        gated_user = [r["images_per_second"] for r in rows if r["who"] == "openvino-user" and r.get("passes")]
        int8 = [r for r in rows if r["who"] == "featcache" and r["precision"] == "int8" and r.get("passes")]
        result["int8_vs_fp32_model_only"] = int8[0]["images_per_second"] / fp32 if int8 else None
        result["auto_vs_best_gated_openvino_user"] = result["M_auto_model_only"] / max(gated_user) if gated_user else None
    return {k: round(v, 3) if isinstance(v, float) else v for k, v in result.items()}


def machine() -> dict:
    """CPU model, the flags that decide which precisions are fast, cores (lscpu when present)."""
    out = {"cpu": cpu_model(), "flags": cpu_flags(), "cpus_available": available_cpus(), "os_cpus": os.cpu_count(),
           "platform": platform.platform(), "torch": torch.__version__,
           "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        keep = ("Model name", "Thread(s) per core", "Core(s) per socket", "Socket(s)", "L2 cache", "L3 cache")
        out["lscpu"] = {k.strip(): v.strip() for k, _, v in (line.partition(":") for line in lscpu.splitlines())
                        if k.strip() in keep}
    except (OSError, subprocess.SubprocessError):
        pass
    for pkg in ("openvino", "nncf"):
        try:
            from importlib.metadata import version

            out[pkg] = version(pkg)
        except Exception:  # noqa: BLE001 - not installed
            out[pkg] = None
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=2000)
    p.add_argument("--backbones", nargs="+", default=list(BACKBONES), choices=list(BACKBONES))
    p.add_argument("--device", default="auto")
    p.add_argument("--batch-size", type=int, help="featcache batch size (default: featcache's own default)")
    p.add_argument("--seconds", type=float, default=8.0, help="length of each model-only measurement")
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--user-row", nargs=2, metavar=("BACKBONE", "PRECISION"), help=argparse.SUPPRESS)
    p.add_argument("--calibration", nargs="+", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.user_row:  # one plain-OpenVINO row, printed as JSON for the parent run
        print(json.dumps(_user_row_here(*a.user_row, a.calibration, a.seconds)))
        return
    work = Path(tempfile.mkdtemp(prefix="featcache-bench-"))
    os.environ["FEATCACHE_MODEL_CACHE"] = str(work / "models")  # every run prepares (and times) its own models
    try:
        root = work / "jpegs"
        paths = make_jpegs(root, a.images)
        rows = [bench(name, root, paths, a.device, work, a.seconds, a.batch_size) for name in a.backbones]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    meta = {**machine(), "command": f"python benchmarks/bench_extract.py --images {a.images} --backbones "
                                    f"{' '.join(a.backbones)} --device {a.device} --seconds {a.seconds}"}
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    gpu = rows and rows[0]["device"].startswith("cuda")
    name = f"extract-cuda-{slug(meta['gpu'] or 'gpu')}.json" if gpu else f"extract-cpu-{slug(meta['cpu'])}.json"
    save({"meta": meta, "results": rows}, out / name)
    print(f"\n{meta}\n\nwrote {out / name}\n")
    print("| backbone | auto: runtime/precision | featcache auto img/s | tutorial img/s | speedup | M img/s | D img/s "
          "| ceiling | % of ceiling | prepare s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['backbone']} | {r['runtime']}/{r['precision']} | {r['featcache_auto']:.1f} | {r['tutorial']:.1f} | "
              f"{r['speedup_vs_tutorial']:.2f}x | {r['M_auto_model_only']:.1f} | {r['D_decode_only']:.1f} | "
              f"{r['ceiling']:.1f} | {100 * r['fraction_of_ceiling']:.0f}% | {r['auto_prepare_seconds']:.0f} |")
    for r in rows:
        if "model_only" not in r:
            continue
        print(f"\n{r['backbone']}: model only (int8 / torch fp32: {r['int8_vs_fp32_model_only']}; featcache auto / best "
              f"gated plain OpenVINO: {r['auto_vs_best_gated_openvino_user']})\n")
        print("| who | runtime | precision | batch | img/s | min cos | top-1 | gate |")
        print("|---|---|---|---|---|---|---|---|")
        for m in r["model_only"]:
            if "images_per_second" not in m:
                print(f"| {m['who']} | {m['runtime']} | {m['precision']} | {m['batch']} | - | - | - | {m.get('note', '')[:80]} |")
                continue
            print(f"| {m['who']} | {m['runtime']} | {m['precision']} | {m['batch']} | {m['images_per_second']:.1f} | "
                  f"{m['min_cosine']:.4f} | {m['top1']} | {'pass' if m['passes'] else 'fail'} |")


if __name__ == "__main__":
    main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # see _KEEP
