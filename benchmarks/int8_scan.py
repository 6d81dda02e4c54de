"""Why featcache's int8 is quantised the way it is: NNCF's defaults against featcache's scheme, judged by the gate.

    python benchmarks/int8_scan.py [--backbone efficientnet_lite0] [--seconds 3]

Each variant is calibrated on the Tux Paint photos (240, disjoint from the 20 it is judged on) and
judged like ``featcache backbones --check``: minimum cosine of the final embedding to torch fp32 and
ImageNet top-1 on the 20 real photos; img/s is OpenVINO's model-only rate at batch 8 next to OpenVINO
fp32, measured in alternation. On a CPU without VNNI the default NNCF model overflows 16-bit sums
(far below the gate); ``overflow_fix`` halves every weight's precision (still below); featcache's
scheme (``openvino_runner.INT8_SCHEME``) keeps 8-bit weights without overflow, and its fp32 stem and
first blocks carry it over the gate. Writes benchmarks/results/int8_scan-<cpu model>.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from featcache.datasets import tuxpaint_items
from featcache.extract.backbone import Backbone
from featcache.extract.embedder import Embedder
from featcache.extract.registry import resolve
from featcache.extract.runtimes import cpu_flags, cpu_model, slug
from featcache.extract.runtimes.calibration import Calibration
from featcache.extract.runtimes.choice import GATE_MIN_COSINE, photos
from featcache.extract.runtimes.openvino_runner import convert, quantise
from featcache.extract.runtimes.torch_runner import Normalised


def nncf_default(model, images: np.ndarray, overflow_fix: str | None = None):
    import nncf
    from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters, OverflowFix

    params = AdvancedQuantizationParameters(overflow_fix=OverflowFix(overflow_fix)) if overflow_fix else None
    return nncf.quantize(model, nncf.Dataset([images[i : i + 1] for i in range(len(images))]),
                         subset_size=len(images), advanced_parameters=params)


def rate(compiled, x: np.ndarray, seconds: float) -> float:
    request = compiled.create_infer_request()
    request.infer({0: x})
    n, t = 0, time.perf_counter()
    while time.perf_counter() - t < seconds:
        request.infer({0: x})
        n += len(x)
    return n / (time.perf_counter() - t)


def main() -> None:
    import openvino as ov

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbone", default="efficientnet_lite0")
    p.add_argument("--seconds", type=float, default=3.0)
    p.add_argument("--out", default=str(Path(__file__).parent / "results"))
    a = p.parse_args()
    backbone = Backbone.load(resolve(a.backbone))
    pre = backbone.spec.preprocess
    x, labels = photos(pre)
    ref_emb = Embedder(backbone, ["final"], "cpu", "fp32", runtime="torch")
    ref = ref_emb.embed(x)["final"]
    ref_top1 = int((ref_emb.classify_imagenet(ref).argmax(1) == labels).sum())
    items = tuxpaint_items()
    images = Calibration.from_files([q for q, _ in items], [str(q) for q, _ in items]).images(pre)
    model = convert(Normalised(backbone.tap_model(["final"]), pre.mean, pre.std).eval(), pre.crop)
    early = backbone.early_convolutions()
    variants = {
        "nncf defaults": lambda: nncf_default(model, images),
        "nncf overflow_fix=enable (7-bit weights)": lambda: nncf_default(model, images, "enable"),
        "featcache scheme, every convolution int8": lambda: quantise(model, images, 0),
        f"featcache scheme, first {early} convolutions fp32": lambda: quantise(model, images, early),
    }
    core = ov.Core()
    config = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": "f32"}
    fp32 = core.compile_model(model, "CPU", config)
    batch = x[:8].numpy()
    rows = []
    for name, build in variants.items():
        t = time.perf_counter()
        compiled = core.compile_model(build(), "CPU", config)
        seconds = time.perf_counter() - t
        out = compiled(x.numpy())[0]
        cos = (out * ref).sum(1) / np.linalg.norm(out, axis=1) / np.linalg.norm(ref, axis=1)
        top1 = int((ref_emb.classify_imagenet(out).argmax(1) == labels).sum())
        ratios = [rate(compiled, batch, a.seconds) / rate(fp32, batch, a.seconds) for _ in range(3)]
        rows.append({"variant": name, "min_cosine": round(float(cos.min()), 5), "mean_cosine": round(float(cos.mean()), 5),
                     "top1": top1, "passes": bool(cos.min() >= GATE_MIN_COSINE and top1 >= ref_top1),
                     "speed_vs_openvino_fp32": round(float(np.median(ratios)), 3), "quantise_seconds": round(seconds, 1)})
        print(rows[-1], flush=True)
    result = {"backbone": a.backbone, "cpu": cpu_model(), "flags": cpu_flags(), "fp32_top1": ref_top1,
              "calibration": f"tuxpaint {len(images)}", "rows": rows}
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"int8_scan-{slug(cpu_model())}.json").write_text(json.dumps(result, indent=2))
    print(f"\n| variant | min cos | top-1 (fp32 {ref_top1}) | gate | speed vs OpenVINO fp32 |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['variant']} | {r['min_cosine']:.4f} | {r['top1']} | {'pass' if r['passes'] else 'fail'} | "
              f"{r['speed_vs_openvino_fp32']:.2f}x |")


if __name__ == "__main__":
    main()
